#!/usr/bin/env bash
# Builds the gatehouse release binary and stages it as the Greengrass component's artifact:
#   artifacts/io.gatehouse.AgentGateway/<version>/gatehouse-<arch>     (arch: x86_64, aarch64)
# the layout greengrass-cli local deployments read (scripts/deploy-local.sh) and the file names
# the recipe's manifests name (recipes/io.gatehouse.AgentGateway.yaml). <version> is Cargo.toml's.
#
# Usage: scripts/build-artifact.sh [--gdk] [--dry-run]      (from anywhere; it cds to the repo root)
#   --gdk      also lay out greengrass-build/ as `gdk component build` expects it (gdk-config.json
#              runs this script so): greengrass-build/artifacts/io.gatehouse.AgentGateway/<version>/
#              gets the binaries, greengrass-build/recipes/ the recipe, with its artifact URIs in the
#              s3://BUCKET_NAME/COMPONENT_NAME/COMPONENT_VERSION/<file> form `gdk component publish`
#              rewrites. GDK also needs recipe.yaml at the project root (a link to the recipe).
#   --dry-run  print what would be built and where it would go; build nothing.
# Env (defaults):
#   TARGET=<host>   Rust target triple(s) to build, separated by spaces or commas; `all` means
#                   x86_64-unknown-linux-gnu and aarch64-unknown-linux-gnu. With --gdk the default
#                   is `all`: a published component should carry a binary for each manifest.
#   ARTIFACTS_DIR=artifacts   where the artifact tree goes (<dir>/io.gatehouse.AgentGateway/<version>/).
#   KEEP_DEBUG=0    1 keeps the debug info (profile.release has debug = 1); by default it is
#                   stripped from the artifact (symbols stay, so backtraces still name functions).
#   CARGO=cargo, CARGO_TARGET_DIR=target
#   CARGO_TARGET_<TRIPLE>_LINKER   the cross linker, e.g. CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER
#                   (default: <arch>-linux-gnu-gcc when it is on PATH; it also compiles the C code
#                   of SQLite, zstd and ring, through CC_<triple>).
#
# A cross build (TARGET=aarch64-unknown-linux-gnu on an x86_64 machine) needs, once:
#   rustup target add aarch64-unknown-linux-gnu
#   sudo apt-get install gcc-aarch64-linux-gnu      (Debian/Ubuntu: the cross gcc and binutils)
# The binary links the build machine's glibc dynamically: build on a distribution no newer than
# the oldest core device's (or in a container of it), else it will not start there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

COMPONENT=io.gatehouse.AgentGateway
RECIPE="recipes/$COMPONENT.yaml"
ALL_TARGETS="x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu"
CARGO="${CARGO:-cargo}"
KEEP_DEBUG="${KEEP_DEBUG:-0}"

log() { printf '[build-artifact] %s\n' "$*" >&2; }
die() {
    printf 'build-artifact.sh: %s\n' "$*" >&2
    exit 1
}

GDK=0
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --gdk) GDK=1 ;;
        --dry-run) DRY_RUN=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *) die "unknown argument: $arg (see --help)" ;;
    esac
done

if ! command -v "$CARGO" >/dev/null 2>&1 || ! command -v rustc >/dev/null 2>&1; then
    die "cargo and rustc not found: install Rust 1.89 or newer with rustup (https://rustup.rs)"
fi

# The [package] version, e.g. 0.1.0.
VERSION="$(sed -n '/^\[package\]/,/^\[/{s/^version *= *"\([^"]*\)".*/\1/p}' Cargo.toml | head -n 1)"
[[ -n "$VERSION" ]] || die "no version in Cargo.toml's [package] section"
recipe_version="$(sed -n 's/^ComponentVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$RECIPE")"
[[ "$recipe_version" == "$VERSION" ]] \
    || die "$RECIPE has ComponentVersion ${recipe_version:-?}, Cargo.toml has $VERSION: make them equal"

HOST="$(rustc -vV | sed -n 's/^host: //p')"
if [[ -n "${TARGET:-}" ]]; then
    targets="${TARGET//,/ }"
elif [[ "$GDK" == 1 ]]; then
    targets=all
else
    targets="$HOST"
fi
[[ "$targets" == all ]] && targets="$ALL_TARGETS"

# arch_of TRIPLE: the artifact's suffix, as the recipe's manifests name it.
arch_of() {
    case "$1" in
        x86_64-*linux*) echo x86_64 ;;
        aarch64-*linux*) echo aarch64 ;;
        *) die "target $1: the recipe has manifests for Linux x86_64 and aarch64 only" ;;
    esac
}

# elf_machine FILE: the ELF e_machine of FILE (x86_64 or aarch64), to catch a wrong-arch copy.
elf_machine() {
    case "$(od -An -tx1 -j18 -N2 "$1" | tr -d ' \n')" in
        3e00) echo x86_64 ;;
        b700) echo aarch64 ;;
        *) echo unknown ;;
    esac
}

