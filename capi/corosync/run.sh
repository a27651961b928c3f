#!/usr/bin/env bash
# corosync 1.4.10, unmodified, on coroipc-rs's C ABI: builds corosync from
# its source tarball (capi/corosync/build.sh), links our libcoroipcs.so.4 and
# libcoroipcc.so.4 (capi/link.sh), starts corosync as a single node on
# loopback inside a private network namespace with both of our libraries
# first on LD_LIBRARY_PATH, checks that they were the ones loaded
# (/proc/PID/maps, ldd), and runs corosync's own tools and test programs.
#
#   capi/corosync/run.sh [--original] [TARBALL]
#       --original   the same run over the original libraries built from the
#                    same tarball (target/corosync/orig), for comparison
#       TARBALL      default ../shared/corosync/corosync-1.4.10.tar.gz
#
# Prints one PASS/FAIL line per check and a summary; exits 0 iff all pass.
# Without the tarball it says so and exits 0 (skipped). Needs root (unshare -n).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
mode=ours
if [ "${1:-}" = --original ]; then mode=original; shift; fi
tarball=${1:-$root/../shared/corosync/corosync-1.4.10.tar.gz}
if [ ! -f "$tarball" ]; then
  echo "corosync integration: SKIPPED: no corosync tarball at $tarball"
  exit 0
fi
build=${COROSYNC_BUILD_DIR:-$root/target/corosync}
if [ "$(id -u)" != 0 ]; then
  echo "corosync integration: SKIPPED: needs root (unshare -n, corosync's mlockall)"
  exit 0
fi
need=()
for t in ip:iproute2 unshare:util-linux objcopy:binutils stdbuf:coreutils cc:gcc; do
  command -v "${t%%:*}" >/dev/null || need+=("${t##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "corosync integration: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
"$root/capi/corosync/build.sh" "$tarball"

if [ "$mode" = ours ]; then
  target=${CARGO_TARGET_DIR:-$root/target}
  (cd "$root" && cargo build --release -p coroipc-capi --locked -q)
  overlay=$build/ours
  "$root/capi/link.sh" "$target/release" "$overlay" >/dev/null
  rm -f "$overlay"/*.so   # only the .so.4 files: nothing else to find there
else
  overlay=$build/orig
fi
echo "corosync integration: $mode libraries from $overlay"
exec unshare -n "$root/capi/corosync/checks.sh" "$build" "$overlay" "$root/capi/corosync/corosync.conf"
