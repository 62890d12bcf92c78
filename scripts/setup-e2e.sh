#!/usr/bin/env bash
# Set up what umdev's end-to-end tests need, without touching the host's own
# libraries:
#   - QEMU >= 10.1 with vfio-user-pci (Debian trixie-backports qemu-system-x86 and
#     its dependencies, unpacked into a private root and started through that
#     root's own dynamic loader),
#   - a Debian guest kernel (linux-image-*-amd64, the generic flavour: PCI,
#     8250 serial, devtmpfs and ACPI built in) and, from its package, the
#     modules virtio-gpu needs (virtio_gpu and what it depends on, resolved from
#     each module's own depends= and decompressed) with the order to load them,
#   - a static busybox for the guest's initramfs.
#
# Everything is cached under ${UMDEV_CACHE:-$HOME/.cache/umdev}. A second run
# finds the cache complete and does no network access. Host packages: only cpio
# (for scripts/build-initramfs.sh) is installed with apt-get when missing.
#
# Usage: scripts/setup-e2e.sh [--refresh] [--quiet]
#   --refresh   re-read the Debian package lists and re-resolve (picks up newer
#               package versions); otherwise a complete cache is reused as is.
#   --quiet     print only the final paths.
#
# Environment:
#   UMDEV_CACHE          cache directory (default $HOME/.cache/umdev)
#   UMDEV_DEBIAN_MIRROR  Debian archive (default http://deb.debian.org/debian)
#   UMDEV_DEBIAN_SECURITY_MIRROR  (default http://deb.debian.org/debian-security)
#   UMDEV_DEBIAN_SUITE   base suite of the private root (default trixie)
#   UMDEV_QEMU_SUITE     suite that qemu-system-x86 comes from (default trixie-backports)
#
# Output (also printed at the end):
#   $CACHE/bin/qemu-system-x86_64   wrapper that runs the private QEMU
#   $CACHE/guest/vmlinuz            guest kernel
#   $CACHE/guest/busybox            static busybox
#   $CACHE/guest/modules/           <name>.ko files and load.list (names, load order)
set -euo pipefail

CACHE=${UMDEV_CACHE:-$HOME/.cache/umdev}
MIRROR=${UMDEV_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${UMDEV_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SUITE=${UMDEV_DEBIAN_SUITE:-trixie}
QEMU_SUITE=${UMDEV_QEMU_SUITE:-trixie-backports}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# Bump when the layout of the cache changes.
LAYOUT=2

REFRESH=0
QUIET=0
for arg in "$@"; do
    case $arg in
        --refresh) REFRESH=1 ;;
        --quiet) QUIET=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup-e2e: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

say() { if [ "$QUIET" = 0 ]; then echo "setup-e2e: $*"; fi; }
die() { echo "setup-e2e: error: $*" >&2; exit 1; }

case $CACHE in
    *\'*|*\"*|*\\*|*' '*) die "UMDEV_CACHE must not contain quotes, backslashes or spaces: $CACHE" ;;
esac
APTROOT=$CACHE/apt
DEBS=$CACHE/debs
QROOT=$CACHE/qemu-root
GUEST=$CACHE/guest
# Modules copied into the initramfs (with their dependencies), loaded by the
# guest driver only in the modes that need them.
GUEST_MODULES="virtio_gpu"
BIN=$CACHE/bin
WRAPPER=$BIN/qemu-system-x86_64
STAMP=$CACHE/setup.stamp

# ---------------------------------------------------------------- helpers --

# The wrapper must run and list vfio-user-pci.
wrapper_ok() {
    [ -x "$WRAPPER" ] || return 1
    "$WRAPPER" -device help 2>/dev/null | grep -q '"vfio-user-pci"'
}

# What the caller asked for (kept across the automatic fall-back to forky).
export UMDEV_SETUP_REQUEST=${UMDEV_SETUP_REQUEST:-${UMDEV_DEBIAN_SUITE:-}/${UMDEV_QEMU_SUITE:-}/$MIRROR}

cache_complete() {
    [ -f "$STAMP" ] && [ "$(sed -n 's/^layout=//p' "$STAMP")" = "$LAYOUT" ] &&
        [ "$(sed -n 's/^request=//p' "$STAMP")" = "$UMDEV_SETUP_REQUEST" ] &&
        [ -s "$GUEST/vmlinuz" ] && [ -x "$GUEST/busybox" ] &&
        [ -s "$GUEST/modules/load.list" ] && wrapper_ok
}

