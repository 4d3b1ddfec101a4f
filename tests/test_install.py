"""How the package installs: nothing in the repository shadows an installed package when Python runs from the root.

`python -m pytest` and `python -m caprl_core.train` (what `make` runs) put the repository root first on sys.path. Our
top-level kernels/ (one Triton op per file, packaged as caprl_core.kernels) must then never be what `import kernels`
finds: transformers >= 5.25 imports Hugging Face's `kernels` package from transformers.modeling_utils (issue 21).

Run: pytest tests/test_install.py
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_from_root(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter from the repository root, with the root first on sys.path (as -m does)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_kernels_from_the_root_is_never_our_folder():
    code = (
        "import json, transformers.modeling_utils, kernels\n"
        "print(json.dumps({'file': getattr(kernels, '__file__', None)}))"
    )
    result = run_from_root(code)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    try:
        installed = importlib.metadata.distribution("kernels")  # Hugging Face's (transformers >= 5.25 requires it)
    except importlib.metadata.PackageNotFoundError:
        # Without it `import kernels` may find our folder, but only as a namespace portion: no module of ours runs.
        assert found["file"] is None, found
        return
    assert found["file"] is not None, found
    # The installed distribution's own file (the venv may live inside the checkout, so "outside the repository" is
    # checked as "not our kernels/ folder, and the file the distribution installed").
    assert Path(found["file"]).resolve().parent != ROOT / "kernels", found
    assert Path(found["file"]).resolve() == Path(installed.locate_file("kernels/__init__.py")).resolve(), found


def test_the_triton_kernels_import_as_caprl_core_kernels():
    result = run_from_root("import caprl_core.kernels.token_logprobs as m; print(m.__file__)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert Path(result.stdout.strip()).name == "token_logprobs.py"


def test_the_lock_leaves_to_torch_what_torch_constrains_otherwise():
    """torch 2.14.1's CUDA wheel requires triton~=3.8.0; a lock of triton 3.9.0 made pip swap torch for 2.13.0+cpu."""
    from packaging.requirements import Requirement

    from scripts import lock_constraints

    lock = "# header\ntransformers==5.25.0\ntriton==3.9.0  # a comment\n\nKernels==0.19.1\nsympy==1.14.0\n"
    torch_214 = [Requirement('triton~=3.8.0; platform_system == "Linux"'), Requirement("sympy>=1.13.3")]
    expected = "transformers==5.25.0\nKernels==0.19.1\nsympy==1.14.0\n"  # sympy's pin is one torch accepts
    assert lock_constraints.constraints(lock, torch_214) == expected
    assert lock_constraints.constraints(lock, [Requirement("triton>=3.9")]).count("triton==3.9.0") == 1
    assert lock_constraints.constraints(lock, []).count("triton==3.9.0") == 1


def test_the_lock_pins_every_dependency_but_torch():
    from scripts import lock_constraints

    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and line[0] != "#"]
    assert all("==" in line for line in lines), lines
    pinned = {lock_constraints.canonical(line.split("==")[0]) for line in lines}
    assert "torch" not in pinned
    for name in ("transformers", "kernels", "triton", "trl", "numpy", "safetensors", "pytest", "ruff"):
        assert name in pinned, name


def test_every_package_is_packaged():
    """pyproject.toml lists the packages by hand (kernels/ and csrc/ are mapped in): a new subpackage must be listed,
    or the wheel installs without it (tests pass from the checkout, users get ImportError)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "caprl_core").rglob("__init__.py")}
    assert found - listed == set()
