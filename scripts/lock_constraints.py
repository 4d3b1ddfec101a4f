"""The lock (constraints.txt) as pip constraints for the torch installed here: `make setup` (DEPS=lock) runs this.

A CUDA torch wheel pins some of its own dependencies exactly (torch 2.14.1: triton==3.8.0, nvidia-*); a lock line for
such a package would make pip refuse the install, so those lines are left out and torch decides. Every other lock
line is kept as it is.

Use: python scripts/lock_constraints.py constraints.txt > .venv/constraints.txt
     python scripts/lock_constraints.py --write constraints.txt   (`make lock`: the lock := this venv's versions)
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """PEP 503 name: case and runs of -, _ and . do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_by_torch() -> set[str]:
    """Names that the installed torch requires with an exact pin (==), environment markers ignored."""
    try:
        requires = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    return {canonical(m.group(1)) for r in requires if "==" in r.split(";")[0] and (m := NAME.match(r))}


def constraints(lock_text: str, torch_pins: set[str]) -> str:
    """The lock's lines, less the pins of packages that torch pins itself (comments and blank lines dropped)."""
    kept = []
    for line in lock_text.splitlines():
        match = NAME.match(line.split("#")[0])
        if match and canonical(match.group(1)) not in torch_pins:
            kept.append(line.strip())
    return "\n".join(kept) + "\n"


# Not locked: torch (per platform), the project itself, and the installer's own tools.
UNLOCKED = {"torch", "caprl-core", "pip", "setuptools", "wheel"}


def frozen(lock_text: str) -> str:
    """The lock rewritten from the versions installed here: its header comment kept, one `name==version` a line."""
    header = [line for line in lock_text.splitlines() if line.startswith("#")]
    installed = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    pins = [f"{name}=={version}" for name, version in sorted(installed.items()) if name not in UNLOCKED]
    return "\n".join([*header, *pins]) + "\n"


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--write"] and len(args) == 2:
        path = Path(args[1])
        path.write_text(frozen(path.read_text()))
    elif len(args) == 1:
        sys.stdout.write(constraints(Path(args[0]).read_text(), pinned_by_torch()))
    else:
        sys.exit("usage: python scripts/lock_constraints.py [--write] constraints.txt")
