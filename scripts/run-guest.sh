#!/usr/bin/env bash
# Boot the umdev e2e guest under QEMU (TCG) and run the guest test driver.
#
# Usage: scripts/run-guest.sh [options] [-- extra QEMU arguments...]
#
# Options:
#   --edu            add QEMU's built-in edu device (-device edu): the reference run
#   --memfd          back guest RAM with a shared memfd, so a vfio-user server gets
#                    an fd for it (-object memory-backend-memfd,...,share=on
#                    -machine q35,memory-backend=mem)
#   --virtio-gpu     add QEMU's built-in virtio-gpu (-device virtio-gpu-pci): the
#                    reference display; the guest draws on it with --append UMDEV_MODE=fb
#   --qmp PATH       QMP monitor on the UNIX socket PATH (server, not waited for);
#                    e.g. for screendump: the display is -display none
#   --mem SIZE       guest RAM (default 256M; edu's DMA reaches only the low 256 MiB)
#   --log FILE       serial console log (default <repo>/target/e2e/guest-serial.log);
#                    QEMU's own output goes to FILE with .log replaced by .qemu.log
#   --results FILE   where to write the PASS/FAIL/DONE lines alone, without \r
#                    (default: FILE of --log with .log replaced by .results)
#   --timeout SECS   kill QEMU after this long (default 120)
#   --append ARGS    more kernel command-line arguments; UMDEV_TESTS=id,dma_,...
#                    UMDEV_DEV=vvvv:dddd and UMDEV_ROUNDS=n reach the guest driver
#   --quiet          do not echo the serial console while the guest runs
#   --no-build       use the existing initramfs (do not run build-initramfs.sh)
#   --interactive    serial console on this terminal, and a busybox shell in the
#                    guest before the driver runs (exit it to run the tests);
#                    Ctrl-A x quits QEMU. No log file, no PASS/FAIL summary.
#
# Example (a vfio-user server listening on /tmp/edu.sock):
#   scripts/run-guest.sh --memfd -- \
#     -device '{"driver":"vfio-user-pci","socket":{"path":"/tmp/edu.sock","type":"unix"}}'
#
# The serial log holds lines `PASS <name> <value>`, `FAIL <name> <detail>`,
# `INFO ...` and finally `DONE passed=N failed=M`; lines may end in \r.
# Exit status: 0 DONE and no FAIL; 1 some FAIL; 2 no DONE (boot failure, crash,
# timeout); 3 set-up error.
#
# Environment: UMDEV_CACHE (see setup-e2e.sh), UMDEV_QEMU, UMDEV_KERNEL,
# UMDEV_INITRAMFS to use other binaries/images.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${UMDEV_CACHE:-$HOME/.cache/umdev}
MEM=256M
LOG=$REPO/target/e2e/guest-serial.log
TIMEOUT=120
APPEND=
QUIET=0
BUILD=1
MEMFD=0
RESULTS=
INTERACTIVE=0
QMP=
EXTRA=()

die() { echo "run-guest: error: $*" >&2; exit 3; }
while [ $# -gt 0 ]; do
    case $1 in
        --edu) EXTRA+=(-device edu) ;;
        --memfd) MEMFD=1 ;;
        --virtio-gpu) EXTRA+=(-device virtio-gpu-pci) ;;
        --qmp) QMP=${2:?--qmp needs a socket path}; shift ;;
        --mem) MEM=${2:?--mem needs a size}; shift ;;
        --log) LOG=${2:?--log needs a file}; shift ;;
        --results) RESULTS=${2:?--results needs a file}; shift ;;
        --timeout) TIMEOUT=${2:?--timeout needs seconds}; shift ;;
        --append) APPEND="$APPEND ${2?--append needs arguments}"; shift ;;
        --quiet) QUIET=1 ;;
        --no-build) BUILD=0 ;;
        --interactive) INTERACTIVE=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; EXTRA+=("$@"); break ;;
        *) die "unknown argument: $1 (QEMU arguments go after --)" ;;
    esac
    shift
done

# Set-up (fast when cached) and the initramfs.
if [ -z "${UMDEV_QEMU:-}" ] || [ -z "${UMDEV_KERNEL:-}" ]; then
    "$REPO/scripts/setup-e2e.sh" --quiet || die "scripts/setup-e2e.sh failed"
fi
QEMU=${UMDEV_QEMU:-$CACHE/bin/qemu-system-x86_64}
KERNEL=${UMDEV_KERNEL:-$CACHE/guest/vmlinuz}
if [ -n "${UMDEV_INITRAMFS:-}" ] && [ "$BUILD" = 0 ]; then
    INITRD=$UMDEV_INITRAMFS
