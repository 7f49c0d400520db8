# Helpers shared by scripts/*.sh (sourced, not run).

# shellcheck shell=bash
export DEBIAN_FRONTEND=noninteractive

# Debian's jemalloc source package comes from the bookworm (Debian 12) main archive.
DEB_SRC_URI=http://deb.debian.org/debian
DEB_SRC_SUITE=bookworm
DEB_SRC_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

# What scripts/setup.sh installs on every machine (python3-dev, gcc and libsystemd-dev build
# systemd-python's C extension); scripts/test-roots.sh puts them in the systemd test root.
SETUP_PACKAGES=(python3 python3-venv python3-dev gcc pkg-config libsystemd-dev)

log() { printf '[%s] %s\n' "${0##*/}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

require_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
}

# Make `apt-get source jemalloc` possible, leaving apt as it was found whenever it can:
#  - `apt-cache showsrc jemalloc` finds it: nothing to do;
#  - a deb-src entry for bookworm is declared (one-line or deb822, any mirror) but not
#    fetched yet: nothing to write, the caller's `apt-get update` fetches it;
#  - else add sources.list.d/ctprofd-src.sources, a deb822 entry signed by the archive
#    keyring, and check that apt still reads its sources; if it does not (e.g. another entry
#    names the archive with another Signed-By), remove it again and stop with apt's reason.
# Honours APT_CONFIG (the tests point it at a scratch apt directory).
ensure_deb_src() {
    local parts file errors
    if [[ -n $(apt-cache showsrc jemalloc 2>/dev/null) ]]; then
        return 0
    fi
    if ! errors=$(apt-get indextargets --no-release-info 2>&1 >/dev/null) || [[ -n $errors ]]; then
        die "apt rejects its sources already, not adding a deb-src entry: $errors"
    fi
    if apt-get indextargets --no-release-info --format '$(CREATED_BY) $(RELEASE)' |
            grep -qx "Sources $DEB_SRC_SUITE"; then
        log "a deb-src entry for $DEB_SRC_SUITE is declared; apt-get update fetches it"
        return 0
    fi
    eval "$(apt-config shell parts Dir::Etc::sourceparts/d)"
    file="${parts%/}/ctprofd-src.sources"
    printf 'Types: deb-src\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
        "$DEB_SRC_URI" "$DEB_SRC_SUITE" "$DEB_SRC_KEYRING" >"$file"
    if ! errors=$(apt-get indextargets --no-release-info 2>&1 >/dev/null) || [[ -n $errors ]]; then
        rm -f "$file"
        die "apt rejects a deb-src entry for $DEB_SRC_URI $DEB_SRC_SUITE signed by" \
            "$DEB_SRC_KEYRING ($errors); left apt as it was: add deb-src to the entry that" \
            "names the archive"
    fi
    log "added $file"
}

# Debian 12's own packages of ctprofd's libraries: what the .deb depends on
# (scripts/build-deb.sh) and what the tests' second venv runs on (scripts/setup.sh --test).
DEBIAN_LIBRARIES=(python3-prometheus-client python3-pyelftools python3-yaml python3-bcrypt
                  python3-capstone python3-systemd)

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
