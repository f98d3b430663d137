"""System programs the tests drive for real (prometheus, nginx).

`make test` installs them with apt-get when they are missing (see the
Makefile); a test that needs one and cannot find it fails, it does not skip.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def require(name: str) -> str:
    found = shutil.which(name) or next((str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name)
                                        if p.exists()), None)
    if found is None:
        raise AssertionError(f"`{name}` is not installed: run `make system-deps` (apt-get install prometheus nginx)")
    return found
