#!/usr/bin/env bash
# Links the coroipc-capi static library into the two drop-in shared
# libraries of corosync 1.4's coroipc:
#
#   capi/link.sh [PROFILE_DIR|ARCHIVE [OUT_DIR]]
#       PROFILE_DIR  where cargo put libcoroipc_capi.a (default target/release),
#                    or ARCHIVE: the .a itself (the tests pass target/debug/deps/…)
#       OUT_DIR      where the libraries go (default PROFILE_DIR/capi)
#
# Output: OUT_DIR/libcoroipcs.so.4 (SONAME libcoroipcs.so.4, unversioned, as
# the original) and OUT_DIR/libcoroipcc.so.4 (SONAME libcoroipcc.so.4, with
# the COROSYNC_COROIPCC_3.0 node of capi/coroipcc.map), plus the
# development links libcoroipc{s,c}.so.
#
# Why not a cdylib: rustc hands the linker its own anonymous version
# script, which GNU ld refuses to combine with a named node. So: one
# relocatable object from the whole archive (`ld -r`), every global but the
# side's exported functions made local (`objcopy --keep-global-symbols`),
# then `cc -shared` with the SONAME (and, for the client, the version script).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
profile=${1:-$here/../target/release}
out=${2:-$profile/capi}
if [ -f "$profile" ]; then
  archive=$profile
  out=${2:-$(dirname "$profile")/capi}
else
  archive=$profile/libcoroipc_capi.a
fi
[ -f "$archive" ] || { echo "capi/link.sh: no $archive (run cargo build -p coroipc-capi first)" >&2; exit 2; }
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ld -r --whole-archive "$archive" -o "$tmp/all.o"
libs=(-lpthread -ldl -lgcc_s -lc -lm)
for side in coroipcs coroipcc; do
  objcopy --keep-global-symbols="$here/$side.symbols" "$tmp/all.o" "$tmp/$side.o"
  extra=()
  [ "$side" = coroipcc ] && extra=(-Wl,--version-script="$here/coroipcc.map")
  cc -shared -o "$out/lib$side.so.4" "$tmp/$side.o" -Wl,-soname,"lib$side.so.4" -Wl,--gc-sections \
    -Wl,-z,noexecstack "${extra[@]}" "${libs[@]}"
  ln -sf "lib$side.so.4" "$out/lib$side.so"
done
echo "capi/link.sh: $out/libcoroipcs.so.4 $out/libcoroipcc.so.4"
