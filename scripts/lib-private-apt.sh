# shellcheck shell=bash
# Private apt configuration shared by scripts/setup-e2e.sh and
# scripts/setup-kbuild.sh (sourced, not run). apt-get and apt-cache read and
# write only files under $APTROOT and $DEBS: the host's own apt state, sources
# and package database are never touched.
#
# The sourcing script sets: APTROOT (configuration, lists, empty dpkg status),
# DEBS (downloaded .deb files), MIRROR, SECURITY_MIRROR, SUITE (base suite),
# QEMU_SUITE (an extra suite, e.g. trixie-backports; may equal SUITE) and
# KEYRING (the Debian archive keyring).

APT_OPTS=()

# Writes the private sources.list (the same one for every caller, so the
# package lists downloaded by one are valid for the other) and sets APT_OPTS.
setup_private_apt() {
    mkdir -p "$APTROOT/etc/sources.list.d" "$APTROOT/etc/preferences.d" \
        "$APTROOT/etc/apt.conf.d" "$APTROOT/lists/partial" "$APTROOT/cache" \
        "$DEBS/partial"
    # Nothing is "installed": dependency resolution starts from an empty root.
    : > "$APTROOT/status"
    local signed="[signed-by=$KEYRING]"
    cat > "$APTROOT/etc/sources.list" <<SOURCES
deb $signed $MIRROR $SUITE main
deb $signed $MIRROR $SUITE-updates main
deb $signed $SECURITY_MIRROR $SUITE-security main
SOURCES
    if [ "$QEMU_SUITE" != "$SUITE" ]; then
        echo "deb $signed $MIRROR $QEMU_SUITE main" >> "$APTROOT/etc/sources.list"
    fi
    APT_OPTS=(
        -o "Dir::Etc=$APTROOT/etc"
        -o "Dir::Etc::sourcelist=$APTROOT/etc/sources.list"
        -o "Dir::Etc::sourceparts=$APTROOT/etc/sources.list.d"
        -o "Dir::Etc::preferences=$APTROOT/etc/preferences"
        -o "Dir::Etc::preferencesparts=$APTROOT/etc/preferences.d"
        -o "Dir::State=$APTROOT"
        -o "Dir::State::lists=$APTROOT/lists"
        -o "Dir::State::status=$APTROOT/status"
        -o "Dir::State::extended_states=$APTROOT/extended_states"
        -o "Dir::Cache=$APTROOT/cache"
        -o "Dir::Cache::archives=$DEBS"
        -o "APT::Architecture=amd64"
        -o "APT::Architectures::=amd64"
        -o "APT::Install-Recommends=false"
        -o "APT::Sandbox::User=root"
        -o "Acquire::Languages=none"
        -o "Debug::NoLocking=1"
        -o "quiet=1"
    )
}
papt_get() { apt-get "${APT_OPTS[@]}" "$@"; }
papt_cache() { apt-cache "${APT_OPTS[@]}" "$@"; }

# "Inst pkg (version suite [arch])" lines of a simulated install -> "pkg version arch"
inst_lines() { sed -n 's/^Inst \([^ ]*\) (\([^ ]*\) [^[]*\[\([a-z0-9]*\)\].*/\1 \2 \3/p'; }
deb_file() { # pkg version arch -> the file name apt stores it under in $DEBS
    echo "${1}_${2//:/%3a}_${3}.deb"
}
