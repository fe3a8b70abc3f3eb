#!/usr/bin/env bash
# lua-apicheck.sh [DIR]: builds Lua 5.4 with LUA_USE_APICHECK into DIR
# (default .cache/lua-apicheck), for the assertion build (docs/testing.md).
# Debian's liblua5.4 has no API checks, so this takes Debian's own source
# of the same version (apt-get source, with a deb-src list of its own, so
# the system's apt configuration is left alone) and builds from it
# DIR/lib/liblua.a (position-independent, so libwpool.so can take it),
# DIR/include/ and DIR/bin/lua, an interpreter that exports the Lua API to
# the modules it loads, as Debian's lua5.4 does.  Prints DIR.  Does nothing
# when DIR already holds a finished build.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.cache/lua-apicheck}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [ -f "$dir/done" ]; then echo "$dir"; exit 0; fi

work="$dir/src"
rm -rf "$work" && mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
# A source list of our own: the system's deb lines, as deb-src too.
sed 's/^Types: deb$/Types: deb deb-src/' /etc/apt/sources.list.d/debian.sources \
  >"$work/sources.sources"
apt_opts=(-o "Dir::Etc::sourcelist=$work/sources.sources"
          -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$work/lists"
          -o "Dir::Cache=$work/cache" -o "APT::Get::List-Cleanup=0")
apt-get "${apt_opts[@]}" update -qq >&2
(cd "$work" && apt-get "${apt_opts[@]}" source --download-only lua5.4 >&2)
tarball=$(ls "$work"/lua5.4_*.orig.tar.gz | head -n 1)
tar -C "$work" -xzf "$tarball"
top=$(ls -d "$work"/lua-5.4.*/ | head -n 1)
# Lua's own makefile: SYSCFLAGS/SYSLIBS as its "linux" target sets them.
make -C "$top/src" -j "$(nproc)" liblua.a lua \
  SYSCFLAGS="-DLUA_USE_LINUX" SYSLIBS="-Wl,-E -ldl" \
  MYCFLAGS="-fPIC -g -DLUA_USE_APICHECK" >&2
mkdir -p "$dir/lib" "$dir/include" "$dir/bin"
cp "$top/src/liblua.a" "$dir/lib/"
cp "$top/src/lua" "$dir/bin/"
cp "$top"/src/{lua.h,luaconf.h,lualib.h,lauxlib.h,lua.hpp} "$dir/include/"
rm -rf "$work"
touch "$dir/done"
echo "$dir"
