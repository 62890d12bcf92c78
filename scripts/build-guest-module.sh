#!/usr/bin/env bash
# Build the vGPU's Linux driver (device-models/vgpu/guest/linux, umdev_vgpu.ko)
# for the e2e guest kernel: in the private root of scripts/setup-kbuild.sh
# (`chroot`, that kernel's own headers and compiler), never against the host's
# kernel. The module is copied to $CACHE/guest/kmod/umdev_vgpu.ko, where
# scripts/build-initramfs.sh picks it up.
#
# Cached: rebuilt only when the sources or the kbuild root changed (a hash is
# kept next to the module).
#
# Usage: scripts/build-guest-module.sh [--quiet] [--if-set-up]
#   --quiet      print only the module's path (last line) and errors
#   --if-set-up  do nothing (exit 0, print nothing) when scripts/setup-kbuild.sh
#                has not been run; scripts/build-initramfs.sh uses this
#
# Environment: UMDEV_CACHE (default $HOME/.cache/umdev)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${UMDEV_CACHE:-$HOME/.cache/umdev}
KROOT=$CACHE/kbuild-root
SRC=$REPO/device-models/vgpu/guest/linux
OUTDIR=$CACHE/guest/kmod
MODULE=umdev_vgpu
QUIET=0
IF_SET_UP=0
for arg in "$@"; do
    case $arg in
        --quiet) QUIET=1 ;;
        --if-set-up) IF_SET_UP=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-guest-module: unknown argument: $arg" >&2; exit 2 ;;
    esac
done
say() { if [ "$QUIET" = 0 ]; then echo "build-guest-module: $*" >&2; fi; }
die() { echo "build-guest-module: error: $*" >&2; exit 1; }

if [ ! -f "$KROOT/.umdev-kbuild" ]; then
    if [ "$IF_SET_UP" = 1 ]; then exit 0; fi
    die "no kbuild root at $KROOT: run scripts/setup-kbuild.sh first"
fi
field() { sed -n "s/^$1=//p" "$KROOT/.umdev-kbuild"; }
KREL=$(field release)
HEADERS=$(field headers)
[ -n "$KREL" ] && [ -f "$KROOT$HEADERS/Makefile" ] ||
    die "the kbuild root at $KROOT is incomplete: run scripts/setup-kbuild.sh"

SOURCES=("$SRC/$MODULE.c" "$SRC/${MODULE}_drm.h" "$SRC/Kbuild" "$SRC/Makefile")
for f in "${SOURCES[@]}"; do [ -f "$f" ] || die "missing $f"; done
HASH=$( { sha256sum "${SOURCES[@]}" | cut -d' ' -f1; cat "$KROOT/.umdev-kbuild"; } | sha256sum | cut -d' ' -f1)
OUT=$OUTDIR/$MODULE.ko
if [ -s "$OUT" ] && [ "$(cat "$OUT.hash" 2>/dev/null)" = "$HASH" ]; then
    say "up to date: $OUT ($KREL)"
    echo "$OUT"
    exit 0
fi

[ "$(id -u)" = 0 ] || die "needs root (chroot into $KROOT)"

# A fresh copy of the sources inside the root (no bind mount), built there (a
# directory of its own per run: concurrent runs do not collide).
BUILD=/build/$MODULE.$$
rm -rf "$KROOT$BUILD"
trap 'rm -rf "$KROOT$BUILD"' EXIT
mkdir -p "$KROOT$BUILD"
cp "${SOURCES[@]}" "$KROOT$BUILD/"
say "building $MODULE.ko for $KREL in $KROOT"
LOG=$CACHE/kmod-build.log
if ! chroot "$KROOT" /usr/bin/env -i PATH=/usr/bin:/usr/sbin HOME=/tmp LC_ALL=C \
        make -C "$HEADERS" M="$BUILD" modules >"$LOG" 2>&1; then
    cat "$LOG" >&2
    die "building $MODULE.ko failed (log above, also in $LOG)"
fi
if grep -q 'warning:' "$LOG"; then grep 'warning:' "$LOG" >&2; fi
[ -s "$KROOT$BUILD/$MODULE.ko" ] || die "make succeeded but left no $MODULE.ko"
VERMAGIC=$(chroot "$KROOT" /usr/bin/env -i PATH=/usr/bin:/usr/sbin modinfo -F vermagic "$BUILD/$MODULE.ko")
case $VERMAGIC in
    "$KREL "*) ;;
    *) die "$MODULE.ko has vermagic '$VERMAGIC', not for $KREL" ;;
esac
mkdir -p "$OUTDIR"
cp "$KROOT$BUILD/$MODULE.ko" "$OUT.new.$$"
mv "$OUT.new.$$" "$OUT"
echo "$HASH" > "$OUT.hash"
say "built $OUT (vermagic $VERMAGIC)"
echo "$OUT"
