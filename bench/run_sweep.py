"""Run the benchmark sweep and write sweep.json, sweep.md and sweep.png into --out-dir.

python bench/run_sweep.py --out-dir out/            # full sweep (several minutes on 2 CPU cores)
python bench/run_sweep.py --out-dir out/ --quick    # seconds
"""

from __future__ import annotations

import argparse
import os
import sys

from mechanic_fast.tools import sweep as benchmark


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True, help="existing or new directory for the three outputs")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats, no compile")
    parser.add_argument(
        "--device", action="append", help="device (repeatable; default: every device present)"
    )
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    out = lambda name: os.path.join(args.out_dir, name)  # noqa: E731
    result = benchmark.run_sweep(
        args.device,
        args.quick,
        out("sweep.json"),
        out("sweep.md"),
        out("sweep.png"),
        progress=lambda i, n, what: print(f"[{i}/{n}] {what}", file=sys.stderr),
    )
    print(benchmark.markdown_table(result["rows"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
