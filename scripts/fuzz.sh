#!/usr/bin/env bash
# The short fuzzing run (docs/FUZZING.md): builds the cargo-fuzz targets in tests/fuzz and runs
# each for FUZZ_SECONDS (default 20) from the committed seed corpus. Exits non-zero when a target
# crashes (a panic, a failed check, a hang past the per-input timeout, running out of memory),
# after running the others; the crashing input is kept under target/fuzz/artifacts/<target>/.
#
# Environment:
#   FUZZ_SECONDS    seconds per target (default 20)
#   FUZZ_SANITIZER  none (default: the CI setting) or address (AddressSanitizer; slower to
#                   build and to run, see docs/FUZZING.md)
#   FUZZ_TARGETS    the targets to run, space-separated (default: all three)
#
# The toolchain is stable; cargo-fuzz needs nightly compiler flags (-Zsanitizer, the coverage
# instrumentation), which RUSTC_BOOTSTRAP=1 allows on a stable compiler.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-20}
sanitizer=${FUZZ_SANITIZER:-none}
read -r -a targets <<<"${FUZZ_TARGETS:-mqtt_packets session envelope_decode}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "scripts/fuzz.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --version 0.13.2
fi

# The fuzz crate's Cargo.lock is committed: fail rather than resolve anew.
cargo metadata --locked --format-version 1 --manifest-path tests/fuzz/Cargo.toml >/dev/null

# Build output stays under the gateway's target/ (ignored by git, and out of tests/, whose
# sources the hygiene test reads).
opts=(--fuzz-dir tests/fuzz --target-dir target/fuzz --sanitizer "$sanitizer")
cargo fuzz build "${opts[@]}"

failed=()
for target in "${targets[@]}"; do
  # New inputs the run finds go to a scratch corpus; the committed seeds are only read.
  work=target/fuzz/corpus/$target
  artifacts=target/fuzz/artifacts/$target/
  mkdir -p "$work" "$artifacts"
  echo "scripts/fuzz.sh: fuzzing $target for ${seconds}s (sanitizer: $sanitizer)" >&2
  if ! cargo fuzz run "${opts[@]}" "$target" "$work" "tests/fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 \
    -artifact_prefix="$artifacts" -print_final_stats=1; then
    failed+=("$target")
  fi
done

# One plain closing line, as test runners print.
echo "fuzz: $((${#targets[@]} - ${#failed[@]})) passed, ${#failed[@]} failed"
if [ ${#failed[@]} -gt 0 ]; then
  echo "scripts/fuzz.sh: FAILED: ${failed[*]}; crashing inputs in target/fuzz/artifacts/ (docs/FUZZING.md says how to reproduce and minimise them)" >&2
  exit 1
fi
