"""The lock (constraints.txt) as pip constraints for the torch installed here: `make setup` (DEPS=lock) runs this.

A CUDA torch wheel constrains some of its own dependencies tightly (torch 2.14.1: triton~=3.8.0, nvidia-*==...). A
lock line that such a requirement of the installed torch rejects (the CPU wheel's venv locked triton 3.9.0) would make
pip replace torch itself to satisfy the lock (seen: torch 2.14.1 silently swapped for 2.13.0+cpu), so those lines are
left out and torch decides. Every other lock line is kept as it is.

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


def torch_requirements() -> list:
    """The installed torch's requirements that apply here (environment markers evaluated), as packaging
    Requirements; none without torch."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a fresh venv may not have it yet: pip carries its own copy
        from pip._vendor.packaging.requirements import Requirement
    try:
        requires = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    parsed = [Requirement(r) for r in requires]
    return [r for r in parsed if r.marker is None or r.marker.evaluate({"extra": ""})]


def constraints(lock_text: str, torch_requires: list) -> str:
    """The lock's lines, less those whose version a requirement of torch rejects (comments and blank lines
    dropped)."""
    rejects = {canonical(r.name): r.specifier for r in torch_requires}
    kept = []
    for line in lock_text.splitlines():
        pin = line.split("#")[0].strip()
        if not NAME.match(pin):
            continue
        name, _, version = pin.partition("==")
        spec = rejects.get(canonical(name))
        if spec is None or spec.contains(version.strip(), prereleases=True):
            kept.append(pin)
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
        sys.stdout.write(constraints(Path(args[0]).read_text(), torch_requirements()))
    else:
        sys.exit("usage: python scripts/lock_constraints.py [--write] constraints.txt")
