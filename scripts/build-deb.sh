#!/usr/bin/env bash
# Build the Debian package of this checkout with dpkg-deb (on Debian 12, as root):
#
#   scripts/build-deb.sh [OUTDIR]      writes OUTDIR/ctprofd_<version>_all.deb (default dist/)
#
# The package runs on Debian's own Python libraries (python3-prometheus-client,
# python3-pyelftools, ...): no compiler, no -dev package and no PyPI on the host it is installed
# on. It ships /usr/bin/ctprofd, the modules under /usr/lib/python3/dist-packages, the unit
# in /lib/systemd/system (packaging/systemd/ctprofd.service with the package's paths),
# /etc/ctprofd/ctprofd.yaml as a conffile, ctprofd(8) and the bash completion generated from
# the argparse parser (scripts/cli_docs.py), the rules, dashboard and mixin under
# /usr/share/ctprofd (their runbook links naming the runbook page in /usr/share/doc/ctprofd),
# and the docs, copyright and changelog. Its maintainer scripts (packaging/debian/) are
# debhelper's systemd snippets. Version: ctprofd.__version__; revision: `git rev-parse` of the
# checkout, stamped into ctprofd/export/REVISION.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
# shellcheck source=scripts/lib.sh
source "$here/lib.sh"

outdir=$(realpath -m "${1:-$repo/dist}")
# Run-time dependencies: Debian bookworm's versions are the floors (pyproject.toml has the same).
depends=(
    "python3 (>= 3.11)" "python3-prometheus-client (>= 0.16)" "python3-pyelftools (>= 0.29)"
    "python3-yaml (>= 6.0)" "python3-bcrypt (>= 3.2.2)" "python3-capstone (>= 4.0.2)"
    "python3-systemd (>= 235)" "adduser" "procps" "init-system-helpers (>= 1.52)"
)
# To build: what generating the man page imports, and dpkg-deb.
build_packages=(dpkg "${DEBIAN_LIBRARIES[@]}")
mapfile -t missing < <(missing_packages "${build_packages[@]}")
if ((${#missing[@]})); then
    require_root
    log "installing build dependencies: ${missing[*]}"
    apt_install "${missing[@]}"
fi

python=/usr/bin/python3
version=$("$python" -c 'import sys; sys.path.insert(0, sys.argv[1]); import ctprofd
print(ctprofd.__version__)' "$repo")
revision=$(git -C "$repo" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
# Dates from the commit, so that a rebuild of the same commit gives the same files.
epoch=$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)
export SOURCE_DATE_EPOCH=$epoch
# The Maintainer field: DEB_MAINTAINER, else the author of the commit built.
maintainer=${DEB_MAINTAINER:-$(git -C "$repo" log -1 --format='%an <%ae>' 2>/dev/null || true)}
[[ $maintainer == *'<'*@*'>' ]] || die "set DEB_MAINTAINER='Name <address>' (no git author here)"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
umask 022
mkdir -p "$root/DEBIAN"

# The modules, as a copy (default.yaml is a symlink in the tree), and the revision stamp
# (ctprofd/export/revision.py reads it where there is no git checkout).
pydir=$root/usr/lib/python3/dist-packages
mkdir -p "$pydir"
cp -rL "$repo/ctprofd" "$pydir/"
find "$pydir" \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +
echo "$revision" >"$pydir/ctprofd/export/REVISION"

install -D -m 0755 /dev/stdin "$root/usr/bin/ctprofd" <<'EOF'
#!/usr/bin/python3
"""ctprofd: exact per-process jemalloc allocation counters for Prometheus."""
import sys

from ctprofd.cli import main

sys.exit(main())
EOF

sed -e 's|/opt/ctprofd/bin/ctprofd|/usr/bin/ctprofd|' \
    -e 's|^Documentation=.*|Documentation=man:ctprofd(8) file:/usr/share/doc/ctprofd/daemon.md|' \
    -e 's|^# Installed by scripts/install-service.sh;|# Installed by the ctprofd package;|' \
    "$repo/packaging/systemd/ctprofd.service" >"$stage/ctprofd.service"
grep -q '^ExecStart=/usr/bin/ctprofd ' "$stage/ctprofd.service" ||
    die "packaging/systemd/ctprofd.service: ExecStart no longer names /opt/ctprofd/bin/ctprofd"
install -D -m 0644 "$stage/ctprofd.service" "$root/lib/systemd/system/ctprofd.service"
install -D -m 0644 "$repo/config/ctprofd.yaml" "$root/etc/ctprofd/ctprofd.yaml"

date=$(date -u -d "@$epoch" +%F)
mkdir -p "$root/usr/share/man/man8"
"$python" "$here/cli_docs.py" man "$date" | gzip -9n >"$root/usr/share/man/man8/ctprofd.8.gz"
install -D -m 0644 /dev/null "$root/usr/share/bash-completion/completions/ctprofd"
"$python" "$here/cli_docs.py" bash >"$root/usr/share/bash-completion/completions/ctprofd"

# Rules, alerts and dashboard as generated in the tree, and the mixin they are generated from,
# with the mixin's default runbook URL base (where install-service.sh installs the runbook
# page) replaced by the page this package installs: the alerts' links open on the host, and
# the packaged mixin still renders the packaged rules (tests/test_deb.py checks both).
share=$root/usr/share/ctprofd
mkdir -p "$share"
cp -r "$repo/packaging/prometheus" "$repo/packaging/grafana" "$repo/packaging/mixin" "$share/"
runbooks=$(sed -n "s|^ *runbookURLBase: '\(file://[^']*\)',\$|\1|p" \
    "$repo/packaging/mixin/config.libsonnet")
[[ $runbooks == file:///*/alerting.md ]] ||
    die "packaging/mixin/config.libsonnet: no default runbookURLBase file:///.../alerting.md"
packaged_runbooks=file:///usr/share/doc/ctprofd/alerting.md
grep -rlF --null "$runbooks" "$share" | xargs -0 -r sed -i "s|$runbooks|$packaged_runbooks|g"
if grep -rqF "$runbooks" "$share" ||
        ! grep -qF "$packaged_runbooks#" "$share/prometheus/ctprofd-rules.yml"; then
    die "the runbook URLs under /usr/share/ctprofd were not rewritten to the package's docs"
fi

doc=$root/usr/share/doc/ctprofd
install -D -m 0644 -t "$doc" "$repo/README.md" "$repo/docs/daemon.md" "$repo/docs/alerting.md" \
    "$repo/docs/allocator.md"
install -m 0644 "$repo/packaging/debian/copyright" "$doc/copyright"
printf '%s\n' "ctprofd ($version) unstable; urgency=medium" "" \
    "  * Built from revision $revision." "" \
    " -- $maintainer  $(date -u -R -d "@$epoch")" | gzip -9n >"$doc/changelog.gz"
install -D -m 0644 "$repo/packaging/debian/lintian-overrides" \
    "$root/usr/share/lintian/overrides/ctprofd"

for script in postinst prerm postrm; do
    install -m 0755 "$repo/packaging/debian/$script" "$root/DEBIAN/$script"
done
echo /etc/ctprofd/ctprofd.yaml >"$root/DEBIAN/conffiles"
(cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z |
     xargs -0 md5sum) >"$root/DEBIAN/md5sums"
installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: ctprofd
Version: $version
Architecture: all
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $(IFS=,; echo "${depends[*]}" | sed 's/,/, /g')
Section: admin
Priority: optional
Description: exact jemalloc allocation counters of every process for Prometheus
 ctprofd reads the cumulative allocation counters that jemalloc keeps per thread
 (thread.allocated and thread.deallocated) out of every jemalloc-linked process
 on the host, without the process's cooperation, and exports them as Prometheus
 metrics per process, service or systemd unit: bytes allocated, freed and live.
 .
 The package runs ctprofd as a hardened systemd service, and ships Prometheus
 rules and alerts and a Grafana dashboard under /usr/share/ctprofd.
EOF

find "$root" -exec touch --no-dereference -d "@$epoch" {} +
mkdir -p "$outdir"
deb=$outdir/ctprofd_${version}_all.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
log "built $deb (revision $revision)"
echo "$deb"
