"""Every Python snippet in the README and docs/ runs, CI runs the README's test command, and the pages
speak to users (no development history)."""

from __future__ import annotations

import os
import re
import sys
import types
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
PAGES = {
    "README.md": README,
    **{f"docs/{p.name}": p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))},
}
SNIPPETS = [
    (page, i, indent, code)
    for page, text in PAGES.items()
    for i, (indent, code) in enumerate(re.findall(r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M))
]


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_pages_have_snippets():
    assert sum(page == "README.md" for page, *_ in SNIPPETS) >= 2
    assert len(SNIPPETS) >= 10


@pytest.mark.parametrize("page, index, indent, code", SNIPPETS, ids=[f"{p}-{i}" for p, i, *_ in SNIPPETS])
def test_snippet_runs(page, index, indent, code, tmp_path, monkeypatch):
    code = "\n".join(line[len(indent) :] for line in code.splitlines())
    monkeypatch.chdir(tmp_path)  # snippets that write files (checkpoints, TensorBoard logs) write here
    # what a snippet sets (MASTER_ADDR, ...) ends with it; a free port, not the snippet's fixed one
    # run as a module that exists (torch.compile looks its code's module up, in some torch versions)
    module = types.ModuleType(f"snippet_{index}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with mock.patch.dict(os.environ, MASTER_PORT=_free_port()):
        exec(compile(code, f"{page} snippet {index}", "exec"), module.__dict__)


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    test_command = next(c.strip() for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert os.access(ROOT / ".ci" / "run", os.R_OK)


def test_readme_is_short_and_its_links_lead_somewhere():
    assert len(README.splitlines()) <= 250
    for page, text in PAGES.items():
        base = (ROOT / page).parent
        for target in re.findall(r"\]\(([^)#:]+\.(?:md|png))(?:#[^)]*)?\)", text):
            assert (base / target).is_file(), (page, target)


# development history belongs in commit messages: rounds, sessions, commit hashes, "this run"
HISTORY = re.compile(
    r"\bround [0-9]\b|\bround 1's\b|\bthis round\b|\bsessions?\b|\bthis run\b|\bwork period|"
    r"\bcommit [0-9a-f]{7}\b|\bat [0-9a-f]{7}\b|\breference machine\b|\bearlier machine\b",
    re.I,
)


@pytest.mark.parametrize("page", list(PAGES))
def test_pages_tell_no_development_history(page):
    assert not HISTORY.findall(PAGES[page]), HISTORY.findall(PAGES[page])
