#!/usr/bin/env bash
# Build jemalloc from Debian's source package, with debug info, into a cache dir.
#
#   scripts/build-jemalloc.sh [VARIANT]   (as root)
#
# Without VARIANT, the debug build the tests link against (env CTPROFD_JEMALLOC_DIR
# overrides its dir), default /var/cache/ctprofd/jemalloc-5.3.0:
#   lib/libjemalloc.a  lib/libjemalloc_pic.a  lib/libjemalloc.so.2  lib/libjemalloc.so -> libjemalloc.so.2
#   include/jemalloc/jemalloc.h  .ctprofd-complete (stamp, written last)
# Default configure options plus CFLAGS="-g -O2": symbols are the public names
# (malloc, mallctl, ...) and je_-prefixed internals (je_tsd_tls).
#
# With VARIANT, one build of the machine-code matrix (tests/test_code_matrix.py) in
# /var/cache/ctprofd/jemalloc-5.3.0-VARIANT, with -g (the tests compare against its DWARF);
# only the PIC objects are compiled, for lib/libjemalloc.so.2 and lib/libjemalloc_pic.a
# (static links use the latter):
#   gcc-O3 gcc-Os clang-O2   CFLAGS -O3 / -Os with gcc, -O2 with clang
#   prof                     --enable-prof
#   je                       --with-jemalloc-prefix=je_
#   rjem                     --with-jemalloc-prefix=_rjem_ --with-private-namespace=_rjem_
#                            (as Rust's tikv-jemalloc-sys configures it)
#   debian                   as Debian builds libjemalloc2 (debian/rules' configure options,
#                            dpkg-buildflags' CFLAGS/CPPFLAGS/LDFLAGS, which include -g) and
#                            --with-lg-vaddr=48 (configure would probe this CPU; Debian's
#                            build machine had 48-bit addresses): the reference build of the
#                            arena layout table for Debian's stripped library
#                            (scripts/arena_tables.py, ctprofd/resolve/arena_tables.json)
#   rjem-gd                  rjem's options plus --disable-initial-exec-tls: general-dynamic
#                            TLS, as a jemalloc inside a dlopen'ed module (polars) is built
#   rjem-gcc11 rjem-clang14  rjem's options, built as tikv-jemalloc-sys does for a release
#   rjem-clang15 rjem-clang16  (-O3 -ffunction-sections -fdata-sections, --disable-cxx) by
#                            gcc 11 (the compare with memory first), clang 14 (Debian 12's
#                            default clang) and 15 (the size added from the size-class
#                            table) and clang 16 (the counters read through the TSD's
#                            address: %fs:0 plus its offset, no %fs on the counters)
#   rjem-gcc10 rjem-gcc13    the same by gcc 10 and gcc 13, which Debian 12 does not package:
#                            built inside a debootstrap root of Debian 11 (bullseye, gcc 10)
#                            or Debian 13 (trixie, its gcc-13 package), cached in
#                            /var/cache/ctprofd/roots/jemalloc-SUITE-KEY (KEY hashes the suite
#                            and its packages); bullseye comes from archive.debian.org once
#                            deb.debian.org no longer has it. The library links on the host
#                            (trixie's glibc symbols it needs are 2.34 at most, Debian 12 has 2.36)
# Idempotent (a dir with the stamp is left alone) and atomic (built in a temp
# dir beside the target, then renamed into place, under a lock).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib.sh
source "$here/lib.sh"

