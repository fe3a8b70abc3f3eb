#!/usr/bin/env bash
# lint.sh: fails when C files are not clang-formatted or Lua files do not
# pass luacheck.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t cfiles < <(git ls-files '*.c' '*.h')
if [ ${#cfiles[@]} -gt 0 ]; then
  clang-format --dry-run --Werror "${cfiles[@]}"
fi
mapfile -t lfiles < <(git ls-files '*.lua')
if [ ${#lfiles[@]} -gt 0 ]; then
  luacheck -q "${lfiles[@]}"
fi
