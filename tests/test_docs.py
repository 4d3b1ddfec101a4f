"""The documentation stands alone and stays navigable: a short README, no pointer outside the repository, no dead
relative link, and every public op's row in docs/ops.md names files that exist (issue 28: the README had grown to
~800 lines and sent readers to a design file that a user's clone does not have)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from caprl_core import ops

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [ROOT / "README.md", *DOCS]
PUBLIC_OPS = ("token_logprobs", "linear_token_logprobs", "group_advantages", "mcq_rewards")
# Spelled in two parts so that this file does not match its own check.
FORBIDDEN = ("../" + "shared", "DESIGN" + ".md")
SKIPPED_DIRS = {".git", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", "results"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _repository_files() -> list[Path]:
    """The tracked files; where there is no git checkout (an unpacked sdist), every file outside build output and
    virtual environments."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".venv")]
            files += [Path(folder) / name for name in names]
        return files


def _text(path: Path) -> str | None:
    if path.is_symlink() or not path.is_file():
        return None
    data = path.read_bytes()
    return None if b"\0" in data else data.decode("utf-8", errors="replace")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move the depth into docs/"


def test_docs_exist():
    assert len(DOCS) >= 5, DOCS


def test_nothing_points_outside_the_repository():
    found = []
    for path in _repository_files():
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            found += [f"{path.relative_to(ROOT)}:{number}: {word}" for word in FORBIDDEN if word in line]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files_that_exist(page: Path):
    dead = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            dead.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            dead.append(f"{target}: no heading with that anchor")
    assert not dead, f"{page.relative_to(ROOT)}: " + "; ".join(dead)


def _ops_row(op: str) -> str:
    rows = [line for line in (ROOT / "docs" / "ops.md").read_text().splitlines() if line.startswith(f"| `{op}` |")]
    assert len(rows) == 1, f"docs/ops.md needs exactly one table row for {op}, has {len(rows)}"
    return rows[0]


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_every_public_op_has_its_row_in_docs_ops(op: str):
    assert callable(getattr(ops, op)), op
    row = _ops_row(op)
    named = set(re.findall(r"`([^`]+/[^`]+)`", row))
    missing = [name for name in named if not (ROOT / name).exists()]
    assert not missing, f"docs/ops.md, {op}: {missing} do not exist"
    expected = {f"kernels/{op}.py", f"csrc/cpu/{op}.cpp", "caprl_core/reference.py", f"tests/test_{op}.py",
                f"bench/bench_{op}.py"}  # fmt: skip
    if (ROOT / "csrc" / "cuda" / f"{op}.cu").exists():
        expected.add(f"csrc/cuda/{op}.cu")
    assert expected <= named, f"docs/ops.md, {op}: the row does not name {sorted(expected - named)}"
    assert f"def {op}(" in (ROOT / "caprl_core" / "reference.py").read_text(), f"no reference for {op}"
