"""The operator's hint for a binary without debug info (resolve.debughelp): os-release read
as systemd documents it, the owning package asked of this host's real dpkg, and the
sentence for each distribution, for one deriving from another (ID_LIKE), for an unknown
one, and for a binary no package installed."""

from __future__ import annotations

import locale
import subprocess
from pathlib import Path

import pytest

from ctprofd.resolve import debughelp
from ctprofd.resolve.debughelp import (NOT_PACKAGED, how_to_get_debug_info, os_release,
                                       owning_package)

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
DEBIAN = {"ID": "debian", "VERSION_CODENAME": "bookworm",
          "PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)"}


@pytest.fixture
def no_dpkg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A host without dpkg-query: nothing on PATH."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))


def test_os_release_pairs_unquoted_comments_and_other_lines_left_out(tmp_path: Path):
    path = tmp_path / "os-release"
    path.write_bytes(b'# a comment\n#ID=commented\nID=debian\nPRETTY_NAME="Debian 12 (x)"\n'
                     b"VERSION_CODENAME='bookworm'\n  NAME=Deb \n\nno equals sign\n"
                     b"=no key\nEMPTY=\nBAD=\xff\nVARIANT=\"X edition X\"\nURL=a=b\n")
    assert os_release(str(path)) == {"ID": "debian", "PRETTY_NAME": "Debian 12 (x)",
                                     "VERSION_CODENAME": "bookworm", "NAME": "Deb",
                                     "EMPTY": "", "BAD": "\ufffd", "VARIANT": "X edition X",
                                     "URL": "a=b"}


def test_os_release_is_read_as_utf_8_whatever_the_locale(tmp_path: Path):
    path = tmp_path / "os-release"
    path.write_bytes('PRETTY_NAME="Débian"\n'.encode())
    before = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")  # a daemon started in an ASCII locale
    try:
        assert os_release(str(path)) == {"PRETTY_NAME": "Débian"}
    finally:
        locale.setlocale(locale.LC_CTYPE, before)


def test_an_unreadable_os_release_is_empty(tmp_path: Path):
    assert os_release(str(tmp_path / "missing")) == {}
    assert os_release(str(tmp_path)) == {}  # a directory


def test_os_release_by_default_is_this_hosts():
    assert os_release()["ID"] == "debian"
    assert os_release() == os_release("/etc/os-release")


def test_the_package_owning_a_file_is_asked_of_dpkg():
    assert owning_package(LIBC) == "libc6"  # "libc6:amd64: /lib/...": the name alone


def test_a_path_several_packages_own_names_one_of_them():
    package = owning_package("/usr/share/man")
    assert package and "," not in package and ":" not in package and package == package.strip()
    listed = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True,
                            check=True).stdout.split("\n")
    assert "/usr/share/man" in listed


def test_no_package_for_a_file_no_package_installed(tmp_path: Path):
    (tmp_path / "tool").write_bytes(b"\x7fELF")
    assert owning_package(str(tmp_path / "tool")) is None


