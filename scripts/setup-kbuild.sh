#!/usr/bin/env bash
# Set up a private root for building out-of-tree kernel modules for the e2e
# guest kernel (the one scripts/setup-e2e.sh installed), never for the host's:
#   - that kernel's own Debian headers (linux-headers-<release>,
#     linux-headers-<...>-common, linux-kbuild-<...>, exactly the version of the
#     guest's linux-image package),
#   - the compiler that built it (Debian's gcc-14; checked against the kernel's
#     CONFIG_CC_VERSION_TEXT), binutils, make, libc6-dev,
#   - the tools kbuild runs (bash, dash, coreutils, sed, grep, gawk, findutils,
#     diffutils, kmod),
# with their dependencies resolved by the private apt of setup-e2e.sh (same
# configuration, package lists and .deb cache, scripts/lib-private-apt.sh) and
# unpacked with dpkg-deb into $CACHE/kbuild-root. Builds run with
# `chroot $CACHE/kbuild-root` (scripts/build-guest-module.sh); the root gets
# its own /dev/null, /dev/zero, /dev/urandom (mknod) and no bind mounts.
#
# Cached: a second run checks the root and does nothing else. Needs root
# (chroot, mknod) and a complete scripts/setup-e2e.sh set-up.
#
# Usage: scripts/setup-kbuild.sh [--quiet]
#   --quiet     print only errors (and, without --quiet, what was done)
#
# Environment:
#   UMDEV_CACHE          cache directory (default $HOME/.cache/umdev)
#   UMDEV_DEBIAN_MIRROR, UMDEV_DEBIAN_SECURITY_MIRROR  as for setup-e2e.sh
#
# Output: KBUILD_ROOT=<root> and KERNEL_RELEASE=<release> (without --quiet);
# the root's /.umdev-kbuild holds release=, version=, headers= (the headers
# directory inside the root) and cc=.
set -euo pipefail

