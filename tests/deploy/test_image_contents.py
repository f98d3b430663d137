"""What `pip install .` puts into the images: built from the same build
context the Dockerfile sees (deploy/Dockerfile.dockerignore), the wheel must
carry every data file of the packages (catalog, safety term lists, ...);
an editable install in development would hide a missing one."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from ._support import DEPLOY, ROOT

PACKAGES = ("gateway", "providers", "local_backend")


def _context(dest):
    """Copy what the .dockerignore lets into the build context."""
    allowed = [line[1:].rstrip("/") for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for rel in allowed:
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return allowed


def test_the_wheel_carries_every_package_data_file(tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    allowed = _context(ctx)
    for package in PACKAGES:
        assert package in allowed, f"{package}/ is not in the image's build context"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist"), str(ctx)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    data = sorted(
        str(p.relative_to(ctx))
        for package in PACKAGES
        for p in (ctx / package).rglob("*")
        if p.is_file() and p.suffix not in {".py", ".pyc"}
    )
    assert "gateway/data/catalog.toml" in data
    missing = [f for f in data if f not in in_wheel]
    assert not missing, (f"data files left out of `pip install .` (so out of the Docker images): {missing}; "
                         "add them to [tool.setuptools.package-data] in pyproject.toml")
    for package in PACKAGES:
        assert f"{package}/__init__.py" in in_wheel
