#!/usr/bin/env bash
# Deploys io.gatehouse.AgentGateway from this checkout to the Greengrass core device it runs on,
# as a local deployment (Java nucleus, greengrass-cli):
#   sudo /greengrass/v2/bin/greengrass-cli deployment create --recipeDir recipes \
#       --artifactDir artifacts --merge io.gatehouse.AgentGateway=<version> [--update-config FILE]
# Build the artifact first (scripts/build-artifact.sh). <version> is Cargo.toml's, which the
# recipe's ComponentVersion must equal.
#
# Usage: scripts/deploy-local.sh [--update-config FILE]     (from anywhere; it cds to the repo root)
#   --update-config FILE   passed through to greengrass-cli: a JSON file such as
#                          {"io.gatehouse.AgentGateway": {"MERGE": {"batch": {"maxDelayMs": 200}}}}
# Env (defaults):
#   GREENGRASS_ROOT=/greengrass/v2   the nucleus root; greengrass-cli is $GREENGRASS_ROOT/bin/greengrass-cli
#   RECIPES_DIR=recipes              e.g. greengrass-build/recipes after `gdk component build`
#   ARTIFACTS_DIR=artifacts          e.g. greengrass-build/artifacts; laid out as
#                                    <dir>/io.gatehouse.AgentGateway/<version>/gatehouse-<arch>
#   SUDO=sudo                        the privilege wrapper; empty when already root
# The nucleus reads both directories after this script returns: leave them in place until the
# deployment is done (greengrass-cli deployment status -i ID).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

COMPONENT=io.gatehouse.AgentGateway
GREENGRASS_ROOT="${GREENGRASS_ROOT:-/greengrass/v2}"
RECIPES_DIR="${RECIPES_DIR:-recipes}"
ARTIFACTS_DIR="${ARTIFACTS_DIR:-artifacts}"
if [[ -z "${SUDO+set}" ]]; then
    if [[ "$(id -u)" -eq 0 ]]; then SUDO=""; else SUDO=sudo; fi
fi

die() {
    printf 'deploy-local.sh: %s\n' "$*" >&2
    exit 1
}

# abs PATH: PATH made absolute (the nucleus, not this shell, resolves the paths it is given).
abs() { (cd "$(dirname "$1")" && printf '%s/%s\n' "$(pwd -P)" "$(basename "$1")"); }

UPDATE_CONFIG=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --update-config)
            [[ $# -ge 2 ]] || die "--update-config needs a FILE"
            UPDATE_CONFIG="$2"
            shift 2
            ;;
        --update-config=*)
            UPDATE_CONFIG="${1#*=}"
            shift
            ;;
        -h | --help)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

CLI="$GREENGRASS_ROOT/bin/greengrass-cli"
if ! $SUDO test -x "$CLI"; then
    if command -v ggl-cli >/dev/null 2>&1; then
        die "no greengrass-cli at $CLI, but ggl-cli is on PATH: this looks like nucleus lite. It wants the recipe named <name>-<version>.yaml; see docs/GREENGRASS.md (\"Nucleus lite\") for its ggl-cli deploy command."
    fi
    die "no greengrass-cli at $CLI. It comes with the Greengrass CLI component (aws.greengrass.Cli): deploy that component to this core device from the AWS IoT console or with aws greengrassv2 create-deployment, or install the nucleus with --deploy-dev-tools true. If the nucleus root is elsewhere, set GREENGRASS_ROOT (now $GREENGRASS_ROOT)."
fi

VERSION="$(sed -n '/^\[package\]/,/^\[/{s/^version *= *"\([^"]*\)".*/\1/p}' Cargo.toml | head -n 1)"
[[ -n "$VERSION" ]] || die "no version in Cargo.toml's [package] section"

[[ -d "$RECIPES_DIR" ]] || die "no recipe directory $RECIPES_DIR"
recipe=""
for f in "$RECIPES_DIR"/*.yaml "$RECIPES_DIR"/*.yml; do
    [[ -f "$f" ]] && grep -q "^ComponentName: *$COMPONENT *$" "$f" && recipe="$f"
done
[[ -n "$recipe" ]] || die "no recipe for $COMPONENT in $RECIPES_DIR"
recipe_version="$(sed -n 's/^ComponentVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$recipe")"
[[ "$recipe_version" == "$VERSION" ]] \
    || die "$recipe has ComponentVersion ${recipe_version:-?}, Cargo.toml has $VERSION: make them equal"

case "$(uname -m)" in
    x86_64 | amd64) arch=x86_64 ;;
    aarch64 | arm64) arch=aarch64 ;;
    *) die "this machine is $(uname -m); the recipe has manifests for Linux x86_64 and aarch64 only" ;;
esac
artifact="$ARTIFACTS_DIR/$COMPONENT/$VERSION/gatehouse-$arch"
[[ -f "$artifact" ]] || die "no $artifact: build it first with scripts/build-artifact.sh"

args=(deployment create
    --recipeDir "$(abs "$RECIPES_DIR")"
    --artifactDir "$(abs "$ARTIFACTS_DIR")"
    --merge "$COMPONENT=$VERSION")
if [[ -n "$UPDATE_CONFIG" ]]; then
    [[ -f "$UPDATE_CONFIG" ]] || die "--update-config: no file $UPDATE_CONFIG"
    args+=(--update-config "$(abs "$UPDATE_CONFIG")")
fi

echo "+ ${SUDO:+$SUDO }$CLI ${args[*]}" >&2
$SUDO "$CLI" "${args[@]}"

cat >&2 <<EOF
Follow it with:
  ${SUDO:+$SUDO }$CLI deployment list
  ${SUDO:+$SUDO }tail -F $GREENGRASS_ROOT/logs/$COMPONENT.log
Redeployed the same version with a rebuilt binary? The nucleus may keep the running process
(nothing in the recipe or configuration changed); restart it onto the new binary with
  ${SUDO:+$SUDO }$CLI component restart --names $COMPONENT
EOF
