#!/usr/bin/env bash
# corosync's own cpgbench (mcast + dispatch + flow_control_get, 1000-byte
# messages, its first 10-second round) over our libraries and over the
# original ones, alternating, ROUNDS times each, in one invocation; prints
# coroipc-bench's line format (ops_per_s = messages/s). Needs what
# capi/corosync/run.sh needs (root, the tarball) and its builds.
#
#   capi/bench/cpgbench.sh [ROUNDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
rounds=${1:-3}
build=${COROSYNC_BUILD_DIR:-$root/target/corosync}
[ -x "$build/OBJ/test/cpgbench" ] && [ -f "$build/ours/libcoroipcc.so.4" ] || {
  echo "capi/bench/cpgbench.sh: run capi/corosync/run.sh first" >&2; exit 2; }
inner() { # inner OVERLAY TRANSPORT
  local work cs line
  work=$(mktemp -d /tmp/capi-cpgbench.XXXXXX)
  ip link set lo up
  export LD_LIBRARY_PATH=$1:$build/prefix/lib COROSYNC_MAIN_CONFIG_FILE=$root/capi/corosync/corosync.conf
  export COROSYNC_RUN_DIR=$work
  "$build/prefix/sbin/corosync" -f -p >"$work/log" 2>&1 &
  cs=$!
  for _ in $(seq 100); do "$build/prefix/sbin/corosync-cfgtool" -s >/dev/null 2>&1 && break; sleep 0.1; done
  timeout 12 stdbuf -oL "$build/OBJ/test/cpgbench" >"$work/out" 2>&1 || true
  line=$(grep -m1 'messages received' "$work/out" || true)
  kill -TERM $cs; wait $cs || true
  rm -rf "$work"
  # "N messages received  1000 bytes per write  10.000 Seconds runtime  X TP/s  Y MB/s."
  echo "$line" | awk -v t="$2" '{ printf "workload=cpgbench transport=%s median_ns=0 p99_ns=0 ops_per_s=%.0f gbps=%.3f\n", t, $11, $13 / 1000 }'
}
export -f inner
export build root
for _ in $(seq "$rounds"); do
  unshare -n bash -c 'inner "$0" capi' "$build/ours"
  unshare -n bash -c 'inner "$0" coroipc-1.4' "$build/orig"
done
