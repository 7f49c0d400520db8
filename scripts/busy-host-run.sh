#!/bin/bash
# The suite on a busy, shared host (issue 28): the README's test command run while a second
# `ctprofd run` reads the whole host every second and a CPU hog spins on each core.
#
#   scripts/busy-host-run.sh [PYTEST_ARGS...]
#
# Run from a checkout after `scripts/setup.sh --test`, as root. Prints pytest's summary and
# exits with pytest's status; the second daemon and the hogs are stopped on any exit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"
require_root
cd "$repo"
[[ -x .venv/bin/python ]] || die "no .venv: run scripts/setup.sh --test first"

scratch=$(mktemp -d /tmp/ctprofd-busy-host.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$scratch"
}
trap cleanup EXIT

cat >"$scratch/ctprofd.yaml" <<EOF
listen: "127.0.0.1:0"
interval: 1
cache_dir: $scratch/cache
state_dir: $scratch/state
EOF
.venv/bin/python -m ctprofd run --config "$scratch/ctprofd.yaml" 2>"$scratch/daemon.log" &
pids+=($!)
for _ in $(seq "$(nproc)"); do
    sh -c 'while :; do :; done' &
    pids+=($!)
done
log "second ctprofd (pid ${pids[0]}) and $(nproc) CPU hogs running; log in $scratch/daemon.log"
status=0
.venv/bin/python -m pytest "$@" || status=$?
kill -0 "${pids[0]}" 2>/dev/null || { log "the second ctprofd exited early:"; cat "$scratch/daemon.log" >&2; }
exit "$status"
