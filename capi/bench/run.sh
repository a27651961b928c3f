#!/usr/bin/env bash
# The C ABI benchmark, in one invocation over both library pairs: our
# libcoroipc{s,c}.so.4 (release build, capi/link.sh) and the original ones
# built from the corosync 1.4.10 tarball (capi/corosync/build.sh). One
# server binary (capi/tests/c/test_server.c) and one client binary
# (capi/bench/bench_client.c), compiled once against include/corosync/*.h;
# LD_LIBRARY_PATH picks the pair. Prints coroipc-bench's line format
# (transport=capi: ours through the C ABI; transport=coroipc-1.4: the
# original), then the ratio.
#
#   capi/bench/run.sh [ROUND_TRIPS [MESSAGES]] [-- TARBALL]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
rt=${1:-200000} ev=${2:-500000}
target=${CARGO_TARGET_DIR:-$root/target}
build=${COROSYNC_BUILD_DIR:-$root/target/corosync}
(cd "$root" && cargo build --release -p coroipc-capi --locked -q)
work=$target/capi-bench
"$root/capi/link.sh" "$target/release" "$work/ours" >/dev/null
have_orig=false
if "$root/capi/corosync/build.sh" >/dev/null 2>&1; then have_orig=true; fi
inc=(-O2 -I "$root/include")
cc "${inc[@]}" -rdynamic -o "$work/test_server" "$root/capi/tests/c/test_server.c" -L"$work/ours" -lcoroipcs -lpthread
cc "${inc[@]}" -o "$work/bench_client" "$root/capi/bench/bench_client.c" -L"$work/ours" -lcoroipcc -lpthread

run() { # run LIBDIR TRANSPORT
  local sock=capi-bench-$$-$2 srv
  LD_LIBRARY_PATH=$1 "$work/test_server" "$sock" >/dev/null &
  srv=$!
  LD_LIBRARY_PATH=$1 "$work/bench_client" "$sock" "$2" "$rt" "$ev" | tee -a "$work/lines"
  kill -TERM "$srv"
  wait "$srv" || true
}
: >"$work/lines"
run "$work/ours" capi
if $have_orig; then
  run "$build/orig" coroipc-1.4
else
  echo "capi bench: no original libraries (no corosync tarball): skipped coroipc-1.4"
fi
awk '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
       r[v["workload"] "/" v["transport"]] = v["ops_per_s"] }
     END { for (w in r) { split(w, p, "/"); if (p[2] == "capi" && r[p[1] "/coroipc-1.4"] > 0)
             printf "%s: capi / coroipc-1.4 = %.1fx\n", p[1], r[w] / r[p[1] "/coroipc-1.4"] } }' "$work/lines"
