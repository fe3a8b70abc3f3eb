#!/usr/bin/env bash
# test.sh: the whole test run, as CI does it.  Installs what is missing,
# checks formatting and lint, then builds and runs every test three times:
# a plain build with -Werror, under ASan+UBSan, and under TSan.
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
fi
echo "== all tests passed"