ensure_host_tool() { # tool package
    if command -v "$1" >/dev/null 2>&1; then return 0; fi
    [ "$(id -u)" = 0 ] || die "'$1' is missing: install the Debian package '$2'"
    say "installing host package $2 (apt-get)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2" >/dev/null 2>&1; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2" >/dev/null
    fi
    command -v "$1" >/dev/null 2>&1 || die "could not install $2"
}

# apt-get / apt-cache against the private configuration only (setup_private_apt,
# papt_get, papt_cache, inst_lines, deb_file; shared with setup-kbuild.sh).
# shellcheck source=scripts/lib-private-apt.sh
. "$(dirname "$0")/lib-private-apt.sh"

bytes_of() { { du -scb "$@" 2>/dev/null || true; } | awk '$2=="total"{s=$1} END{printf "%.1f MB", s/1e6}'; }

# ------------------------------------------------------------------- main --

if [ "$REFRESH" = 0 ] && cache_complete; then
    say "cache at $CACHE is complete (use --refresh to re-resolve packages)"
    if [ "$QUIET" = 0 ]; then
        echo "QEMU=$WRAPPER"
        echo "KERNEL=$GUEST/vmlinuz"
        echo "BUSYBOX=$GUEST/busybox"
    fi
    exit 0
fi

[ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported"
for t in apt-get apt-cache dpkg-deb sed awk; do
    command -v "$t" >/dev/null 2>&1 || die "'$t' is missing (this script expects a Debian host)"
done
[ -r "$KEYRING" ] || die "$KEYRING missing: install debian-archive-keyring"
ensure_host_tool cpio cpio
ensure_host_tool gzip gzip
ensure_host_tool xz xz-utils

mkdir -p "$CACHE" "$BIN" "$GUEST"
setup_private_apt
START=$(date +%s)
DEBS_BEFORE=$(bytes_of "$DEBS" | sed 's/ MB//')

# 1. Package lists (private; the host's apt state is not touched).
if [ "$REFRESH" = 1 ] || ! ls "$APTROOT"/lists/*_InRelease >/dev/null 2>&1 ||
    ! cmp -s "$APTROOT/etc/sources.list" "$APTROOT/lists.sources"; then
    say "downloading Debian package lists ($(awk '{printf "%s%s", sep, $4; sep=", "}' "$APTROOT/etc/sources.list"); ~16 MB) from $MIRROR"
    papt_get update >"$CACHE/apt-update.log" 2>&1 ||
        { cat "$CACHE/apt-update.log" >&2; die "apt-get update (private lists) failed"; }
    if grep -q '^W: ' "$CACHE/apt-update.log"; then grep '^W: ' "$CACHE/apt-update.log" >&2; fi
    cp "$APTROOT/etc/sources.list" "$APTROOT/lists.sources"
fi
if ! papt_cache policy | grep -q " $QEMU_SUITE/main amd64 Packages"; then
    if [ -z "${UMDEV_DEBIAN_SUITE:-}${UMDEV_QEMU_SUITE:-}" ]; then
        say "suite $QEMU_SUITE is not available from $MIRROR: retrying with forky"
        UMDEV_DEBIAN_SUITE=forky UMDEV_QEMU_SUITE=forky exec "$0" --refresh "$@"
    fi
    die "suite $QEMU_SUITE is not available from $MIRROR (see $CACHE/apt-update.log)"
fi

# 2. Resolve QEMU and its dependencies from an empty root.
say "resolving qemu-system-x86 from $QEMU_SUITE and its dependencies"
papt_get install -s -t "$QEMU_SUITE" qemu-system-x86 >"$CACHE/resolve.log" 2>&1 ||
    { cat "$CACHE/resolve.log" >&2; die "cannot resolve qemu-system-x86"; }
inst_lines < "$CACHE/resolve.log" | sort > "$CACHE/qemu-packages.list"
QVER=$(awk '$1=="qemu-system-x86"{print $2}' "$CACHE/qemu-packages.list")
[ -n "$QVER" ] || die "qemu-system-x86 not in the resolution (see $CACHE/resolve.log)"
if ! dpkg --compare-versions "$QVER" ge 1:10.1~; then
    if [ -z "${UMDEV_DEBIAN_SUITE:-}${UMDEV_QEMU_SUITE:-}" ]; then
        say "qemu-system-x86 $QVER in $QEMU_SUITE is older than 10.1 (no vfio-user-pci): retrying with forky"
        UMDEV_DEBIAN_SUITE=forky UMDEV_QEMU_SUITE=forky exec "$0" --refresh "$@"
    fi
    die "qemu-system-x86 $QVER in $QEMU_SUITE is older than 10.1 (no vfio-user-pci); set UMDEV_DEBIAN_SUITE/UMDEV_QEMU_SUITE"
fi
say "qemu-system-x86 $QVER, $(wc -l < "$CACHE/qemu-packages.list") packages"

# Guest kernel: the image package the generic flavour points at (the candidate
# is the newest of $SUITE and $SUITE-security; $QEMU_SUITE is not preferred).
# Not the cloud flavour: it has no DRM at all (no virtio_gpu, no fbdev
# emulation). The generic image (~110 MB, modules included) boots as fast.
KPKG=$(papt_cache depends linux-image-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\(-unsigned\)\{0,1\}\)$/\1/p' | head -n1)
[ -n "$KPKG" ] || die "cannot find the generic kernel image package in $SUITE"
# Newer Debian kernels (7.x) split the image package: vmlinuz is in
# linux-binary-<version>, the config in linux-base-<version> (and the
# modules, if split off too, in linux-modules-<version>).
KPKGS=$KPKG
for dep in $(papt_cache depends "$KPKG" 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-\(binary\|base\|modules\)-[^ ]*\)$/\1/p'); do
    KPKGS="$KPKGS $dep"
done
say "guest kernel packages: $KPKGS"

# 3. Download (apt reuses what is already in $DEBS).
say "downloading packages into $DEBS (QEMU root ~40 MB, kernel ~110 MB, busybox ~1 MB; cached ones are skipped)"
papt_get install -d -y -t "$QEMU_SUITE" qemu-system-x86 >"$CACHE/download.log" 2>&1 ||
    { cat "$CACHE/download.log" >&2; die "download of QEMU packages failed"; }
# shellcheck disable=SC2086 # word splitting of the package list is intended
( cd "$DEBS" && papt_get download $KPKGS busybox-static ) >>"$CACHE/download.log" 2>&1 ||
    { cat "$CACHE/download.log" >&2; die "download of kernel/busybox failed"; }

# 4. Unpack the private QEMU root (only when the package set changed).
WANT_SET=$(cat "$CACHE/qemu-packages.list")
HAVE_SET=$(cat "$QROOT/.packages" 2>/dev/null || true)
if [ "$WANT_SET" != "$HAVE_SET" ] || [ ! -x "$QROOT/usr/bin/qemu-system-x86_64" ]; then
    say "unpacking $(wc -l < "$CACHE/qemu-packages.list") packages into $QROOT"
    rm -rf "$QROOT.new"
    mkdir -p "$QROOT.new"
    while read -r pkg ver arch; do
        f=$DEBS/$(deb_file "$pkg" "$ver" "$arch")
        [ -f "$f" ] || die "missing $f after download"
        dpkg-deb -x "$f" "$QROOT.new"
    done < "$CACHE/qemu-packages.list"
    # Debian's /usr/share/qemu holds absolute symlinks to the firmware packages
    # (/usr/share/seabios/..., /usr/lib/ipxe/...): make every absolute link
    # relative, so it resolves inside the private root and never to the host.
    ( cd "$QROOT.new" && find . -type l ) | while read -r link; do
        target=$(readlink "$QROOT.new/$link")
        case $target in
            /*) dir=$(dirname "${link#./}")
                if [ "$dir" = . ]; then up=.; else up=$(printf "%s" "$dir" | sed "s|[^/][^/]*|..|g"); fi
                ln -sfn "$up$target" "$QROOT.new/$link" ;;
        esac
    done
    cp "$CACHE/qemu-packages.list" "$QROOT.new/.packages"
    rm -rf "$QROOT.old"
    if [ -d "$QROOT" ]; then mv "$QROOT" "$QROOT.old"; fi
    mv "$QROOT.new" "$QROOT"
    rm -rf "$QROOT.old"
fi

# 5. Guest kernel and busybox.
KDEBS=
for p in $KPKGS; do
    f=$(ls -t "$DEBS/${p}"_*.deb 2>/dev/null | head -n1 || true)
    [ -n "$f" ] || die "missing the .deb of $p after download"
    KDEBS="$KDEBS $f"
done
KID=$(for f in $KDEBS; do basename "$f"; done | tr '\n' ' ')
BDEB=$(ls -t "$DEBS"/busybox-static_*.deb 2>/dev/null | head -n1 || true)
[ -n "$BDEB" ] || die "missing the busybox-static .deb after download"
# A module's field (depends, ...) from its .modinfo strings; plain, .xz, .zst or .gz.
module_cat() {
    case $1 in
        *.xz) xz -dc "$1" ;;
        *.zst) zstd -qdc "$1" ;;
        *.gz) gzip -dc "$1" ;;
        *) cat "$1" ;;
    esac
}
# Copies the modules named in $GUEST_MODULES and everything they depend on
# from the module tree $1 into $2 as plain <name>.ko, and writes $2/load.list:
# the names, dependencies first. The package has no modules.dep (depmod runs
# at install time), so the closure comes from each module's depends= field.
extract_modules() { # moddir dest
    local moddir=$1 dest=$2 f n
    declare -A path=() seen=()
    while read -r f; do
        n=$(basename "$f"); n=${n%%.ko*}; path[${n//-/_}]=$f
    done < <(find "$moddir" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
    [ "${#path[@]}" -gt 0 ] || die "no modules under $moddir"
    : > "$dest/load.list"
    visit() {
        local m=$1 d deps
        [ -z "${seen[$m]:-}" ] || return 0
        seen[$m]=1
        [ -n "${path[$m]:-}" ] || die "module $m is not in the kernel package"
        deps=$(module_cat "${path[$m]}" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1)
        for d in ${deps//,/ }; do visit "$d"; done
        module_cat "${path[$m]}" > "$dest/$m.ko" || die "cannot decompress ${path[$m]}"
        echo "$m" >> "$dest/load.list"
    }
    for n in $GUEST_MODULES; do visit "$n"; done
}
if [ ! -s "$GUEST/vmlinuz" ] || [ "$(cat "$GUEST/.kernel-deb" 2>/dev/null)" != "$KID" ] ||
    [ ! -s "$GUEST/modules/load.list" ] ||
    [ "$(cat "$GUEST/modules/.wanted" 2>/dev/null)" != "$GUEST_MODULES" ]; then
    say "extracting guest kernel and modules ($GUEST_MODULES and dependencies) from $KID"
    tmp=$(mktemp -d "$CACHE/kx.XXXXXX")
    for f in $KDEBS; do dpkg-deb -x "$f" "$tmp"; done
    # /boot/vmlinuz-<v> (up to 6.x) or /usr/lib/modules/<v>/vmlinuz (7.x)
    vmlinuz=$(find "$tmp/boot" "$tmp/usr/lib/modules" -maxdepth 2 \( -name 'vmlinuz-*' -o -name vmlinuz \) -type f 2>/dev/null | head -n1 || true)
    kconfig=$(find "$tmp/boot" "$tmp/usr/lib/modules" -maxdepth 2 \( -name 'config-*' -o -name config \) -type f 2>/dev/null | head -n1 || true)
    moddir=$(find "$tmp/lib/modules" "$tmp/usr/lib/modules" -mindepth 2 -maxdepth 2 -name kernel -type d 2>/dev/null | head -n1 || true)
    [ -n "$vmlinuz" ] || die "no vmlinuz in $KID"
    [ -n "$kconfig" ] || die "no kernel config in $KID"
    [ -n "$moddir" ] || die "no modules (lib/modules/<version>/kernel) in $KID"
    rm -rf "$GUEST/modules.new"
    mkdir -p "$GUEST/modules.new"
    extract_modules "$moddir" "$GUEST/modules.new"
    echo "$GUEST_MODULES" > "$GUEST/modules.new/.wanted"
    cp "$vmlinuz" "$GUEST/vmlinuz.new"
    cp "$kconfig" "$GUEST/config"
    rm -rf "$tmp" "$GUEST/modules.old"
    if [ -d "$GUEST/modules" ]; then mv "$GUEST/modules" "$GUEST/modules.old"; fi
    mv "$GUEST/modules.new" "$GUEST/modules"
    rm -rf "$GUEST/modules.old"
    mv "$GUEST/vmlinuz.new" "$GUEST/vmlinuz"
    echo "$KID" > "$GUEST/.kernel-deb"
fi
for opt in CONFIG_PCI CONFIG_SERIAL_8250 CONFIG_SERIAL_8250_CONSOLE CONFIG_DEVTMPFS \
           CONFIG_BLK_DEV_INITRD CONFIG_RD_GZIP CONFIG_PROC_PAGE_MONITOR CONFIG_ACPI \
           CONFIG_MODULES CONFIG_DRM_FBDEV_EMULATION CONFIG_FB_DEVICE; do
    grep -q "^$opt=y" "$GUEST/config" || die "guest kernel lacks $opt=y"
done
grep -Eq '^CONFIG_DRM_VIRTIO_GPU=(y|m)$' "$GUEST/config" || die "guest kernel lacks CONFIG_DRM_VIRTIO_GPU"
if [ ! -x "$GUEST/busybox" ] || [ "$(cat "$GUEST/.busybox-deb" 2>/dev/null)" != "$(basename "$BDEB")" ]; then
    say "extracting busybox from $(basename "$BDEB")"
    tmp=$(mktemp -d "$CACHE/bx.XXXXXX")
    dpkg-deb -x "$BDEB" "$tmp"
    if [ -f "$tmp/usr/bin/busybox" ]; then cp "$tmp/usr/bin/busybox" "$GUEST/busybox.new"; else cp "$tmp/bin/busybox" "$GUEST/busybox.new"; fi
    rm -rf "$tmp"
    mv "$GUEST/busybox.new" "$GUEST/busybox"
    basename "$BDEB" > "$GUEST/.busybox-deb"
fi

# 6. The wrapper. The host's glibc may be older than the one QEMU was built
# against, so QEMU runs under the private root's own dynamic loader, with the
# private library directories only; -L points at the private firmware
# (SeaBIOS, option ROMs); QEMU_MODULE_DIR at the private module directory.
LDSO=$QROOT/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
[ -e "$LDSO" ] || LDSO=$QROOT/lib64/ld-linux-x86-64.so.2
[ -e "$LDSO" ] || die "no dynamic loader in $QROOT"
LIBPATH=$QROOT/usr/lib/x86_64-linux-gnu:$QROOT/lib/x86_64-linux-gnu
FWARGS="-L '$QROOT/usr/share/qemu'"
for d in "$QROOT/usr/share/seabios" "$QROOT/usr/lib/ipxe/qemu"; do
    if [ -d "$d" ]; then FWARGS="$FWARGS -L '$d'"; fi
done
[ -e "$QROOT/usr/share/seabios/bios-256k.bin" ] || die "SeaBIOS (bios-256k.bin) missing in $QROOT"
cat > "$WRAPPER.new" <<EOF
#!/bin/sh
# Generated by umdev scripts/setup-e2e.sh: runs QEMU $QVER from a private root.
QEMU_MODULE_DIR='$QROOT/usr/lib/x86_64-linux-gnu/qemu'
export QEMU_MODULE_DIR
exec '$LDSO' --library-path '$LIBPATH' --argv0 qemu-system-x86_64 \\
    '$QROOT/usr/bin/qemu-system-x86_64' $FWARGS "\$@"
EOF
chmod +x "$WRAPPER.new"
mv "$WRAPPER.new" "$WRAPPER"

# 7. Checks: every library resolves inside the private root; vfio-user-pci exists.
if "$LDSO" --library-path "$LIBPATH" --list "$QROOT/usr/bin/qemu-system-x86_64" > "$CACHE/ldd.log" 2>&1; then
    if grep '=>' "$CACHE/ldd.log" | grep -v "=> $QROOT/" | grep -q .; then
        grep '=>' "$CACHE/ldd.log" | grep -v "=> $QROOT/" >&2
        die "QEMU would load libraries from outside $QROOT (above)"
    fi
else
    cat "$CACHE/ldd.log" >&2
    die "QEMU's libraries do not resolve in the private root"
fi
"$WRAPPER" --version > "$CACHE/qemu-version.txt" 2>&1 ||
    { cat "$CACHE/qemu-version.txt" >&2; die "the private QEMU does not start"; }
wrapper_ok || die "the private QEMU does not list vfio-user-pci in -device help"
grep -q '"edu"' <("$WRAPPER" -device help 2>/dev/null) || die "the private QEMU lacks the edu device"

printf 'layout=%s\nrequest=%s\nsuites=%s\nqemu=%s\nkernel=%s\nbusybox=%s\n' "$LAYOUT" \
    "$UMDEV_SETUP_REQUEST" "$SUITE $QEMU_SUITE" "$QVER" \
    "$(cat "$GUEST/.kernel-deb")" "$(cat "$GUEST/.busybox-deb")" > "$STAMP"

END=$(date +%s)
DEBS_AFTER=$(bytes_of "$DEBS" | sed 's/ MB//')
say "$(head -n1 "$CACHE/qemu-version.txt") with vfio-user-pci: ready"
say "downloaded packages: ${DEBS_BEFORE:-0} MB -> ${DEBS_AFTER} MB in $DEBS; private root $(bytes_of "$QROOT"); took $((END - START)) s"
if [ "$QUIET" = 0 ]; then
    echo "QEMU=$WRAPPER"
    echo "KERNEL=$GUEST/vmlinuz"
    echo "BUSYBOX=$GUEST/busybox"
fi