# prepare_cross TRIPLE: checks the Rust target and a linker are installed; exports the linker
# and C compiler for cargo and the cc crate. Says what to install when they are missing.
prepare_cross() {
    local triple="$1" arch upper linker_var cc_var gcc pkg
    arch="$(arch_of "$triple")"
    upper="$(printf '%s' "$triple" | tr 'a-z-' 'A-Z_')"
    linker_var="CARGO_TARGET_${upper}_LINKER"
    cc_var="CC_${triple//-/_}"
    gcc="$arch-linux-gnu-gcc"
    pkg="gcc-${arch//_/-}-linux-gnu"
    if command -v rustup >/dev/null 2>&1; then
        rustup target list --installed | grep -qx "$triple" \
            || die "the Rust target $triple is not installed: run  rustup target add $triple"
    else
        log "rustup not found; assuming the toolchain has the $triple standard library"
    fi
    if [[ -z "${!linker_var:-}" ]]; then
        command -v "$gcc" >/dev/null 2>&1 \
            || die "no linker for $triple: install $gcc (Debian/Ubuntu: sudo apt-get install $pkg), or set $linker_var to a linker for $triple"
        export "$linker_var=$gcc"
    fi
    if [[ -z "${!cc_var:-}" ]] && command -v "$gcc" >/dev/null 2>&1; then
        export "$cc_var=$gcc"
    fi
    log "cross build for $triple: $linker_var=${!linker_var}"
}

DEST="${ARTIFACTS_DIR:-artifacts}/$COMPONENT/$VERSION"
GDK_ARTIFACTS="greengrass-build/artifacts/$COMPONENT/$VERSION"
GDK_RECIPES="greengrass-build/recipes"

if [[ "$GDK" == 1 ]]; then
    gdk_version="$(sed -n 's/.*"version": *"\([^"]*\)".*/\1/p' gdk-config.json | head -n 1)"
    [[ "$gdk_version" == "$VERSION" ]] \
        || die "gdk-config.json has version ${gdk_version:-?}, Cargo.toml has $VERSION: make them equal"
    # GDK reads the project's recipe from ./recipe.yaml (resolving a link) and publishes
    # greengrass-build/recipes/<that file's name>.
    [[ -e recipe.yaml ]] \
        || die "GDK needs recipe.yaml at the project root: ln -s $RECIPE recipe.yaml"
    gdk_recipe_name="$(basename "$(readlink -f recipe.yaml)")"
fi

profile_args=()
[[ "$KEEP_DEBUG" == 1 ]] || profile_args=(--config 'profile.release.strip="debuginfo"')

built=()
for triple in $targets; do
    arch="$(arch_of "$triple")"
    if [[ "$triple" == "$HOST" ]]; then
        target_args=()
        out="${CARGO_TARGET_DIR:-target}/release/gatehouse"
    else
        target_args=(--target "$triple")
        out="${CARGO_TARGET_DIR:-target}/$triple/release/gatehouse"
    fi
    artifact="$DEST/gatehouse-$arch"
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "$triple -> $artifact"
        [[ "$GDK" == 1 ]] && echo "$triple -> $GDK_ARTIFACTS/gatehouse-$arch"
        continue
    fi
    [[ "$triple" == "$HOST" ]] || prepare_cross "$triple"
    log "building gatehouse $VERSION for $triple"
    "$CARGO" build --release --locked --bin gatehouse "${target_args[@]}" "${profile_args[@]}"
    machine="$(elf_machine "$out")"
    [[ "$machine" == "$arch" ]] || die "$out is a $machine binary, expected $arch"
    install -D -m 0755 "$out" "$artifact"
    built+=("$arch")
    log "$artifact: $(du -h "$artifact" | cut -f1), sha256 $(sha256sum "$artifact" | cut -d' ' -f1)"
    if [[ "$GDK" == 1 ]]; then
        install -D -m 0755 "$out" "$GDK_ARTIFACTS/gatehouse-$arch"
    fi
done

if [[ "$GDK" == 1 ]]; then
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "$RECIPE -> $GDK_RECIPES/$gdk_recipe_name"
        exit 0
    fi
    mkdir -p "$GDK_RECIPES"
    cp "$RECIPE" "$GDK_RECIPES/$gdk_recipe_name"
    log "$GDK_RECIPES/$gdk_recipe_name: the recipe, for gdk component publish"
    for arch in x86_64 aarch64; do
        [[ -f "$GDK_ARTIFACTS/gatehouse-$arch" ]] \
            || log "WARNING: no gatehouse-$arch in $GDK_ARTIFACTS: do not publish this build (the $arch manifest would name a missing artifact); build with TARGET=all"
    done
fi
[[ "$DRY_RUN" == 1 ]] || log "done: ${built[*]} in $DEST"
