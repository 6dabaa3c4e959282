#!/usr/bin/env bash
# Compile time of torch.compile(opt.step) for mechanized AdamW over N 64x64 tensors, an older revision
# against the working tree, each in a fresh process with fresh inductor caches, in the order
# old, new, new, old (the child is bench/compile_times.py's):
#     bash bench/compile_times_ab.sh 3e31ee5 100
set -euo pipefail
rev=$1; tensors=${2:-100}
root=$(cd "$(dirname "$0")/.." && pwd)
old=$(mktemp -d)
git -C "$root" archive "$rev" mechanic_fast kernels | tar -x -C "$old"
mv "$old/kernels" "$old/mechanic_fast/kernels"
child=$(mktemp --suffix .py)
python - "$root/bench/compile_times.py" > "$child" <<'PY'
import re, sys
print(re.search(r'CHILD = r"""(.*?)"""', open(sys.argv[1]).read(), re.S).group(1))
PY
cd "$(mktemp -d)"  # not the checkout: the package comes from the path set below, or the installed one
for who in old new new old; do
  path=""; [ "$who" = old ] && path=$old
  echo -n "$who "
  PYTHONPATH=$path TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_FX_GRAPH_CACHE=0 \
    TORCHINDUCTOR_AUTOGRAD_CACHE=0 python "$child" step "$tensors" 64 0 2>/dev/null | tail -1
done
