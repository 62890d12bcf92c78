#!/usr/bin/env bash
# Installs a standard VNC client for the e2e tests: vncdotool (PyPI), pinned,
# in a private virtual environment. Cached; a second run does nothing.
#
#   $CACHE/vncdotool/bin/vncdo     (CACHE=${UMDEV_CACHE:-$HOME/.cache/umdev})
#
# Needs python3 with venv; installs Debian's python3-venv when missing and
# running as root.
set -euo pipefail
CACHE=${UMDEV_CACHE:-$HOME/.cache/umdev}
VENV=$CACHE/vncdotool
VERSION=1.4.2
QUIET=0
[ "${1:-}" = --quiet ] && QUIET=1
say() { if [ "$QUIET" = 0 ]; then echo "setup-vnc-viewer: $*"; fi; }
die() { echo "setup-vnc-viewer: error: $*" >&2; exit 1; }

if [ -x "$VENV/bin/vncdo" ] && "$VENV/bin/vncdo" --version 2>/dev/null | grep -qx "vncdo $VERSION"; then
    say "vncdotool $VERSION ready: $VENV/bin/vncdo"
    exit 0
fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "python3 with venv is needed (apt-get install python3-venv)"
    say "installing python3-venv (apt-get)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
fi
rm -rf "$VENV"
mkdir -p "$CACHE"
python3 -m venv "$VENV"
say "installing vncdotool $VERSION from PyPI into $VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "vncdotool==$VERSION" ||
    die "pip could not install vncdotool $VERSION"
"$VENV/bin/vncdo" --version >/dev/null || die "vncdo does not run"
say "vncdotool $VERSION ready: $VENV/bin/vncdo"