JEMALLOC_VERSION=5.3.0
STAMP=.ctprofd-complete
variant=${1:-}
CC_JEMALLOC=gcc
CFLAGS_JEMALLOC="-g -O2"
CONFIGURE_ARGS=()
ROOT_SUITE="" ROOT_PACKAGES=() ROOT_MIRRORS=()  # set: build inside a debootstrap root
TARGETS=(lib/libjemalloc.so.2 lib/libjemalloc_pic.a)
FILES=(lib/libjemalloc_pic.a lib/libjemalloc.so.2 lib/libjemalloc.so include/jemalloc/jemalloc.h)
case $variant in
    "") TARGETS=(build_lib); FILES+=(lib/libjemalloc.a) ;;
    gcc-O3) CFLAGS_JEMALLOC="-g -O3" ;;
    gcc-Os) CFLAGS_JEMALLOC="-g -Os" ;;
    clang-O2) CC_JEMALLOC=clang ;;
    prof) CONFIGURE_ARGS=(--enable-prof) ;;
    je) CONFIGURE_ARGS=(--with-jemalloc-prefix=je_) ;;
    rjem) CONFIGURE_ARGS=(--with-jemalloc-prefix=_rjem_ --with-private-namespace=_rjem_) ;;
    debian) CONFIGURE_ARGS=(--with-lg-page=12 --with-lg-hugepage=21 --with-lg-vaddr=48
                            --enable-prof) ;;
    rjem-gd) CONFIGURE_ARGS=(--with-jemalloc-prefix=_rjem_ --with-private-namespace=_rjem_
                             --disable-initial-exec-tls) ;;
    rjem-gcc11 | rjem-clang14 | rjem-clang15 | rjem-clang16)
        CC_JEMALLOC=${variant#rjem-}; CC_JEMALLOC=${CC_JEMALLOC/gcc/gcc-}
        CC_JEMALLOC=${CC_JEMALLOC/clang/clang-}
        CFLAGS_JEMALLOC="-g -O3 -ffunction-sections -fdata-sections"
        CONFIGURE_ARGS=(--with-jemalloc-prefix=_rjem_ --with-private-namespace=_rjem_
                        --disable-cxx) ;;
    rjem-gcc10 | rjem-gcc13)
        CFLAGS_JEMALLOC="-g -O3 -ffunction-sections -fdata-sections"
        CONFIGURE_ARGS=(--with-jemalloc-prefix=_rjem_ --with-private-namespace=_rjem_
                        --disable-cxx)
        if [[ $variant == rjem-gcc10 ]]; then
            ROOT_SUITE=bullseye ROOT_PACKAGES=(build-essential)
            ROOT_MIRRORS=("$DEB_SRC_URI" http://archive.debian.org/debian)
        else
            CC_JEMALLOC=gcc-13
            ROOT_SUITE=trixie ROOT_PACKAGES=(build-essential gcc-13) ROOT_MIRRORS=("$DEB_SRC_URI")
        fi ;;
    *) die "unknown variant $variant (gcc-O3 gcc-Os clang-O2 prof je rjem debian" \
           "rjem-gd rjem-gcc10 rjem-gcc11 rjem-gcc13 rjem-clang14 rjem-clang15 rjem-clang16)" ;;
esac
if [[ -z $variant ]]; then
    DEST=${CTPROFD_JEMALLOC_DIR:-/var/cache/ctprofd/jemalloc-$JEMALLOC_VERSION}
else
    DEST=/var/cache/ctprofd/jemalloc-$JEMALLOC_VERSION-$variant
fi

is_complete() {
    local f
    [[ -f $1/$STAMP ]] || return 1
    for f in "${FILES[@]}"; do
        [[ -e $1/$f ]] || return 1
    done
}

if is_complete "$DEST"; then
    log "up to date: $DEST"
    exit 0
fi

require_root
umask 022
parent=$(dirname "$DEST")
name=$(basename "$DEST")
mkdir -p "$parent"
exec 9>"$parent/.$name.lock"
flock 9
if is_complete "$DEST"; then  # another run finished while we waited
    log "up to date: $DEST"
    exit 0
fi

# Tools: dpkg-source (dpkg-dev) unpacks and patches the source package.
tools=(dpkg-dev build-essential)
if [[ -n $ROOT_SUITE ]]; then
    tools+=(debootstrap debian-archive-keyring)  # the compiler is the root's
elif [[ $CC_JEMALLOC != gcc ]]; then
    tools+=("$CC_JEMALLOC")  # clang, gcc-11, clang-14..16: packages
