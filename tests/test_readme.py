"""Every Python snippet in the README runs, and CI runs the README's test command."""

from __future__ import annotations

import os
import re
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"^( *)```python\n(.*?)^\1```", README, flags=re.S | re.M)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 6


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    indent, code = SNIPPETS[index]
    code = "\n".join(line[len(indent) :] for line in code.splitlines())
    monkeypatch.chdir(tmp_path)  # snippets that write files (checkpoints, TensorBoard logs) write here
    with mock.patch.dict(os.environ):  # what a snippet sets (MASTER_ADDR, ...) ends with it
        exec(compile(code, f"README.md snippet {index}", "exec"), {"__name__": f"readme_{index}"})


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    test_command = next(c.strip() for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert os.access(ROOT / ".ci" / "run", os.R_OK)
