#!/usr/bin/env bash
# test_luarocks.sh SOURCE_DIR: `luarocks make` of a copy of the checkout
# into a temporary tree, then a stock lua5.4 with that tree's paths
# (`luarocks path`) loads workerpool, runs a task and finds the embedded
# Lua modules; the tree's wpool command runs too.
set -euo pipefail
src=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
command -v luarocks >/dev/null || fail "luarocks is not installed (scripts/setup.sh)"

mkdir "$tmp/src"
tar -C "$src" --exclude='./build*' --exclude='./.git' -cf - . \
  | tar -C "$tmp/src" -xf -
(cd "$tmp/src" && luarocks --lua-version 5.4 make --tree "$tmp/tree") \
  >"$tmp/log" 2>&1 || { tail -30 "$tmp/log" >&2; fail "luarocks make"; }

eval "$(luarocks --lua-version 5.4 path --tree "$tmp/tree")"
out=$(cd "$tmp" && lua5.4 -e '
  local workerpool = require "workerpool"
  local pool = workerpool.new{ max_workers = 2 }
  print(pool:submit_wait(function(x) return x * 2 end, 21))
  assert(require "workerpool.retry")
  pool:stop_wait()
  print(package.searchpath("workerpool", package.cpath))')
grep -qx 42 <<<"$(head -1 <<<"$out")" || fail "task result: $out"
grep -q "^$tmp/tree/lib/lua/5.4/workerpool.so$" <<<"$out" \
  || fail "the module was not found in the tree: $out"
echo 'print(1 + 1)' >"$tmp/s.lua"
[ "$("$tmp/tree/bin/wpool" run "$tmp/s.lua")" = 2 ] || fail "tree's wpool run"
echo "luarocks: ok"
