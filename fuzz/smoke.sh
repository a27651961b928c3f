#!/usr/bin/env bash
# Fuzz smoke run: build every cargo-fuzz target and run each for
# ${FUZZ_SECONDS:-30} seconds. Exits non-zero if a target fails to build or
# finds a crash (the input is left in fuzz/artifacts/<target>/). Called from
# .ci/run; runs the same locally: `bash fuzz/smoke.sh`.
set -euo pipefail

cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-30}"

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    if [ "${CI:-}" = true ]; then
        # In CI a missing toolchain must not turn the fuzz run into a pass.
        echo "fuzz smoke: no nightly toolchain, installing it"
        if ! rustup toolchain install nightly --profile minimal; then
            echo "fuzz smoke: FAILED: no nightly toolchain and it cannot be installed (CI=true)"
            exit 1
        fi
    else
        echo "fuzz smoke: skipped, no nightly toolchain (cargo-fuzz needs one: rustup toolchain install nightly; with CI=true this is a failure)"
        exit 0
    fi
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz smoke: installing cargo-fuzz"
    cargo install --locked cargo-fuzz   # set -e: a failed install fails the run
fi

cargo +nightly fuzz build

targets=$(cargo +nightly fuzz list)
failed=()
for target in $targets; do
    echo "fuzz smoke: ${target} for ${seconds}s"
    mkdir -p "corpus/${target}"
    seeds=()
    if [ -d "seeds/${target}" ]; then
        seeds=("seeds/${target}")
    fi
    # The first corpus directory collects new inputs; seeds are read only.
    if ! cargo +nightly fuzz run "${target}" "corpus/${target}" "${seeds[@]}" -- \
        -max_total_time="${seconds}" -print_final_stats=1; then
        failed+=("${target}")
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz smoke: FAILED: ${failed[*]} (crash inputs in fuzz/artifacts/)"
    exit 1
fi
echo "fuzz smoke: all targets ran ${seconds}s without a crash: ${targets//$'\n'/ }"
