#!/usr/bin/env bash
# test_install.sh SOURCE_DIR BUILD_DIR: installs the build into a temporary
# prefix and checks what a user gets there: the layout, the library's
# SONAME and exported symbols, the Lua module in a stock lua5.4, the man
# page, and scripts/examples/embed_tick.c built out of tree both with
# pkg-config and with find_package(wpool), each run to completion, and a
# small C host whose require "luv" runs a timer on the host loop.
set -euo pipefail
src=$1
build=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
p=$tmp/prefix
fail() { echo "FAIL: $*" >&2; exit 1; }

cmake --install "$build" --prefix "$p" >/dev/null

for f in bin/wpool lib/lua/5.4/workerpool.so lib/libwpool.so lib/libwpool.a \
         include/wpool/wpool.h include/wpool/wpool_host.h \
         lib/pkgconfig/wpool.pc lib/cmake/wpool/wpoolConfig.cmake \
         lib/cmake/wpool/wpoolConfigVersion.cmake \
         share/man/man1/wpool.1; do
  [ -e "$p/$f" ] || fail "missing $f"
done
"$p/bin/wpool" --version >/dev/null || fail "installed wpool --version"

# The shared library: a SONAME, and only the wp_ and wpool_host_ API.
readelf -d "$p/lib/libwpool.so" | grep -q 'SONAME.*\[libwpool\.so\.[0-9]' \
  || fail "libwpool.so has no SONAME"
syms=$(nm -D --defined-only "$p/lib/libwpool.so" | awk '{print $3}')
grep -qx wpool_host_new <<<"$syms" || fail "wpool_host_new not exported"
grep -qx wp_pool_new <<<"$syms" || fail "wp_pool_new not exported"
extra=$(grep -Ev '^(wp_|wpool_host_)' <<<"$syms" || true)
[ -z "$extra" ] || fail "libwpool.so exports more than the API: $extra"
# Both libraries carry the embedded lua/workerpool modules.
archive=$(nm "$p/lib/libwpool.a" 2>/dev/null)
grep -q ' [DdRr] wpl_lua_modules$' <<<"$archive" || fail "libwpool.a lacks the embedded Lua modules"

# The module, for a stock lua5.4 with the prefix's paths.
LUA_CPATH="$p/lib/lua/5.4/?.so" lua5.4 -e \
  'assert(require("workerpool").new and require("workerpool.retry"))' \
  || fail "the installed module does not load"

# The man page renders, without warnings.
page=$p/share/man/man1/wpool.1
warn=$(groff -man -Tutf8 -ww -z "$page" 2>&1) || fail "groff: $warn"
[ -z "$warn" ] || fail "man page warnings: $warn"
if command -v man >/dev/null; then
  out=$(MANWIDTH=80 man -l "$page" 2>&1)
else
  out=$(groff -man -Tutf8 "$page" 2>&1)
fi
for section in SYNOPSIS OPTIONS "EXIT STATUS" SIGNALS ENVIRONMENT; do
  grep -q "^$section" <<<"$out" || fail "man page lacks $section"
done

# Out-of-tree builds of the embedding example against the prefix.
mkdir "$tmp/pc" "$tmp/cm"
cp "$src/scripts/examples/embed_tick.c" "$tmp/pc/"
cp "$src/scripts/examples/embed_tick.c" "$tmp/cm/"
want="results received on the loop thread: 480 of 480"

export PKG_CONFIG_PATH=$p/lib/pkgconfig
(cd "$tmp/pc" && cc -o embed_tick embed_tick.c \
  $(pkg-config --cflags --libs wpool)) || fail "pkg-config build"
LD_LIBRARY_PATH=$p/lib "$tmp/pc/embed_tick" >"$tmp/pc/out" \
  || fail "pkg-config build: embed_tick failed: $(cat "$tmp/pc/out")"
grep -q "$want" "$tmp/pc/out" || fail "pkg-config build: $(cat "$tmp/pc/out")"

# A C host's require "luv" is luv on the host's own loop.
cat >"$tmp/pc/luv_host.c" <<'C'
#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>
#include <uv.h>
#include "wpool_host.h"
int main(void) {
  uv_loop_t loop;
  lua_State *L = luaL_newstate();
  wpool_host *h;
  int fired;
  uv_loop_init(&loop);
  luaL_openlibs(L);
  if (wpool_host_new(&loop, L, &h) != 0) return 1;
  if (luaL_dostring(L, "local uv = require 'luv'\n"
                       "local t = uv.new_timer()\n"
                       "t:start(1, 0, function() t:close(); fired = true end)"))
    return fprintf(stderr, "%s\n", lua_tostring(L, -1)), 1;
  uv_run(&loop, UV_RUN_DEFAULT); /* ends once the luv timer closed */
  lua_getglobal(L, "fired");
  fired = lua_toboolean(L, -1);
  wpool_host_close(h);
  uv_run(&loop, UV_RUN_DEFAULT);
  lua_close(L);
  uv_loop_close(&loop);
  puts(fired ? "luv on the host loop" : "the luv timer never fired");
  return !fired;
}
C
(cd "$tmp/pc" && cc -o luv_host luv_host.c $(pkg-config --cflags --libs wpool)) \
  || fail "luv host build"
LD_LIBRARY_PATH=$p/lib "$tmp/pc/luv_host" || fail "luv in a C host"

cat >"$tmp/cm/CMakeLists.txt" <<'CM'
cmake_minimum_required(VERSION 3.16)
project(embed_tick C)
find_package(wpool CONFIG REQUIRED)
add_executable(embed_tick embed_tick.c)
target_link_libraries(embed_tick PRIVATE wpool::wpool)
CM
cmake -S "$tmp/cm" -B "$tmp/cm/build" -DCMAKE_PREFIX_PATH="$p" >/dev/null \
  || fail "find_package(wpool) configure"
cmake --build "$tmp/cm/build" >/dev/null || fail "find_package(wpool) build"
"$tmp/cm/build/embed_tick" >"$tmp/cm/out" \
  || fail "CMake build: embed_tick failed: $(cat "$tmp/cm/out")"
grep -q "$want" "$tmp/cm/out" || fail "CMake build: $(cat "$tmp/cm/out")"
echo "install: ok"
