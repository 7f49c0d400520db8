"""The revision is stamped into what is built (setup.py), and `ctprofd --version` says it.

A wheel built from this checkout carries its `git rev-parse --short=12 HEAD`; an sdist
carries it too, and a wheel built from that sdist (no git there) keeps it; CTPROFD_REVISION
(the Dockerfile's build argument) overrides both. The installed wheel's ctprofd reports the
stamp in --version and ctprofd_build_info. The image is tests/test_image.py; an editable
install, which has no stamp, asks git at run time (tests/test_collector.py).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAD = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                      capture_output=True, text=True, check=True).stdout.strip()
STAMP = "ctprofd/export/REVISION"


def build(kind: str, source: Path, out: Path, revision: str | None = None) -> Path:
    """A wheel (pip wheel, with build isolation as any install) or an sdist (setup.py) of
    `source` in `out`."""
    env = {k: v for k, v in os.environ.items() if k != "CTPROFD_REVISION"}
    if revision is not None:
        env["CTPROFD_REVISION"] = revision
    if kind == "wheel":
        argv = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out),
                str(source)]
    else:
        argv = [sys.executable, "setup.py", "--quiet", "sdist", "--dist-dir", str(out)]
    result = subprocess.run(argv, cwd=source, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    [built] = out.glob("*.whl" if kind == "wheel" else "*.tar.gz")
    return built


def wheel_stamp(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(STAMP).decode().strip()


def test_a_wheel_from_the_checkout_carries_its_commit(tmp_path) -> None:
    assert wheel_stamp(build("wheel", REPO, tmp_path)) == HEAD


def test_the_build_argument_overrides_git(tmp_path) -> None:
    assert wheel_stamp(build("wheel", REPO, tmp_path, revision="0123abcd")) == "0123abcd"


def test_an_sdist_carries_it_to_a_wheel_built_without_git(tmp_path) -> None:
    sdist = build("sdist", REPO, tmp_path / "sdist")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "src")  # our own sdist
    [source] = (tmp_path / "src").iterdir()
    assert (source / STAMP).read_text().strip() == HEAD
    assert not (source / ".git").exists()
    assert wheel_stamp(build("wheel", source, tmp_path / "wheel")) == HEAD


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel unpacked where the test runs it from, nothing of the checkout on its path."""
    out = tmp_path_factory.mktemp("wheel")
    wheel = build("wheel", REPO, out, revision="feedface1234")
    target = out / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def run_installed(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import ctprofd; "
            "assert ctprofd.__file__.startswith(sys.path[0]), ctprofd.__file__; "
            "from ctprofd.cli import main; sys.exit(main())")
    return subprocess.run([sys.executable, "-c", code, str(site), *args], cwd=site,
                          capture_output=True, text=True, timeout=60)


def test_version_prints_version_revision_python_and_platform(installed) -> None:
    from ctprofd import __version__

    result = run_installed(installed, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"ctprofd {__version__} (revision feedface1234; Python "
                             f"{platform.python_version()} {platform.python_implementation()}; "
                             f"{platform.platform()})\n")


def test_build_info_reports_the_stamp(installed) -> None:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from ctprofd.export.revision import REVISION; print(REVISION)")
    result = subprocess.run([sys.executable, "-c", code, str(installed)], cwd=installed,
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "feedface1234", result.stderr
