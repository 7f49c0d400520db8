"""Rerunnable benchmarks of ctprofd (see README.md). REPO is the repository they measure;
importing the package puts its tests/ on sys.path, for tests/support (fixture builds and
handles)."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))