CACHE=${UMDEV_CACHE:-$HOME/.cache/umdev}
MIRROR=${UMDEV_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${UMDEV_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# Bump when the layout of the root changes.
LAYOUT=1

QUIET=0
for arg in "$@"; do
    case $arg in
        --quiet) QUIET=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup-kbuild: unknown argument: $arg" >&2; exit 2 ;;
    esac
done
say() { if [ "$QUIET" = 0 ]; then echo "setup-kbuild: $*"; fi; }
die() { echo "setup-kbuild: error: $*" >&2; exit 1; }

APTROOT=$CACHE/apt
DEBS=$CACHE/debs
GUEST=$CACHE/guest
KROOT=$CACHE/kbuild-root
E2E_STAMP=$CACHE/setup.stamp
INFO=.umdev-kbuild

# ------------------------------------------------------- the guest kernel --

[ -f "$E2E_STAMP" ] && [ -s "$GUEST/.kernel-deb" ] ||
    die "no e2e set-up at $CACHE: run scripts/setup-e2e.sh first"
# "linux-image-6.12.118+deb13-amd64_6.12.118-1_amd64.deb ..." -> package, version
KIMG=$(tr ' ' '\n' < "$GUEST/.kernel-deb" | grep '^linux-image-[0-9]' | head -n1 || true)
[ -n "$KIMG" ] || die "no linux-image package named in $GUEST/.kernel-deb"
KPKG=${KIMG%%_*}
KVER=$(echo "$KIMG" | cut -d_ -f2 | sed 's/%3a/:/g')
KREL=${KPKG#linux-image-}
KREL=${KREL%-unsigned}
[ -n "$KVER" ] && [ -n "$KREL" ] || die "cannot parse the kernel package name $KIMG"
HEADERS=/usr/src/linux-headers-$KREL

# ------------------------------------------------------------------ cache --

info_field() { sed -n "s/^$1=//p" "$KROOT/$INFO" 2>/dev/null; }
root_ok() {
    [ "$(info_field layout)" = "$LAYOUT" ] && [ "$(info_field release)" = "$KREL" ] &&
        [ "$(info_field version)" = "$KVER" ] && [ -f "$KROOT$HEADERS/Makefile" ] &&
        [ -c "$KROOT/dev/null" ] &&
        chroot "$KROOT" /usr/bin/env -i PATH=/usr/bin:/usr/sbin "$(info_field cc)" --version >/dev/null 2>&1
}

[ "$(id -u)" = 0 ] || die "needs root (chroot and mknod into $KROOT)"
command -v chroot >/dev/null 2>&1 || die "chroot is missing (coreutils)"
if root_ok; then
    say "kbuild root for $KREL ($KVER) at $KROOT is complete"
    if [ "$QUIET" = 0 ]; then echo "KBUILD_ROOT=$KROOT"; echo "KERNEL_RELEASE=$KREL"; fi
    exit 0
fi

for t in apt-get apt-cache dpkg-deb mknod; do
    command -v "$t" >/dev/null 2>&1 || die "'$t' is missing (this script expects a Debian host)"
done
[ -r "$KEYRING" ] || die "$KEYRING missing: install debian-archive-keyring"
START=$(date +%s)

# The suites setup-e2e.sh used (its sources.list is rewritten identically, so
# its package lists stay valid).
read -r SUITE QEMU_SUITE < <(sed -n 's/^suites=//p' "$E2E_STAMP")
[ -n "${SUITE:-}" ] && [ -n "${QEMU_SUITE:-}" ] || die "no suites= in $E2E_STAMP: run scripts/setup-e2e.sh"
# shellcheck source=scripts/lib-private-apt.sh
. "$(dirname "$0")/lib-private-apt.sh"
setup_private_apt
if ! ls "$APTROOT"/lists/*_InRelease >/dev/null 2>&1 ||
    ! cmp -s "$APTROOT/etc/sources.list" "$APTROOT/lists.sources"; then
    say "downloading Debian package lists (private) from $MIRROR"
    papt_get update >"$CACHE/kbuild-apt-update.log" 2>&1 ||
        { cat "$CACHE/kbuild-apt-update.log" >&2; die "apt-get update (private lists) failed"; }
    cp "$APTROOT/etc/sources.list" "$APTROOT/lists.sources"
fi

# ------------------------------------------------------------ the packages --

# The headers' own dependencies name the matching common headers, kbuild and
# compiler packages.
papt_cache show "$KPKG=$KVER" >/dev/null 2>&1 ||
    die "$KPKG $KVER is no longer in the package lists: run scripts/setup-e2e.sh --refresh (it picks the current kernel), then this again"
HPKG=linux-headers-$KREL
DEPS=$(papt_cache depends "$HPKG=$KVER" 2>/dev/null) ||
    die "no $HPKG $KVER in the package lists (see $APTROOT/etc/sources.list)"
COMMON=$(echo "$DEPS" | sed -n 's/^ *|\{0,1\}Depends: \(linux-headers-[^ ]*-common\)$/\1/p' | head -n1)
KBUILD=$(echo "$DEPS" | sed -n 's/^ *|\{0,1\}Depends: \(linux-kbuild-[^ ]*\)$/\1/p' | head -n1)
CCPKG=$(echo "$DEPS" | sed -n 's/^ *|\{0,1\}Depends: \(gcc-[0-9][0-9]*\)$/\1/p' | head -n1)
[ -n "$COMMON" ] && [ -n "$KBUILD" ] && [ -n "$CCPKG" ] ||
    die "cannot find the common headers, kbuild and compiler among $HPKG's dependencies:
$DEPS"
# The headers package itself also depends on the kernel image (and through it
# on initramfs-tools, udev, ...): it is downloaded alone, the rest resolved.
WANT="$COMMON=$KVER $KBUILD=$KVER $CCPKG make binutils libc6-dev
      coreutils bash dash sed grep gawk findutils diffutils kmod"
say "resolving $HPKG $KVER, $COMMON, $KBUILD, $CCPKG and the build tools"
# shellcheck disable=SC2086 # word splitting of the package list is intended
papt_get install -s $WANT >"$CACHE/kbuild-resolve.log" 2>&1 ||
    { cat "$CACHE/kbuild-resolve.log" >&2; die "cannot resolve the kbuild packages"; }
LIST=$CACHE/kbuild-packages.list
{
    inst_lines < "$CACHE/kbuild-resolve.log"
    echo "$HPKG $KVER amd64"
} | sort -u > "$LIST.new"
grep -q "^$KBUILD $KVER " "$LIST.new" || die "$KBUILD $KVER not in the resolution (see $CACHE/kbuild-resolve.log)"
mv "$LIST.new" "$LIST"

say "downloading $(wc -l < "$LIST") packages into $DEBS (~90 MB the first time; cached ones are skipped)"
# shellcheck disable=SC2086
papt_get install -d -y $WANT >"$CACHE/kbuild-download.log" 2>&1 ||
    { cat "$CACHE/kbuild-download.log" >&2; die "download of the kbuild packages failed"; }
if [ ! -f "$DEBS/$(deb_file "$HPKG" "$KVER" amd64)" ]; then
    ( cd "$DEBS" && papt_get download "$HPKG=$KVER" ) >>"$CACHE/kbuild-download.log" 2>&1 ||
        { cat "$CACHE/kbuild-download.log" >&2; die "download of $HPKG failed"; }
fi

# --------------------------------------------------------------- the root --

say "unpacking $(wc -l < "$LIST") packages into $KROOT"
NEW=$KROOT.new
rm -rf "$NEW"
mkdir -p "$NEW/usr/bin" "$NEW/usr/sbin" "$NEW/usr/lib" "$NEW/usr/lib64"
# Merged /usr, as on an installed Debian 13 (packages may still ship /bin/...).
for d in bin sbin lib lib64; do ln -s "usr/$d" "$NEW/$d"; done
while read -r pkg ver arch; do
    f=$DEBS/$(deb_file "$pkg" "$ver" "$arch")
    [ -f "$f" ] || die "missing $f after download"
    # --keep-directory-symlink semantics: unpack through the /bin -> usr/bin
    # links rather than replacing them.
    dpkg-deb --fsys-tarfile "$f" | tar -x --keep-directory-symlink -C "$NEW" ||
        die "cannot unpack $f"
done < "$LIST"
for d in bin sbin lib lib64; do
    [ -L "$NEW/$d" ] || die "$d in $NEW is no longer a symlink to usr/$d"
done
# What the maintainer scripts would have done: /bin/sh, the unversioned tools
# kbuild may call, a dynamic loader where programs look for it.
[ -e "$NEW/usr/bin/sh" ] || ln -s dash "$NEW/usr/bin/sh"
[ -e "$NEW/usr/bin/awk" ] || ln -s gawk "$NEW/usr/bin/awk"
[ -e "$NEW/usr/lib64/ld-linux-x86-64.so.2" ] ||
    ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$NEW/usr/lib64/ld-linux-x86-64.so.2"
mkdir -p "$NEW/dev" "$NEW/tmp" "$NEW/build" "$NEW/proc"
chmod 1777 "$NEW/tmp"
mknod -m 666 "$NEW/dev/null" c 1 3
mknod -m 666 "$NEW/dev/zero" c 1 5
mknod -m 444 "$NEW/dev/urandom" c 1 9

# The compiler the kernel was built with, by the kernel's own record.
[ -f "$NEW$HEADERS/Makefile" ] || die "$HEADERS/Makefile missing in the root ($HPKG)"
CCTEXT=$(sed -n 's/^CONFIG_CC_VERSION_TEXT="\(.*\)"$/\1/p' "$NEW$HEADERS/.config")
CC=${CCTEXT%% *}
[ -n "$CC" ] || die "no CONFIG_CC_VERSION_TEXT in $HEADERS/.config"
run_in() { chroot "$NEW" /usr/bin/env -i PATH=/usr/bin:/usr/sbin HOME=/tmp LC_ALL=C "$@"; }
GOT=$(run_in "$CC" --version 2>&1 | head -n1) || die "$CC does not run in the root: $GOT"
[ "$GOT" = "$CCTEXT" ] || die "the kernel was built with '$CCTEXT', the root has '$GOT'"
run_in make --version >/dev/null 2>&1 || die "make does not run in the root"

printf 'layout=%s\nrelease=%s\nversion=%s\nheaders=%s\ncc=%s\n' \
    "$LAYOUT" "$KREL" "$KVER" "$HEADERS" "$CC" > "$NEW/$INFO"
rm -rf "$KROOT.old"
if [ -d "$KROOT" ]; then mv "$KROOT" "$KROOT.old"; fi
mv "$NEW" "$KROOT"
rm -rf "$KROOT.old"

END=$(date +%s)
say "$CCTEXT and the headers of $KREL ($KVER): ready, $(du -sh "$KROOT" | cut -f1) in $KROOT; took $((END - START)) s"
if [ "$QUIET" = 0 ]; then echo "KBUILD_ROOT=$KROOT"; echo "KERNEL_RELEASE=$KREL"; fi
