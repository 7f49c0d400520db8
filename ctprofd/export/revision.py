"""The source revision ctprofd runs from, for ctprofd_build_info and --version: the one stamped
into what was built (the file REVISION beside this module: setup.py writes it into every
wheel and sdist, so pip, install-service.sh and the image carry it; scripts/build-deb.sh
writes it into the package), else the commit of the git checkout it runs from (an editable
install), else "unknown"."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

from .. import __version__

STAMP = Path(__file__).with_name("REVISION")


def source_revision(root: Path = Path(__file__).resolve().parents[2],
                    stamp: Path = STAMP) -> str:
    """The stamped revision, else `git rev-parse --short=12 HEAD` of `root` when it is a
    checkout, else "unknown"."""
    try:
        stamped = stamp.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        stamped = ""
    if stamped.isalnum():
        return stamped
    git = shutil.which("git")
    if git is None or not (root / ".git").exists():
        return "unknown"
    try:
        result = subprocess.run([git, "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=5,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    revision = result.stdout.strip()
    return revision if result.returncode == 0 and revision.isalnum() else "unknown"


REVISION = source_revision()


def version_text() -> str:
    """What `ctprofd --version` prints: version, revision, Python and platform."""
    return (f"ctprofd {__version__} (revision {REVISION}; Python {platform.python_version()} "
            f"{platform.python_implementation()}; {platform.platform()})")
