#!/usr/bin/env bash
# Install, upgrade or remove ctprofd as a systemd service on Debian 12 (as root):
#
#   scripts/install-service.sh               install, or upgrade to this checkout
#   scripts/install-service.sh --uninstall   stop it and remove what the install added
#   scripts/install-service.sh --purge       the same, and its configuration, cache and state
#
# Install runs scripts/setup.sh to get the apt packages and a venv at /opt/ctprofd (the path
# the unit's ExecStart names), installs procps (the unit's ExecReload runs /bin/kill), then
# ctprofd into the venv as a copy (not an editable link to this checkout), the system user
# ctprofd-parser, the unit into /etc/systemd/system, the default configuration into
# /etc/ctprofd/ctprofd.yaml (an existing one is kept), and reloads systemd. Safe to re-run:
# that is the upgrade, followed by `systemctl restart ctprofd`. Start with
# `systemctl enable --now ctprofd`. Uninstall leaves the apt packages (other software may use
# them).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
# shellcheck source=scripts/lib.sh
source "$here/lib.sh"
require_root

prefix=/opt/ctprofd
config=/etc/ctprofd/ctprofd.yaml
unit=/etc/systemd/system/ctprofd.service
systemd_running() { [[ -d /run/systemd/system ]]; }

uninstall() {  # PURGE (0 or 1)
    if systemd_running; then
        systemctl disable --now ctprofd.service 2>/dev/null || true
    fi
    rm -rf "$unit" "$prefix"
    if getent passwd ctprofd-parser >/dev/null; then
        userdel ctprofd-parser
    fi
    log "removed $unit, $prefix and the user ctprofd-parser"
    if (($1)); then
        # DynamicUser= keeps the cache and state under /var/{cache,lib}/private
        rm -rf "$(dirname "$config")" "$unit.d" /var/cache/ctprofd /var/lib/ctprofd \
            /var/cache/private/ctprofd /var/lib/private/ctprofd
        log "removed the configuration, drop-ins, cache and state"
    fi
    if systemd_running; then
        systemctl daemon-reload
        systemctl reset-failed ctprofd.service 2>/dev/null || true
    fi
}

case "${1:-}" in
    "") ;;
    --uninstall) uninstall 0; exit 0 ;;
    --purge) uninstall 1; exit 0 ;;
    *) echo "usage: $0 [--uninstall|--purge]" >&2; exit 2 ;;
esac

CTPROFD_VENV=$prefix "$here/setup.sh"
apt_install procps
log "installing ctprofd into $prefix as a copy of $repo"
"$prefix/bin/python" -m pip install --progress-bar off --no-deps --force-reinstall "$repo"

# The parser worker's own identity when ctprofd runs as root outside the unit (the unit's
# DynamicUser is already one nothing else shares): see docs/daemon.md, "The parser worker".
if ! getent passwd ctprofd-parser >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ctprofd-parser
fi
install -D -m 0644 "$repo/packaging/systemd/ctprofd.service" "$unit"
install -D -m 0644 "$repo/docs/daemon.md" "$prefix/share/doc/ctprofd/daemon.md"
# the alerts' default runbook_url (packaging/mixin/config.libsonnet, runbookURLBase)
install -D -m 0644 "$repo/docs/alerting.md" "$prefix/share/doc/ctprofd/alerting.md"
# what the fragmentation runbook links to
install -D -m 0644 "$repo/docs/allocator.md" "$prefix/share/doc/ctprofd/allocator.md"
if [[ -e $config ]]; then
    log "keeping $config"
else
    install -D -m 0644 "$repo/config/ctprofd.yaml" "$config"
fi
"$prefix/bin/ctprofd" check-config "$config"

if systemd_running; then
    systemctl daemon-reload
    log "installed; start with: systemctl enable --now ctprofd (after an upgrade: systemctl restart ctprofd)"
else
    log "installed, but systemd is not running here: the unit is not loaded"
fi