fi
mapfile -t missing < <(missing_packages "${tools[@]}")
ensure_deb_src
if ((${#missing[@]})) || ! apt-cache showsrc jemalloc 2>/dev/null | grep -q '^Package: jemalloc'; then
    apt-get update
fi
if ((${#missing[@]})); then
    apt_install "${missing[@]}"
fi

work=$(mktemp -d "$parent/.$name.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
log "fetching the jemalloc source package into $work"
apt-get source -q jemalloc
src=$(find . -mindepth 1 -maxdepth 1 -type d -name 'jemalloc-*' | head -n1)
[[ -n $src ]] || die "apt-get source jemalloc produced no source tree"
version=$(dpkg-parsechangelog -l "$src/debian/changelog" -S Version)
[[ ${version%-*} == "$JEMALLOC_VERSION" ]] ||
    die "Debian ships jemalloc $version, this script expects $JEMALLOC_VERSION: update JEMALLOC_VERSION and the tests"

# The debootstrap root a ROOT_SUITE variant builds in, made once: prints its path.
build_root() {
    local roots=/var/cache/ctprofd/roots key root mirror
    key=$(printf '%s\n' "$ROOT_SUITE" "${ROOT_PACKAGES[@]}" | sha256sum | cut -c1-16)
    root=$roots/jemalloc-$ROOT_SUITE-$key
    mkdir -p "$roots"
    if [[ ! -f $root/.ctprofd-complete ]]; then
        rm -rf "$root"
        : >"$root.log"
        for mirror in "${ROOT_MIRRORS[@]}"; do
            log "debootstrap $ROOT_SUITE (${ROOT_PACKAGES[*]}) into $root from $mirror"
            if debootstrap --variant=minbase --include="$(IFS=,; echo "${ROOT_PACKAGES[*]}")" \
                    "$ROOT_SUITE" "$root" "$mirror" >>"$root.log" 2>&1; then
                rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*_Packages
                touch "$root/.ctprofd-complete"
                break
            fi
            rm -rf "$root"
        done
        [[ -f $root/.ctprofd-complete ]] ||
            die "cannot fetch Debian $ROOT_SUITE with ${ROOT_PACKAGES[*]} from" \
                "${ROOT_MIRRORS[*]} (debootstrap's output: $root.log)"
    fi
    echo "$root"
}

CPPFLAGS_JEMALLOC="" LDFLAGS_JEMALLOC=""
if [[ $variant == debian ]]; then
    CFLAGS_JEMALLOC=$(dpkg-buildflags --get CFLAGS)
    CPPFLAGS_JEMALLOC=$(dpkg-buildflags --get CPPFLAGS)
    LDFLAGS_JEMALLOC=$(dpkg-buildflags --get LDFLAGS)
fi
log "building jemalloc $version ${variant:-(debug)}: CC=$CC_JEMALLOC" \
    "CFLAGS=\"$CFLAGS_JEMALLOC\" ${CONFIGURE_ARGS[*]} (output shown on failure only)"
build=(./configure CC="$CC_JEMALLOC" CFLAGS="$CFLAGS_JEMALLOC" CPPFLAGS="$CPPFLAGS_JEMALLOC"
       LDFLAGS="$LDFLAGS_JEMALLOC" "${CONFIGURE_ARGS[@]}")
make=(make -j"$(nproc)" "${TARGETS[@]}")
if [[ -n $ROOT_SUITE ]]; then
    root=$(build_root)
    # The tree is built in the root and the results copied back from there.
    inside=$(mktemp -d "$root/tmp/jemalloc.XXXXXX")
    trap 'rm -rf "$work" "$inside"' EXIT
    cp -a "$src" "$inside/"
    src=$inside/$(basename "$src")
    runner=(chroot "$root" /usr/bin/env -C "${src#"$root"}" PATH=/usr/bin:/bin)
else
    runner=(env -C "$src")
fi
if ! ("${runner[@]}" "${build[@]}" && "${runner[@]}" "${make[@]}") >"$work/build.log" 2>&1; then
    tail -n 60 "$work/build.log" >&2
    die "jemalloc build failed"
fi

out="$work/out"
mkdir -p "$out/lib" "$out/include/jemalloc"
cp "$src/lib/libjemalloc_pic.a" "$src/lib/libjemalloc.so.2" "$out/lib/"
[[ -n $variant ]] || cp "$src/lib/libjemalloc.a" "$out/lib/"
ln -s libjemalloc.so.2 "$out/lib/libjemalloc.so"
cp "$src/include/jemalloc/jemalloc.h" "$out/include/jemalloc/"
printf 'jemalloc %s (Debian source %s)\nconfigure CC=%s CFLAGS="%s" %s\n' \
    "$JEMALLOC_VERSION" "$version" "$CC_JEMALLOC" "$CFLAGS_JEMALLOC" "${CONFIGURE_ARGS[*]}" \
    >"$out/$STAMP"
[[ -z $ROOT_SUITE ]] || echo "built in a Debian $ROOT_SUITE root: $root" >>"$out/$STAMP"

rm -rf "$DEST"  # an incomplete leftover (no stamp), if any
mv -T "$out" "$DEST"
log "installed jemalloc $version into $DEST"
