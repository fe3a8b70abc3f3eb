#!/usr/bin/env bash
# run.sh: runs the benchmark suite (W1-W6 on wpool, W1-W4 on luv in the same
# run) from the repository root, after building the RelWithDebInfo tree.
#   bash scripts/bench/run.sh            full run (about 3 minutes), with
#                                        instruction counts under callgrind
#   bash scripts/bench/run.sh --quick    smoke run: small sizes, checksums
#                                        only matter; exits 1 on a failure
# Other options: --no-build (use the build tree as it is), --build-dir DIR,
# --reps N, --json FILE, --callgrind, --no-callgrind, --only W1,W3 (see
# driver.lua).  The table goes to stdout, progress to stderr, and the JSON
# to DIR/bench/results.json unless --json says otherwise.
set -euo pipefail
cd "$(dirname "$0")/../.."

build=build
do_build=1
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) do_build=0 ;;
    --build-dir) build=${2:?--build-dir needs a value}; shift ;;
    *) args+=("$1") ;;
  esac
  shift
done

# Benchmark-only tools, installed here rather than by scripts/setup.sh:
# valgrind for the callgrind counts of a full run.
case " ${args[*]-} " in
  *" --quick "*|*" --no-callgrind "*) ;;
  *)
    if ! command -v valgrind >/dev/null; then
      if [ "$(id -u)" -eq 0 ]; then
        echo "run.sh: installing valgrind" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq \
          --no-install-recommends valgrind >/dev/null
      else
        echo "run.sh: valgrind is not installed (apt-get install valgrind, or --no-callgrind)" >&2
        exit 2
      fi
    fi ;;
esac

if [ $do_build -eq 1 ]; then
  bash scripts/build.sh "$build" >/dev/null
fi
if [ ! -f "$build/workerpool.so" ]; then
  echo "run.sh: $build/workerpool.so not found (build first: bash scripts/build.sh $build)" >&2
  exit 2
fi
if ! lua5.4 -e 'require "luv"' 2>/dev/null; then
  echo "run.sh: luv is not installed (apt-get install lua-luv, or bash scripts/setup.sh)" >&2
  exit 2
fi
exec lua5.4 scripts/bench/driver.lua --build-dir "$build" ${args[@]+"${args[@]}"}