def test_a_dpkg_query_that_hangs_is_given_up_on(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dpkg-query").write_text("#!/bin/sh\nexec /bin/sleep 60\n")  # a dpkg that hangs
    (bin_dir / "dpkg-query").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(debughelp, "DPKG_TIMEOUT", 0.05)
    assert owning_package(LIBC) is None


def test_no_package_without_dpkg(no_dpkg: None):
    assert owning_package(LIBC) is None


def test_debian_names_the_debug_archive_of_its_release_and_its_debuginfod():
    assert how_to_get_debug_info(LIBC, DEBIAN) == (
        "to get its debug info on Debian GNU/Linux 12 (bookworm): add the debug archive "
        "(deb http://deb.debian.org/debian-debug/ bookworm-debug main) and apt-get install "
        "libc6-dbgsym; or let ctprofd fetch it: DEBUGINFOD_URLS=https://debuginfod.debian.net "
        "(or debuginfod_urls: [https://debuginfod.debian.net] in the configuration)")


def test_by_default_this_hosts_release_is_read():
    sentence = how_to_get_debug_info(LIBC)
    assert sentence == how_to_get_debug_info(LIBC, os_release(), "libc6")
    assert sentence.startswith(f"to get its debug info on {os_release()['PRETTY_NAME']}: ")


def test_a_binary_no_package_installed_gets_what_would_help_instead(tmp_path: Path):
    tool = str(tmp_path / "tool")
    assert how_to_get_debug_info(tool, DEBIAN) == NOT_PACKAGED.format(binary=tool)
    assert NOT_PACKAGED.format(binary=tool).startswith(
        f"no package of the distribution installed {tool}, so")


@pytest.mark.parametrize("release, sentence", [
    ({"ID": "ubuntu", "VERSION_CODENAME": "noble", "PRETTY_NAME": "Ubuntu 24.04"},
     "to get its debug info on Ubuntu 24.04: add the ddebs archive (deb "
     "http://ddebs.ubuntu.com noble main) and apt-get install zlib1g-dbgsym; or let ctprofd "
     "fetch it: DEBUGINFOD_URLS=https://debuginfod.ubuntu.com (or debuginfod_urls: "
     "[https://debuginfod.ubuntu.com] in the configuration)"),
    ({"ID": "fedora"},
     "to get its debug info on fedora: dnf debuginfo-install zlib1g; or let ctprofd fetch "
     "it: DEBUGINFOD_URLS=https://debuginfod.fedoraproject.org (or debuginfod_urls: "
     "[https://debuginfod.fedoraproject.org] in the configuration)"),
    ({"ID": "arch", "PRETTY_NAME": "Arch Linux"},
     "to get its debug info on Arch Linux: use the debug repositories' zlib1g-debug package; "
     "or let ctprofd fetch it: DEBUGINFOD_URLS=https://debuginfod.archlinux.org (or "
     "debuginfod_urls: [https://debuginfod.archlinux.org] in the configuration)"),
    ({"ID": "opensuse-leap", "ID_LIKE": "suse opensuse", "PRETTY_NAME": "openSUSE Leap 15.5"},
     "to get its debug info on openSUSE Leap 15.5: zypper install zlib1g-debuginfo; or let "
     "ctprofd fetch it: DEBUGINFOD_URLS=https://debuginfod.opensuse.org (or debuginfod_urls: "
     "[https://debuginfod.opensuse.org] in the configuration)"),
    ({"ID": "linuxmint", "ID_LIKE": "ubuntu debian", "PRETTY_NAME": "Linux Mint 22"},
     "to get its debug info on Linux Mint 22: add the ddebs archive (deb "
     "http://ddebs.ubuntu.com CODENAME main) and apt-get install zlib1g-dbgsym; or let "
     "ctprofd fetch it: DEBUGINFOD_URLS=https://debuginfod.ubuntu.com (or debuginfod_urls: "
     "[https://debuginfod.ubuntu.com] in the configuration)"),
    ({"ID": "gentoo"},
     "to get its debug info, install the distribution's debug symbols package for it, or "
     "point DEBUGINFOD_URLS (or debuginfod_urls in the configuration) at the distribution's "
     "debuginfod server"),
    ({}, "to get its debug info, install the distribution's debug symbols package for it, or "
     "point DEBUGINFOD_URLS (or debuginfod_urls in the configuration) at the distribution's "
     "debuginfod server"),
])
def test_each_distribution_its_package_and_its_debuginfod(release: dict[str, str],
                                                          sentence: str):
    assert how_to_get_debug_info("/usr/lib/libz.so.1", release, "zlib1g") == sentence


def test_without_dpkg_the_package_is_left_for_the_operator_to_name(no_dpkg: None):
    assert how_to_get_debug_info(LIBC, {"ID": "fedora"}) == (
        "to get its debug info on fedora: dnf debuginfo-install PACKAGE; or let ctprofd fetch "
        "it: DEBUGINFOD_URLS=https://debuginfod.fedoraproject.org (or debuginfod_urls: "
        "[https://debuginfod.fedoraproject.org] in the configuration)")
