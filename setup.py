"""Stamps the source revision into what is built, for ctprofd_build_info and --version.

Everything else is in pyproject.toml. A wheel (and so every non-editable install: pip,
scripts/install-service.sh, the Dockerfile) carries ctprofd/export/REVISION, which
ctprofd/export/revision.py reads before asking git: the environment's CTPROFD_REVISION (the
Dockerfile's build argument, a package build's), else `git rev-parse --short=12 HEAD` of this
tree, else the REVISION an sdist carries (an sdist is stamped the same way when it is made).
With none of them nothing is stamped, and ctprofd reports "unknown". An editable install has
no stamp: it asks git of the checkout at run time.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
STAMP = Path("ctprofd", "export", "REVISION")


def revision() -> str:
    """The revision to stamp, '' when none is known."""
    given = os.environ.get("CTPROFD_REVISION", "").strip()
    if given:
        if not given.isalnum():
            raise SystemExit(f"CTPROFD_REVISION={given!r}: letters and digits only")
        return given
    try:
        result = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=10,
                                stdin=subprocess.DEVNULL)
        if result.returncode == 0 and result.stdout.strip().isalnum():
            return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # an unpacked sdist
        return (HERE / STAMP).read_text(encoding="ascii").strip()
    except OSError:
        return ""


def _stamp(root: str) -> None:
    value = revision()
    if value:
        path = Path(root, STAMP)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n", encoding="ascii")


class StampedBuildPy(build_py):
    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):
            _stamp(self.build_lib)


class StampedSdist(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        _stamp(base_dir)


setup(cmdclass={"build_py": StampedBuildPy, "sdist": StampedSdist})
