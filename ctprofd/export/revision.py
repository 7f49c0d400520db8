"""The source revision ctprofd runs from, for ctprofd_build_info: the one stamped into a built
package (scripts/build-deb.sh writes the file REVISION beside this module), else the commit of
the git checkout it is installed from (an editable install, a container built from the tree),
else "unknown"."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

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
