"""scripts/lib.sh's ensure_deb_src against scratch apt directories (APT_CONFIG): it leaves a
configuration that declares deb-src alone, whichever way it is declared, adds a deb822 entry
signed by the archive keyring only when none is, and never leaves a configuration apt
rejects. Real apt, no network (`apt-get indextargets` reads the sources only)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
ONE_LINE_DEB = "deb http://deb.debian.org/debian bookworm main\n"
DEB822_DEB = (f"Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n"
              f"Components: main\nSigned-By: {KEYRING}\n")


class Apt:
    """A scratch apt configuration: etc/ (sources), state/, cache/; the host's dpkg status."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.parts = root / "etc" / "sources.list.d"
        for directory in (self.parts, root / "etc" / "apt.conf.d", root / "etc" / "preferences.d",
                          root / "state" / "lists" / "partial",
                          root / "cache" / "archives" / "partial"):
            directory.mkdir(parents=True)
        self.config = root / "apt.conf"
        self.config.write_text(f'Dir::Etc "{root}/etc/";\nDir::State "{root}/state/";\n'
                               f'Dir::State::status "/var/lib/dpkg/status";\n'
                               f'Dir::Cache "{root}/cache/";\n')
        self.env = {**os.environ, "APT_CONFIG": str(self.config)}

    def write(self, name: str, text: str) -> None:
        path = self.root / "etc" / name
        path.write_text(text)

    def files(self) -> dict[str, str]:
        return {str(p.relative_to(self.root / "etc")): p.read_text()
                for p in sorted((self.root / "etc").rglob("*")) if p.is_file()}

    def targets(self) -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "indextargets", "--no-release-info", "--format",
                               "$(CREATED_BY) $(REPO_URI) $(RELEASE)"], env=self.env,
                              capture_output=True, text=True)

    def ensure_deb_src(self) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", f"source {REPO}/scripts/lib.sh; ensure_deb_src"],
                              env=self.env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def apt(tmp_path) -> Apt:
    return Apt(tmp_path / "apt")


def accepted(apt: Apt) -> str:
    result = apt.targets()
    assert result.returncode == 0 and not result.stderr, result.stderr
    return result.stdout


@pytest.mark.parametrize("name, declared", [
    ("sources.list", ONE_LINE_DEB + "deb-src http://deb.debian.org/debian bookworm main\n"),
    ("sources.list.d/debian.sources",
     DEB822_DEB.replace("Types: deb\n", "Types: deb deb-src\n")),
    ("sources.list.d/src.sources",
     DEB822_DEB.replace("Types: deb\n", "Types: deb-src\n")),
])
def test_declared_deb_src_is_left_alone(apt, name, declared):
    apt.write(name, declared)
    before = apt.files()
    result = apt.ensure_deb_src()
    assert result.returncode == 0, result.stderr
    assert apt.files() == before
    assert "Sources http://deb.debian.org/debian/ bookworm" in accepted(apt)


@pytest.mark.parametrize("name, binary", [("sources.list", ONE_LINE_DEB),
                                          ("sources.list.d/debian.sources", DEB822_DEB)])
def test_missing_deb_src_is_added_as_deb822_with_the_keyring(apt, name, binary):
    apt.write(name, binary)
    result = apt.ensure_deb_src()
    assert result.returncode == 0, result.stderr
    added = apt.parts / "ctprofd-src.sources"
    assert added.read_text() == ("Types: deb-src\nURIs: http://deb.debian.org/debian\n"
                                 f"Suites: bookworm\nComponents: main\nSigned-By: {KEYRING}\n")
    assert "Sources http://deb.debian.org/debian/ bookworm" in accepted(apt)
    again = apt.files()
    assert apt.ensure_deb_src().returncode == 0
    assert apt.files() == again  # declared now: nothing more is written


def test_an_entry_apt_would_reject_is_not_left_behind(apt):
    """Another entry names the archive with another keyring: apt refuses both Signed-By
    values, so the entry is removed again and setup stops with apt's reason."""
    apt.write("sources.list",
              "deb [signed-by=/usr/share/keyrings/other.gpg] http://deb.debian.org/debian "
              "bookworm main\n")
    before = apt.files()
    result = apt.ensure_deb_src()
    assert result.returncode != 0
    assert "Conflicting values set for option Signed-By" in result.stderr, result.stderr
    assert apt.files() == before
    accepted(apt)


def test_a_configuration_apt_already_rejects_is_not_touched(apt):
    apt.write("sources.list", "deb-src http://deb.debian.org/debian bookworm main\n")
    apt.write("sources.list.d/x.sources",
              DEB822_DEB.replace("Types: deb\n", "Types: deb-src\n"))  # conflicting Signed-By
    before = apt.files()
    result = apt.ensure_deb_src()
    assert result.returncode != 0 and "apt rejects its sources already" in result.stderr
    assert apt.files() == before
