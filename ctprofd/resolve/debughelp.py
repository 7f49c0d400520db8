"""How to get the debug info of a binary on this distribution: its -dbgsym (or -debuginfo)
package from the distribution's debug archive, or the distribution's debuginfod server
through DEBUGINFOD_URLS; for a binary no package installed (a Rust tool from PyPI, a
project's own build), what would help instead. Only for messages to an operator; nothing
here is run for them."""

from __future__ import annotations

import shutil
import subprocess

OS_RELEASE = "/etc/os-release"
DPKG_TIMEOUT = 10.0  # seconds dpkg-query may take to say who owns a path

# ID (or an ID_LIKE entry) -> (how to install the debug package of PACKAGE, debuginfod server)
_DISTRIBUTIONS = {
    "debian": ("add the debug archive (deb http://deb.debian.org/debian-debug/ {codename}-debug "
               "main) and apt-get install {package}-dbgsym",
               "https://debuginfod.debian.net"),
    "ubuntu": ("add the ddebs archive (deb http://ddebs.ubuntu.com {codename} main) and "
               "apt-get install {package}-dbgsym",
               "https://debuginfod.ubuntu.com"),
    "fedora": ("dnf debuginfo-install {package}", "https://debuginfod.fedoraproject.org"),
    "arch": ("use the debug repositories' {package}-debug package",
             "https://debuginfod.archlinux.org"),
    "opensuse": ("zypper install {package}-debuginfo", "https://debuginfod.opensuse.org"),
}


def os_release(path: str = OS_RELEASE) -> dict[str, str]:
    """KEY=value pairs of os-release, unquoted; empty when unreadable."""
    fields = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep and key and not key.startswith("#"):
                    fields[key] = value.strip().strip("\"'")
    except OSError:
        pass
    return fields


def owning_package(path: str) -> str | None:
    """The Debian package that installed `path` (dpkg-query -S), or None."""
    if shutil.which("dpkg-query") is None:
        return None
    try:
        result = subprocess.run(["dpkg-query", "-S", path], capture_output=True, text=True,
                                timeout=DPKG_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0 or ":" not in result.stdout:
        return None
    return result.stdout.split(":", 1)[0].split(",")[0].strip() or None


NOT_PACKAGED = ("no package of the distribution installed {binary}, so no debug symbols "
                "package or debuginfod server has its DWARF: use the debug (unstripped) build "
                "of the same version from its project, or an offsets file from a machine that "
                "has one (ctprofd offsets export FILE BINARY there, ctprofd offsets import FILE "
                "here), or run ctprofd offsets on an unstripped build of the same version")


def how_to_get_debug_info(binary: str, release: dict[str, str] | None = None,
                          package: str | None = None) -> str:
    """One sentence saying how to get `binary`'s DWARF here: on a dpkg system, a binary
    that no package owns gets what would help instead of a package to install."""
    if package is None and shutil.which("dpkg-query") is not None:
        package = owning_package(binary)
        if package is None:
            return NOT_PACKAGED.format(binary=binary)
    release = os_release() if release is None else release
    ids = [release.get("ID", "")] + release.get("ID_LIKE", "").split()
    known = next((i for i in ids if i in _DISTRIBUTIONS), None)
    if known is None:
        return ("to get its debug info, install the distribution's debug symbols package "
                "for it, or point DEBUGINFOD_URLS (or debuginfod_urls in the configuration) at "
                "the distribution's debuginfod server")
    install, server = _DISTRIBUTIONS[known]
    package = package or "PACKAGE"  # no dpkg-query to ask
    codename = release.get("VERSION_CODENAME") or "CODENAME"
    return (f"to get its debug info on {release.get('PRETTY_NAME') or known}: "
            f"{install.format(package=package, codename=codename)}; or let ctprofd fetch it: "
            f"DEBUGINFOD_URLS={server} (or debuginfod_urls: [{server}] in the configuration)")
