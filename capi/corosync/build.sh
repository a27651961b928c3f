#!/usr/bin/env bash
# Builds corosync 1.4.10 from its source tarball into an ignored directory,
# plus the original coroipc libraries (libcoroipcs.so.4, libcoroipcc.so.4)
# compiled on their own from the same tree, for side-by-side comparison.
#
#   capi/corosync/build.sh [TARBALL]     # default: ../shared/corosync/corosync-1.4.10.tar.gz
#
# Output (under target/corosync/, reused when already built):
#   SRC/      the unpacked source        OBJ/    the build tree (test programs in OBJ/test/)
#   prefix/   `make install`             orig/   the original libcoroipc{s,c}.so.4
#
# Installs its build dependencies with apt-get when they are missing.
# Touches no system files otherwise: everything lives under target/corosync.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
tarball=${1:-$root/../shared/corosync/corosync-1.4.10.tar.gz}
out=${COROSYNC_BUILD_DIR:-$root/target/corosync}
if [ ! -f "$tarball" ]; then
  echo "corosync build: no tarball at $tarball" >&2
  exit 2
fi
tarball=$(cd "$(dirname "$tarball")" && pwd)/$(basename "$tarball")
stamp=$out/.built-$(sha256sum "$tarball" | cut -c1-16)
if [ -f "$stamp" ]; then
  echo "corosync build: up to date in $out"
  exit 0
fi

need=()
for t in autoreconf:autoconf automake:automake libtoolize:libtool pkg-config:pkg-config gcc:gcc make:make; do
  command -v "${t%%:*}" >/dev/null || need+=("${t##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "corosync build: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi

rm -rf "$out"
mkdir -p "$out/SRC" "$out/OBJ" "$out/prefix" "$out/orig"
tar -xzf "$tarball" -C "$out/SRC" --strip-components=1
echo 1.4.10 > "$out/SRC/.tarball-version"
(cd "$out/SRC" && GIT_CEILING_DIRECTORIES=$out autoreconf -i >/dev/null 2>&1)
P=$out/prefix
(cd "$out/OBJ" && GIT_CEILING_DIRECTORIES=$out ../SRC/configure --prefix="$P" --localstatedir="$P/var" \
  --sysconfdir="$P/etc" --with-socket-dir="$P/var/run" --disable-nss ac_cv_prog_GROFF= >configure.log 2>&1)
(cd "$out/OBJ" && GIT_CEILING_DIRECTORIES=$out make -j2 >make.log 2>&1 && make install >install.log 2>&1)

# The original libraries, compiled on their own with their SONAMEs (and the
# client's version script), as the corosync tree builds them.
inc=(-D_GNU_SOURCE -fPIC -O2 -I "$out/OBJ/include/corosync" -I "$out/OBJ/include" -I "$out/SRC/include")
gcc "${inc[@]}" -shared -o "$out/orig/libcoroipcc.so.4" "$out/SRC/lib/coroipcc.c" \
  -Wl,-soname,libcoroipcc.so.4 -Wl,-version-script="$out/SRC/lib/libcoroipcc.versions" -lpthread
gcc "${inc[@]}" -I "$out/SRC/exec" -shared -o "$out/orig/libcoroipcs.so.4" "$out/SRC/exec/coroipcs.c" \
  -Wl,-soname,libcoroipcs.so.4 -lpthread -lrt
touch "$stamp"
echo "corosync build: done in $out"
