#!/usr/bin/env bash
# Prepare a Debian 12 machine (as root) to run ctprofd, or with --test to test it.
#
#   scripts/setup.sh [--test]
#
# Installs the apt packages, creates the venv ${CTPROFD_VENV:-<repo>/.venv} with
# ctprofd installed editable ([systemd] extra; [test] with --test). With --test, it also
# creates the venv <repo>/.venv-debian on Debian 12's own packages of ctprofd's libraries (the
# floors; tests/test_debian_libraries.py runs tests in it), builds the debug jemalloc the
# tests link against and the machine-code matrix's builds (scripts/build-jemalloc.sh
# [VARIANT]), and the root filesystems of the deployment tests (scripts/test-roots.sh).
# Safe to re-run.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
# shellcheck source=scripts/lib.sh
source "$here/lib.sh"

test_mode=0
case "${1:-}" in
    "") ;;
    --test) test_mode=1 ;;
    *) echo "usage: $0 [--test]" >&2; exit 2 ;;
esac
require_root

packages=("${SETUP_PACKAGES[@]}")
if ((test_mode)); then
    packages+=(build-essential dpkg-dev prometheus prometheus-process-exporter systemd strace
               gdb debuginfod elfutils binutils pahole redis-server varnish clang libjemalloc2
               lld  # links the big-endian objects of tests/unit/test_dwarf_offsets.py
               # build-jemalloc.sh's rjem-gcc11 and rjem-clang14/15/16 compilers (its rjem-gcc10
               # and rjem-gcc13 are built in debootstrap roots of Debian 11 and 13)
               gcc-11 clang-14 clang-15 clang-16
               util-linux libcap2-bin procps openssl curl systemd-container debootstrap podman
               lintian groff-base bash-completion "${DEBIAN_LIBRARIES[@]}")
    ensure_deb_src  # for `apt-get source jemalloc`, before the one update
fi
log "installing apt packages"
apt-get update
apt_install "${packages[@]}"

# The venv is built on Debian's /usr/bin/python3, not on whatever python3 comes
# first on PATH (a pyenv shim on some dev boxes): it is the interpreter a fresh
# Debian 12 has, python3-dev provides its headers for systemd-python's C
# extension, and CI and developers then get the same Python.
python=/usr/bin/python3
[[ -x $python ]] || python=$(command -v python3)
venv=${CTPROFD_VENV:-$repo/.venv}
home=$(dirname "$python")
if [[ -x $venv/bin/python ]] && grep -qxF "home = $home" "$venv/pyvenv.cfg" 2>/dev/null \
        && "$venv/bin/python" -c '' 2>/dev/null; then
    log "reusing venv $venv"
else
    log "creating venv $venv on $python"
    "$python" -m venv --clear "$venv"
fi

extra=systemd
((test_mode)) && extra=test
log "installing ctprofd[$extra] into $venv"
"$venv/bin/python" -m pip install --progress-bar off -e "$repo[$extra]"
"$venv/bin/python" -c 'import systemd.journal' ||
    die "systemd-python is not importable in $venv"

# pinned_venv DIR REQUIREMENTS: a venv at DIR with REQUIREMENTS installed, made anew only
# when the requirements changed since it was made
pinned_venv() {
    local dir=$1 requirements=$2
    if ! cmp -s "$requirements" "$dir/requirements.txt"; then
        log "installing $(basename "$requirements") from PyPI into $dir"
        rm -rf "$dir"
        "$python" -m venv "$dir"
        "$dir/bin/python" -m pip install --progress-bar off -r "$requirements"
        cp "$requirements" "$dir/requirements.txt"
    fi
}

if ((test_mode)); then
    # ctprofd's libraries as Debian 12 ships them (the .deb's dependencies), the test tools
    # from the index: ctprofd editable without its dependencies, pytest, pytest-timeout and hypothesis only.
    debian_venv=$repo/.venv-debian
    log "creating $debian_venv on Debian's python3-* packages"
    /usr/bin/python3 -m venv --clear --system-site-packages "$debian_venv"
    "$debian_venv/bin/python" -m pip install --progress-bar off --no-deps -e "$repo"
    "$debian_venv/bin/python" -m pip install --progress-bar off pytest pytest-timeout hypothesis
    for variant in "" gcc-O3 gcc-Os clang-O2 prof je rjem debian rjem-gd rjem-gcc10 rjem-gcc11 \
                   rjem-gcc13 rjem-clang14 rjem-clang15 rjem-clang16; do
        "$here/build-jemalloc.sh" $variant
    done
    # jemalloc users from PyPI, read by the tests (tests/test_dynamic_tls.py,
    # tests/test_rust_tools.py): venvs of their own, so that ctprofd's is not touched
    pinned_venv /var/cache/ctprofd/targets-venv "$repo/tests/targets-requirements.txt"
    pinned_venv /var/cache/ctprofd/rust-tools-venv "$repo/tests/rust-tools-requirements.txt"
    "$here/test-roots.sh"
fi
log "done"
