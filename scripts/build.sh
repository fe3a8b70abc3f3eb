#!/usr/bin/env bash
# build.sh [DIR [SANITIZER]]: configures and builds wpool into DIR (default
# build/); SANITIZER is empty, "address" (ASan+UBSan) or "thread" (TSan).
# This is CI's build: warnings are errors (-DWPOOL_WERROR=ON, off for users).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build}
san=${2:-}
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DWPOOL_SANITIZE="$san" \
  -DWPOOL_WERROR=ON >/dev/null
cmake --build "$dir" -j "$(nproc)"