elif [ "$BUILD" = 1 ]; then
    INITRD=$("$REPO/scripts/build-initramfs.sh" --quiet | tail -n1) || die "scripts/build-initramfs.sh failed"
else
    INITRD=${UMDEV_INITRAMFS:-$REPO/target/e2e/initramfs.cpio.gz}
fi
[ -x "$QEMU" ] || die "no QEMU at $QEMU"
[ -s "$KERNEL" ] || die "no kernel at $KERNEL"
[ -s "$INITRD" ] || die "no initramfs at $INITRD"

mkdir -p "$(dirname "$LOG")"
LOG=$(realpath -m "$LOG")
case $LOG in *,*) die "the log path must not contain a comma (QEMU option syntax): $LOG" ;; esac
QLOG=${LOG%.log}.qemu.log
[ "$QLOG" != "$LOG" ] || QLOG=$LOG.qemu
if [ -z "$RESULTS" ]; then
    RESULTS=${LOG%.log}.results
    [ "$RESULTS" != "$LOG" ] || RESULTS=$LOG.results
fi
mkdir -p "$(dirname "$RESULTS")"
: > "$LOG"
: > "$RESULTS"

MACHINE=q35
MEMARGS=(-m "$MEM")
if [ "$MEMFD" = 1 ]; then
    MEMARGS+=(-object "memory-backend-memfd,id=mem,size=$MEM,share=on")
    MACHINE=q35,memory-backend=mem
fi

CMDLINE="console=ttyS0 panic=-1 quiet loglevel=3 $APPEND"
ARGS=(
    -machine "$MACHINE" -accel tcg -cpu max -smp 1 "${MEMARGS[@]}"
    -nodefaults -no-user-config -display none -no-reboot
    -serial "file:$LOG"
    -kernel "$KERNEL" -initrd "$INITRD" -append "$CMDLINE"
    "${EXTRA[@]}"
)
if [ -n "$QMP" ]; then
    case $QMP in *,*) die "the QMP socket path must not contain a comma: $QMP" ;; esac
    ARGS+=(-qmp "unix:$QMP,server=on,wait=off")
fi
if [ "$INTERACTIVE" = 1 ]; then
    for i in "${!ARGS[@]}"; do
        case ${ARGS[$i]} in
            file:"$LOG") ARGS[i]=mon:stdio ;;
            "$CMDLINE") ARGS[i]="$CMDLINE UMDEV_SHELL=1" ;;
        esac
    done
    exec timeout --foreground "$TIMEOUT" "$QEMU" "${ARGS[@]}"
fi
printf '%q ' "$QEMU" "${ARGS[@]}" > "$QLOG"
echo >> "$QLOG"

START=$(date +%s.%N)
timeout -k 5 "$TIMEOUT" "$QEMU" "${ARGS[@]}" </dev/null >>"$QLOG" 2>&1 &
QPID=$!
TAILPID=
# Ctrl-C / TERM: stop QEMU too (a background job would ignore SIGINT).
trap 'kill "$QPID" ${TAILPID:+"$TAILPID"} 2>/dev/null; exit 130' INT TERM
if [ "$QUIET" = 0 ]; then
    tail -n +1 -f --pid="$QPID" "$LOG" &
    TAILPID=$!
fi
set +e
wait "$QPID"
QRC=$?
set -e
if [ -n "$TAILPID" ]; then wait "$TAILPID" 2>/dev/null || true; fi
END=$(date +%s.%N)
SECS=$(awk -v a="$START" -v b="$END" 'BEGIN{printf "%.1f", b-a}')

tr -d '\r' < "$LOG" | grep -E '^(PASS|FAIL|DONE) ' > "$RESULTS" || true
NPASS=$(grep -c '^PASS ' "$RESULTS" || true)
NFAIL=$(grep -c '^FAIL ' "$RESULTS" || true)
if [ "$QRC" = 124 ] || [ "$QRC" = 137 ]; then
    echo "run-guest: QEMU killed after the ${TIMEOUT}s timeout" >&2
elif [ "$QRC" != 0 ]; then
    echo "run-guest: QEMU exited with status $QRC; its output ($QLOG):" >&2
    sed 's/^/  qemu: /' "$QLOG" >&2
fi
if ! grep -q '^DONE ' "$RESULTS"; then
    echo "run-guest: no DONE line after ${SECS}s: the guest did not finish (serial log: $LOG)" >&2
    exit 2
fi
echo "run-guest: ${NPASS} passed, ${NFAIL} failed in ${SECS}s (serial log: $LOG, results: $RESULTS)" >&2
if [ "$NFAIL" != 0 ]; then
    grep '^FAIL ' "$RESULTS" >&2
    exit 1
fi
exit 0
