#!/usr/bin/env bash
# Install ctprofd as a systemd service on Debian 12 (as root):
#
#   scripts/install-service.sh
#
# Runs scripts/setup.sh to get the apt packages and a venv at /opt/ctprofd (the path the
# unit's ExecStart names), then installs ctprofd into it as a copy (not an editable link to
# this checkout), the system user ctprofd-parser, the unit into /etc/systemd/system, the
# default configuration into /etc/ctprofd/ctprofd.yaml (an existing one is kept), and reloads
# systemd.
# Safe to re-run; start with `systemctl enable --now ctprofd`.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
# shellcheck source=scripts/lib.sh
source "$here/lib.sh"
require_root

prefix=/opt/ctprofd
config=/etc/ctprofd/ctprofd.yaml

CTPROFD_VENV=$prefix "$here/setup.sh"
# The unit's ExecReload runs /bin/kill (procps; a minimal Debian has none).
apt_install procps
log "installing ctprofd into $prefix as a copy of $repo"
"$prefix/bin/python" -m pip install --progress-bar off --no-deps --force-reinstall "$repo"

# The parser worker's own identity when ctprofd runs as root outside the unit (the unit's
# DynamicUser is already one nothing else shares): see docs/daemon.md, "The parser worker".
if ! getent passwd ctprofd-parser >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ctprofd-parser
fi
install -D -m 0644 "$repo/packaging/systemd/ctprofd.service" /etc/systemd/system/ctprofd.service
install -D -m 0644 "$repo/docs/daemon.md" "$prefix/share/doc/ctprofd/daemon.md"
if [[ -e $config ]]; then
    log "keeping $config"
else
    install -D -m 0644 "$repo/config/ctprofd.yaml" "$config"
fi
"$prefix/bin/ctprofd" check-config "$config"

if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    log "installed; start with: systemctl enable --now ctprofd"
else
    log "installed, but systemd is not running here: the unit is not loaded"
fi
