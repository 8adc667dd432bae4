# shellcheck shell=bash disable=SC2034  # (sets variables for the scripts that source it)
# Shared by cross/build, cross/test and cross/sizes: what each target needs,
# how to install it when missing, and the environment cargo builds with.
# Sourced, not run. Everything here is idempotent and non-interactive.
#
# Knobs (environment):
#   CROSS_RUST=auto|rustup|debian   which Rust builds (default auto: rustup,
#                                   and Debian 12's rustc-web only if rustup
#                                   cannot add the target's std)
#   CROSS_JOBS=N                    cargo -j (default 2)
#   CARGO_TARGET_DIR                as for cargo (default: <repo>/target)

CROSS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)" # physical, as cargo sees it
CROSS_TARGETS=(aarch64 armv7 aarch64-musl x86_64-musl)

die() {
    echo "cross: error: $*" >&2
    exit 1
}
note() { echo "cross: $*" >&2; }

# Sets the facts of one target (the short names of CROSS_TARGETS).
#   TRIPLE       rustc target triple
#   TRIPLE_ENV   the triple as cargo's env var names spell it
#   GCC          cross gcc: linker (glibc) and C compiler for -sys crates
#   GCC_PKGS     the Debian packages with it and its libc headers (which
#                are only Recommends, and ring's C includes <stdint.h>)
#   DEB_ARCH     Debian architecture (for the rustc-web fallback)
#   QEMU         qemu-user binary; QEMU_ARGS its arguments before the program
#                (empty for x86_64-musl, which runs natively on the build
#                machine)
#   ELF_MACHINE  what `readelf -h` calls the machine
#   BUDGET       size budget of the stripped binary, bytes; GOAL (optional)
target_facts() {
    case "${1:-}" in
    aarch64)
        TRIPLE=aarch64-unknown-linux-gnu
        GCC=aarch64-linux-gnu-gcc
        GCC_PKGS=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
        DEB_ARCH=arm64
        QEMU=qemu-aarch64
        QEMU_ARGS=(-L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib)
        ELF_MACHINE=AArch64
        BUDGET=$((3 * 1024 * 1024))
        GOAL=$((2 * 1024 * 1024))
        ;;
    armv7)
        TRIPLE=armv7-unknown-linux-gnueabihf
        GCC=arm-linux-gnueabihf-gcc
        GCC_PKGS=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
        DEB_ARCH=armhf
        QEMU=qemu-arm
        QEMU_ARGS=(-L /usr/arm-linux-gnueabihf -E LD_LIBRARY_PATH=/usr/arm-linux-gnueabihf/lib)
        ELF_MACHINE=ARM
        BUDGET=$((5 * 1024 * 1024 / 2))
        GOAL=""
        ;;
    aarch64-musl)
        # Fully static. ring's C and assembly need no libc headers, so the
        # Debian cross gcc compiles them; it also links, against the musl
        # crt objects and libc.a that rustup ships with the target
        # (self-contained linking). See "Building for devices" in README.md.
        TRIPLE=aarch64-unknown-linux-musl
        GCC=aarch64-linux-gnu-gcc
        GCC_PKGS=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
        DEB_ARCH=""
        QEMU=qemu-aarch64
        QEMU_ARGS=()
        ELF_MACHINE=AArch64
        BUDGET=$((3 * 1024 * 1024))
        GOAL=$((2 * 1024 * 1024))
        ;;
    x86_64-musl)
        # Fully static, for x86_64 gateways and industrial PCs. It runs on
        # the build machine itself, without qemu, so cross/sizes measures
        # its idle RSS exactly. The host gcc compiles ring and links against
        # the musl crt objects and libc.a that rustup ships with the target.
        TRIPLE=x86_64-unknown-linux-musl
        GCC=gcc
        GCC_PKGS=(gcc libc6-dev)
        DEB_ARCH=""
        QEMU=""
        QEMU_ARGS=()
        ELF_MACHINE="X86-64"
        BUDGET=$((4 * 1024 * 1024))
        GOAL=""
        ;;
    "")
        die "no target given; one of: ${CROSS_TARGETS[*]}"
        ;;
    *)
        die "unknown target '$1'; one of: ${CROSS_TARGETS[*]}"
        ;;
    esac
    TARGET_NAME=$1
    TRIPLE_ENV=$(echo "$TRIPLE" | tr 'a-z-' 'A-Z_')
}

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

