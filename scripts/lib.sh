# Helpers shared by scripts/*.sh (sourced, not run).

# shellcheck shell=bash
export DEBIAN_FRONTEND=noninteractive

# Debian's jemalloc source package comes from the bookworm (Debian 12) main archive.
DEB_MIRROR=http://deb.debian.org/debian
DEB_SRC_LIST=/etc/apt/sources.list.d/ctprofd-src.list
DEB_SRC_LINE="deb-src $DEB_MIRROR bookworm main"

# What scripts/setup.sh installs on every machine (python3-dev, gcc and libsystemd-dev build
# systemd-python's C extension).
SETUP_PACKAGES=(python3 python3-venv python3-dev gcc pkg-config libsystemd-dev)

log() { printf '[%s] %s\n' "${0##*/}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

require_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
}

# Add the deb-src entry unless it is there. Returns 0 if the file changed.
ensure_deb_src() {
    if grep -qxF "$DEB_SRC_LINE" "$DEB_SRC_LIST" 2>/dev/null; then
        return 1
    fi
    printf '%s\n' "$DEB_SRC_LINE" >"$DEB_SRC_LIST"
    log "added $DEB_SRC_LIST"
}

apt_install() {
    apt-get install -y --no-install-recommends "$@"
}

# Print the packages among "$@" that are not installed.
missing_packages() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
    done
}
