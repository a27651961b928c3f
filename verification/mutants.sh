#!/usr/bin/env bash
# Mutation audit: applies each mutant of verification/mutants/list (one
# small, plausible bug per patch) to the work tree, runs the suites listed
# for it, reverts it, and prints the kill matrix. A suite KILLS a mutant if
# it fails; "timeout" means it did not finish within MUTANT_TIMEOUT seconds
# (counted as not killed: a bug must be a failure, not a hang). Not part of
# CI (it rebuilds the ring once per mutant and suite); run it by hand:
#
#   verification/mutants.sh                      # every mutant
#   verification/mutants.sh peek-no-end-check    # some of them
#   MUTANT_TIMEOUT=600 CARGO_TARGET_DIR=/tmp/mt verification/mutants.sh
#
# Suites:
#   ring-unit      cargo test -p coroipc-ring --lib (double-fetch audit)
#   ring-int       the ring's integration tests (tests/*.rs)
#   prop           coroipc-verification's proptest state machines
#   loom           the loom models (release, --cfg coroipc_loom, 2 preemptions)
#   transport-lib  cargo test -p coroipc-transport --lib (waiter, futex)
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
target="${CARGO_TARGET_DIR:-target/mutants}"
limit="${MUTANT_TIMEOUT:-900}"
logdir=$(mktemp -d)

if ! git diff --quiet -- ring transport; then
  echo "mutants: ring/ or transport/ has uncommitted changes; commit or stash them first" >&2
  exit 2
fi

run_suite() {
  case "$1" in
    ring-unit) CARGO_TARGET_DIR="$target" cargo test -q -p coroipc-ring --lib ;;
    ring-int) CARGO_TARGET_DIR="$target" cargo test -q -p coroipc-ring \
      --test spsc --test mpsc --test hostile --test flow --test wait ;;
    prop) CARGO_TARGET_DIR="$target" cargo test -q -p coroipc-verification ;;
    loom) RUSTFLAGS="--cfg coroipc_loom" LOOM_MAX_PREEMPTIONS=2 CARGO_TARGET_DIR="$target/loom" \
      cargo test -q -p coroipc-verification --release --tests ;;
    transport-lib) CARGO_TARGET_DIR="$target" cargo test -q -p coroipc-transport --lib ;;
    *) echo "unknown suite $1"; return 2 ;;
  esac
}
export -f run_suite
export target

applied=""
revert() { if [ -n "$applied" ]; then git apply -R "$applied" && applied=""; fi; }
trap revert EXIT INT TERM

rows=()
while read -r name suites; do
  case "$name" in ''|'#'*) continue ;; esac
  if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
  patch="verification/mutants/$name.patch"
  if ! git apply --check "$patch" 2>/dev/null; then
    rows+=("$name|(patch does not apply)"); continue
  fi
  git apply "$patch" && applied="$patch"
  row="$name|"
  for suite in $suites; do
    start=$SECONDS
    timeout "$limit" bash -c "run_suite $suite" >"$logdir/$name.$suite.log" 2>&1
    rc=$?
    took=$((SECONDS - start))
    if [ $rc -eq 124 ]; then verdict="timeout"
    elif [ $rc -ne 0 ]; then verdict="KILLED"
    else verdict="survived"; fi
    echo "mutants: $name / $suite: $verdict (${took}s, log $logdir/$name.$suite.log)" >&2
    row+=" $suite=$verdict"
  done
  revert
  rows+=("$row")
done < verification/mutants/list

echo
echo "| mutant | suite verdicts |"
echo "|---|---|"
for r in "${rows[@]}"; do
  echo "| ${r%%|*} |${r#*|} |"
done