APT_UPDATED=""
# Runs apt-get quietly (as root, or through sudo); its output is shown only
# when it fails.
apt_run() {
    local sudo="" log rc=0
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    log=$(mktemp)
    DEBIAN_FRONTEND=noninteractive $sudo apt-get "$@" >"$log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        tail -n 30 "$log" >&2
        rm -f "$log"
        die "apt-get $* failed (exit $rc)"
    fi
    rm -f "$log"
}

# Installs the Debian packages (NAME or NAME:ARCH=VERSION) that are missing;
# apt-get update first, once per run.
ensure_apt() {
    local missing=() p
    for p in "$@"; do is_installed "${p%%=*}" || missing+=("$p"); done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    note "installing ${missing[*]}"
    if [ -z "$APT_UPDATED" ]; then
        apt_run update
        APT_UPDATED=1
    fi
    apt_run install -y --no-install-recommends "${missing[@]}"
}

# Chooses the Rust toolchain and makes the target's std available.
# Sets CARGO (command array) and exports RUSTC/RUSTDOC for the Debian route.
ensure_rust() {
    local route=${CROSS_RUST:-auto}
    case "$route" in
    auto | rustup)
        if command -v rustup >/dev/null; then
            if rustup target list --installed 2>/dev/null | grep -qx "$TRIPLE"; then
                CARGO=(cargo)
                RUST_ROUTE=rustup
                return 0
            fi
            note "rustup target add $TRIPLE"
            if rustup target add "$TRIPLE" >&2; then
                CARGO=(cargo)
                RUST_ROUTE=rustup
                return 0
            fi
            [ "$route" = auto ] || die "rustup target add $TRIPLE failed"
            note "rustup could not add $TRIPLE; falling back to Debian's rustc-web"
        else
            [ "$route" = auto ] || die "CROSS_RUST=rustup but rustup is not installed"
            note "no rustup; using Debian's rustc-web"
        fi
        ;;
    debian) ;;
    *) die "CROSS_RUST must be auto, rustup or debian (got '$route')" ;;
    esac
    ensure_debian_rust
}

# Debian 12's own Rust (rustc-web, cargo-web) with the target's std from
# libstd-rust-web-dev:ARCH. Only for the glibc targets: Debian ships no
# musl std. Called by path (/usr/bin/cargo, RUSTC=/usr/bin/rustc) so that
# PATH, where ~/.cargo/bin should stay first, is left alone.
ensure_debian_rust() {
    [ -n "$DEB_ARCH" ] || die "$TRIPLE: Debian ships no std for this target; it needs rustup (rustup target add $TRIPLE)"
    command -v dpkg >/dev/null || die "the Debian fallback needs dpkg/apt-get"
    if ! dpkg --print-foreign-architectures | grep -qx "$DEB_ARCH"; then
        note "dpkg --add-architecture $DEB_ARCH"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo dpkg --add-architecture "$DEB_ARCH"
        APT_UPDATED="" # the new architecture's package lists must be fetched
    fi
    ensure_apt rustc-web cargo-web
    # libstd must be exactly rustc-web's version, or rustc refuses it.
    local v have
    v=$(dpkg-query -W -f='${Version}' rustc-web)
    have=$(dpkg-query -W -f='${Version}' "libstd-rust-web-dev:$DEB_ARCH" 2>/dev/null || true)
    if [ "$have" != "$v" ]; then
        if [ -z "$APT_UPDATED" ]; then
            apt_run update
            APT_UPDATED=1
        fi
        note "installing libstd-rust-web-dev:$DEB_ARCH=$v"
        apt_run install -y --no-install-recommends "libstd-rust-web-dev:$DEB_ARCH=$v"
    fi
    if [ ! -x /usr/bin/cargo ] || [ ! -x /usr/bin/rustc ]; then
        die "rustc-web/cargo-web installed but /usr/bin/cargo or /usr/bin/rustc is missing"
    fi
    export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
    CARGO=(/usr/bin/cargo)
    RUST_ROUTE=debian
}

