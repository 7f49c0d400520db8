#!/usr/bin/env bash
# Build (once) the Debian 12 root filesystems the deployment tests run (as root; called by
# scripts/setup.sh --test):
#
#   scripts/test-roots.sh            build what is missing, print nothing else
#   scripts/test-roots.sh --print    also print KEY=VALUE lines the tests read
#
# - systemd root: debootstrap minbase with systemd as init and the packages scripts/setup.sh
#   installs anyway (so install-service.sh inside only adds what it must: procps and the venv),
#   booted by tests/test_systemd_boot.py with systemd-nspawn.
# - fresh root: debootstrap minbase with systemd as init and nothing else (no compiler, no
#   Python), where tests/test_deb.py installs the Debian package as an operator would.
# - base image: debootstrap minbase, trimmed like Debian's -slim images (no docs, man pages or
#   locales), imported into podman under the Dockerfile's base tag for tests/test_image.py
#   (no image registry is reachable from CI).
#
# Both are cached under $CTPROFD_ROOTS (default /var/cache/ctprofd/roots), keyed by a hash of
# the recipe (release, mirror, package lists and this script), so a changed recipe builds
# afresh and an unchanged one is reused; trees unused for a week are removed. Concurrent runs
# (two checkouts testing on one machine) take turns on a lock. A cold build takes about 3
# minutes. The key hashes the lines between the recipe markers below, the release, the mirror
# and the package list.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
# shellcheck source=scripts/lib.sh
source "$here/lib.sh"
require_root

print=0
case "${1:-}" in
    "") ;;
    --print) print=1 ;;
    *) echo "usage: $0 [--print]" >&2; exit 2 ;;
esac

roots=${CTPROFD_ROOTS:-/var/cache/ctprofd/roots}
suite=bookworm
# The host's own Debian mirror (a machine that reaches one for apt reaches it for debootstrap).
mirror=$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p; s/^deb  *\(http[^ ]*\/debian\) .*/\1/p' \
             /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n1 || true)
mirror=${mirror:-$DEB_SRC_URI}
base_tag=$(sed -n 's/^ARG DEBIAN=//p' "$repo/Dockerfile")
systemd_packages=(systemd systemd-sysv dbus "${SETUP_PACKAGES[@]}")
# The key: what goes into the trees (comments and bookkeeping elsewhere in this file are not).
recipe=$(printf '%s\n' "$suite" "$mirror" "${systemd_packages[@]}"
         sed -n '/^# >>> recipe/,/^# <<< recipe/p' "${BASH_SOURCE[0]}")
key=$(sha256sum <<<"$recipe" | cut -c1-16)
systemd_root=$roots/systemd-$key
# Keyed apart so that adding it left the other trees' key (and caches) as they were.
fresh_packages=(systemd systemd-sysv dbus)
fresh_root=$roots/fresh-$key-$(printf '%s\n' "${fresh_packages[@]}" | sha256sum | cut -c1-8)
base_tar=$roots/base-$key.tar

mkdir -p "$roots/debs"
exec 9>"$roots/.lock"
flock 9

# >>> recipe
debootstrap_into() {  # TARGET [--include=...]
    local target=$1
    shift
    rm -rf "$target.tmp"
    log "debootstrap $suite into $target ($mirror)"
    debootstrap --variant=minbase --cache-dir="$roots/debs" "$@" "$suite" "$target.tmp" "$mirror" \
        >"$target.log" 2>&1 || die "debootstrap failed, see $target.log"
    rm -rf "$target.tmp/var/cache/apt/archives/"*.deb "$target.tmp/var/lib/apt/lists/"*_Packages
    mv "$target.tmp" "$target"
}

if [[ ! -d $systemd_root ]]; then
    debootstrap_into "$systemd_root" --include="$(IFS=,; echo "${systemd_packages[*]}")"
    # The tests boot it with no console attached, and talk to it through nsenter.
    ln -sf /dev/null "$systemd_root/etc/systemd/system/console-getty.service"
    ln -sf /dev/null "$systemd_root/etc/systemd/system/getty@.service"
    echo ctprofd-test >"$systemd_root/etc/hostname"
fi

if [[ ! -f $base_tar ]]; then
    slim=$roots/base-$key
    debootstrap_into "$slim"
    # What debian:*-slim leaves out, and tells dpkg to leave out of later installs.
    cat >"$slim/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
    # and what it tells apt: no package cache or lists kept, no translations
    cat >"$slim/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' >"$slim/etc/apt/apt.conf.d/docker-no-languages"
    find "$slim/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    rm -rf "$slim/usr/share/man/"* "$slim/usr/share/info/"* "$slim/usr/share/locale/"* \
        "$slim/var/cache/apt/"*.bin "$slim/var/lib/apt/lists/"*
    tar -C "$slim" --numeric-owner -cf "$base_tar.tmp" .
    rm -rf "$slim"
    mv "$base_tar.tmp" "$base_tar"
fi
# <<< recipe

if [[ ! -d $fresh_root ]]; then
    debootstrap_into "$fresh_root" --include="$(IFS=,; echo "${fresh_packages[*]}")"
    ln -sf /dev/null "$fresh_root/etc/systemd/system/console-getty.service"
    ln -sf /dev/null "$fresh_root/etc/systemd/system/getty@.service"
    echo ctprofd-fresh >"$fresh_root/etc/hostname"
fi

imported=$(podman image inspect --format '{{.Id}} {{index .Labels "ctprofd.base-key"}}' \
               "$base_tag" 2>/dev/null || true)
if [[ ${imported#* } != "$key" ]]; then
    log "importing $base_tar as $base_tag"
    podman import --quiet --change "LABEL ctprofd.base-key=$key" --change 'CMD ["/bin/bash"]' \
        "$base_tar" "$base_tag" >/dev/null
    if [[ -n ${imported#* } ]]; then  # the previous import, now untagged
        podman rmi "${imported%% *}" >/dev/null 2>&1 || true
    fi
fi

# Trees of recipes unused for a week (another checkout may still use a recent one).
touch "$systemd_root" "$fresh_root" "$base_tar"
find "$roots" -mindepth 1 -maxdepth 1 \( -name 'systemd-*' -o -name 'fresh-*' -o -name 'base-*' \) \
    -mtime +7 \
    -exec rm -rf {} +
if ((print)); then
    echo "SYSTEMD_ROOT=$systemd_root"
    echo "FRESH_ROOT=$fresh_root"
    echo "BASE_TAG=$base_tag"
    echo "BASE_TAR=$base_tar"
fi
