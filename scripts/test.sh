#!/usr/bin/env bash
# test.sh: the whole test run, as CI does it.  Installs what is missing,
# checks formatting and lint, then builds and runs every test four times:
# a plain build with -Werror, under ASan+UBSan, under TSan, and with
# assertions on and a Lua with API checks (build-assert); then the
# hostile-input campaign of docs/testing.md: the allocation-failure build
# (build-fault, ASan) and each libFuzzer target for 60 s (build-fuzz).
#   bash scripts/test.sh            everything
#   bash scripts/test.sh --quick    the plain build only
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

quick=0
[ "${1:-}" = "--quick" ] && quick=1

echo "== lint"
bash scripts/lint.sh

run() { # DIR SANITIZER
  echo "== build $1 ${2:-plain}"
  bash scripts/build.sh "$1" "${2:-}"
  echo "== test $1"
  (cd "$1" && ctest --output-on-failure --timeout 600)
}

run build
if [ $quick -eq 0 ]; then
  run build-asan address
  run build-tsan thread
  echo "== assertion build (build-assert, Lua with LUA_USE_APICHECK)"
  bash scripts/lua-apicheck.sh >/dev/null
  cmake -S . -B build-assert -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DWPOOL_ASSERTIONS=ON -DWPOOL_WERROR=ON >/dev/null
  cmake --build build-assert -j "$(nproc)"
  (cd build-assert && ctest --output-on-failure --timeout 600)
  echo "== allocation-failure injection (build-fault)"
  cmake -S . -B build-fault -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DWPOOL_SANITIZE=address -DWPOOL_FAULT_INJECTION=ON -DWPOOL_WERROR=ON \
    >/dev/null
  cmake --build build-fault -j "$(nproc)" --target test_fault
  (cd build-fault && ctest --output-on-failure -R '^fault\.')
  echo "== fuzzing (build-fuzz)"
  bash scripts/fuzz.sh all "${WPOOL_FUZZ_SECONDS:-60}"
fi
echo "== all tests passed"