# Installs what the build needs and exports the build environment.
setup_build() {
    target_facts "$1"
    command -v cargo >/dev/null || [ "${CROSS_RUST:-auto}" = debian ] ||
        die "cargo not found; install Rust (rustup) or set CROSS_RUST=debian"
    ensure_apt "${GCC_PKGS[@]}" binutils
    command -v "$GCC" >/dev/null || die "$GCC not found after installing ${GCC_PKGS[*]}"
    ensure_rust

    # Linker and C compiler for this target only; nothing is written to a
    # .cargo/config.toml, so host builds are untouched.
    export "CARGO_TARGET_${TRIPLE_ENV}_LINKER=$GCC"
    export "CC_${TRIPLE//-/_}=$GCC"
    if [ "$GCC" = gcc ]; then
        export "AR_${TRIPLE//-/_}=ar"
    else
        export "AR_${TRIPLE//-/_}=${GCC%-gcc}-ar"
    fi

    # Reproducible bytes: no build paths in the binary (panic locations of
    # dependencies and OUT_DIR includes carry them otherwise), for Rust and C.
    # Absolute, so that the scripts may cd and the remapping below matches.
    local cargo_home target_dir
    cargo_home=$(realpath -m "${CARGO_HOME:-$HOME/.cargo}")
    target_dir=$(realpath -m "${CARGO_TARGET_DIR:-$CROSS_ROOT/target}")
    export CARGO_TARGET_DIR=$target_dir
    local p
    for p in "$CROSS_ROOT" "$cargo_home" "$target_dir"; do
        case "$p" in *[[:space:]]*) die "path '$p' contains whitespace; cargo's RUSTFLAGS cannot carry it" ;; esac
    done
    local flags="--remap-path-prefix=$CROSS_ROOT=/beamup --remap-path-prefix=$cargo_home=/cargo"
    local cflags="-ffile-prefix-map=$CROSS_ROOT=/beamup -ffile-prefix-map=$cargo_home=/cargo"
    case "$target_dir" in
    "$CROSS_ROOT"/*) ;;
    *)
        flags+=" --remap-path-prefix=$target_dir=/target"
        cflags+=" -ffile-prefix-map=$target_dir=/target"
        ;;
    esac
    # A RUSTFLAGS from the caller would replace the per-target flags below.
    if [ -n "${RUSTFLAGS:-}${CARGO_ENCODED_RUSTFLAGS:-}" ]; then
        note "ignoring RUSTFLAGS/CARGO_ENCODED_RUSTFLAGS from the environment (cross builds set their own)"
        unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS
    fi
    export "CARGO_TARGET_${TRIPLE_ENV}_RUSTFLAGS=$flags"
    export "CFLAGS_${TRIPLE//-/_}=$cflags"
    # Nothing in the binary carries a build time, so any fixed value does;
    # not the commit time: cc-rs tracks this variable, and a value that
    # changes with every commit would rebuild ring and all above it.
    export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-315532800}" # 1980-01-01

    TARGET_DIR=$target_dir
    DEVICE_BIN="$target_dir/$TRIPLE/device/beamup"
    JOBS=${CROSS_JOBS:-2}
}

# Installs qemu-user and sets RUNNER, the command that runs one of this
# target's programs on the build machine.
setup_runner() {
    if [ -z "$QEMU" ]; then
        RUNNER=() # native
        return 0
    fi
    ensure_apt qemu-user
    command -v "$QEMU" >/dev/null || die "$QEMU not found after installing qemu-user"
    RUNNER=("$QEMU" "${QEMU_ARGS[@]}")
    export "CARGO_TARGET_${TRIPLE_ENV}_RUNNER=${RUNNER[*]}"
}

human_size() {
    awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'
}
