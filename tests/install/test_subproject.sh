#!/usr/bin/env bash
# test_subproject.sh SOURCE_DIR: the build options a user meets, on a
# machine without Criterion (pkg-config is shown every .pc file but
# criterion's): -DWPOOL_BUILD_TESTS=OFF configures; a parent project's
# add_subdirectory(wpool) configures, defines no tests nor wpool's example
# (whose target name a parent may use), and keeps its own compile flags while wpool's targets get wpool's warnings (and no -Werror,
# which is for CI); the default top-level configure, which builds the
# tests, asks for Criterion.  Configure only: nothing is compiled.
set -euo pipefail
src=$(cd "$1" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

mkdir "$tmp/pc"
IFS=: read -ra dirs <<<"$(pkg-config --variable pc_path pkg-config)"
for d in "${dirs[@]}"; do
  for f in "$d"/*.pc; do
    [ -e "$f" ] || continue
    name=$(basename "$f")
    [ "$name" = criterion.pc ] || [ -e "$tmp/pc/$name" ] || ln -s "$f" "$tmp/pc/$name"
  done
done
export PKG_CONFIG_LIBDIR=$tmp/pc
unset PKG_CONFIG_PATH
pkg-config --exists lua5.4 || fail "the filtered pkg-config lost lua5.4"
if pkg-config --exists criterion; then fail "criterion is still visible"; fi

# The tests off: configures without Criterion, and without -Werror.
cmake -S "$src" -B "$tmp/off" -DWPOOL_BUILD_TESTS=OFF >"$tmp/off.log" 2>&1 \
  || fail "-DWPOOL_BUILD_TESTS=OFF needs more than the libraries: $(cat "$tmp/off.log")"
flags=$tmp/off/CMakeFiles/wpool.dir/flags.make
grep -q -- -Wshadow "$flags" || fail "wpool's targets lost their warnings"
if grep -q -- -Werror "$flags"; then fail "-Werror is on by default"; fi
[ ! -d "$tmp/off/tests" ] || fail "tests configured with WPOOL_BUILD_TESTS=OFF"

# A parent project with wpool as a subdirectory.
mkdir "$tmp/parent"
cat >"$tmp/parent/CMakeLists.txt" <<CM
cmake_minimum_required(VERSION 3.16)
project(parent C)
enable_testing()
add_subdirectory("$src" wpool)
add_executable(embed_tick main.c)    # a name wpool's example has too
target_link_libraries(embed_tick PRIVATE wpool_static)
CM
echo 'int main(void) { return 0; }' >"$tmp/parent/main.c"
cmake -S "$tmp/parent" -B "$tmp/parent/build" >"$tmp/parent.log" 2>&1 \
  || fail "add_subdirectory(wpool) does not configure: $(cat "$tmp/parent.log")"
tests=$(cd "$tmp/parent/build" && ctest -N | sed -n 's/^Total Tests: //p')
[ "$tests" = 0 ] || fail "a subproject build defines $tests tests"
app=$tmp/parent/build/CMakeFiles/embed_tick.dir/flags.make
if grep -Eq -- '-Wshadow|_GNU_SOURCE' "$app"; then
  fail "wpool's flags leak into the parent's targets: $(cat "$app")"
fi
grep -q -- -Wshadow "$tmp/parent/build/wpool/CMakeFiles/wpool.dir/flags.make" \
  || fail "wpool's own targets lost their warnings in a subproject"

# The default top-level configure builds the tests, so it needs Criterion
# (and says so): this is what makes the two cases above meaningful.
if cmake -S "$src" -B "$tmp/on" >"$tmp/on.log" 2>&1; then
  fail "configured the tests without Criterion"
fi
grep -q criterion "$tmp/on.log" || fail "no word of Criterion: $(cat "$tmp/on.log")"
echo "subproject: ok"
