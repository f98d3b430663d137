"""The linters `.ci/run` runs hold today, and fail on the faults they exist for.

Each check runs the real tool on a copy of the packages, once as they are and
once with one fault planted: a lower layer importing a higher one, an import
cycle, a lint error, a type error.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PACKAGES = ("gateway", "providers", "local_backend")


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packages and pyproject.toml, copied: faults are planted here, never in the tree."""
    root = tmp_path_factory.mktemp("layout")
    for name in PACKAGES:
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def run(root: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH: import-linter imports the copy, not the installed tree.
    env = {"PATH": str(BIN), "PYTHONPATH": str(root), "HOME": str(root)}
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=600)


def planted(root: Path, path: str, text: str) -> Path:
    """A copy of the packages with ``text`` appended to one module."""
    target = root.parent / f"{root.name}-{Path(path).stem}-{abs(hash(text))}"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(root, target)
    with (target / path).open("a") as f:
        f.write(text)
    return target


def test_layers_hold_and_a_violation_fails(copy: Path) -> None:
    ok = run(copy, str(BIN / "lint-imports"))
    assert ok.returncode == 0, ok.stdout[-3000:]
    bad = planted(copy, "gateway/routing/health.py", "\nimport gateway.pipeline.chat  # noqa: E402,F401\n")
    out = run(bad, str(BIN / "lint-imports"))
    assert out.returncode != 0
    assert "gateway.routing is not allowed to import gateway.pipeline" in out.stdout


def test_a_cycle_between_siblings_fails(copy: Path) -> None:
    # routing and limits share a layer, so only the acyclic rule can see a loop
    # between two modules of one package.
    bad = planted(copy, "gateway/routing/health.py", "\nimport gateway.routing.router  # noqa: E402,F401\n")
    out = run(bad, str(BIN / "lint-imports"))
    assert out.returncode != 0
    assert "No cycles are allowed in gateway.routing" in out.stdout


def test_the_local_backend_stays_apart(copy: Path) -> None:
    bad = planted(copy, "local_backend/sampling.py", "\nimport gateway.config  # noqa: E402,F401\n")
    out = run(bad, str(BIN / "lint-imports"))
    assert out.returncode != 0
    assert "local_backend.sampling -> gateway.config" in out.stdout


def test_ruff_passes_and_catches_an_error(copy: Path) -> None:
    for cmd in (("check",), ("format", "--check")):
        ok = run(copy, str(BIN / "ruff"), *cmd, *PACKAGES)
        assert ok.returncode == 0, ok.stdout[-3000:]
    bad = planted(copy, "providers/novita.py", "\nimport os\n")
    out = run(bad, str(BIN / "ruff"), "check", *PACKAGES)
    assert out.returncode != 0 and "F401" in out.stdout


def test_mypy_passes_and_catches_a_type_error(copy: Path) -> None:
    ok = run(copy, str(BIN / "mypy"), "--no-incremental")
    assert ok.returncode == 0, ok.stdout[-3000:]
    bad = planted(copy, "providers/base.py", "\n\ndef broken() -> int:\n    return 'not an int'\n")
    out = run(bad, str(BIN / "mypy"), "--no-incremental")
    assert out.returncode != 0
    assert 'Incompatible return value type (got "str", expected "int")' in out.stdout
