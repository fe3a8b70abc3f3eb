#!/usr/bin/env bash
# fuzz.sh TARGET [SECONDS]: builds the libFuzzer targets of tests/fuzz in
# build-fuzz/ (clang, ASan+UBSan, -DWPOOL_FUZZ=ON) and runs TARGET for
# SECONDS (default 60).  TARGET is a name from tests/fuzz/CMakeLists.txt
# (decode, roundtrip, http, pipeline), or "all" to run each in turn.
#
# A run starts from the seeds in tests/fuzz/corpus/fuzz_TARGET/ plus what
# earlier runs found (build-fuzz/corpus/TARGET/, where new inputs go).  A
# crash, leak, sanitizer report or hang (-timeout) is saved under
# build-fuzz/artifacts/TARGET/ and makes the script fail; reproduce it with
#   build-fuzz/tests/fuzz/fuzz_TARGET build-fuzz/artifacts/TARGET/crash-...
# Extra arguments after SECONDS go to libFuzzer (e.g. -jobs=2).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: fuzz.sh TARGET|all [SECONDS [libFuzzer options]]}
seconds=${2:-60}
shift $(($# < 2 ? $# : 2))
dir=build-fuzz

# A cache made with another compiler would be reset without our options.
if [ -f "$dir/CMakeCache.txt" ] &&
  ! grep -q '^CMAKE_C_COMPILER:.*clang-14$' "$dir/CMakeCache.txt"; then
  rm -rf "$dir"
fi
cmake -S . -B "$dir" -DCMAKE_C_COMPILER=clang-14 -DWPOOL_FUZZ=ON -DWPOOL_WERROR=ON \
  -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
read -r -a targets <"$dir/fuzz_targets.txt"
IFS=';' read -r -a targets <<<"${targets[*]}"
if [ "$target" != all ]; then
  [[ " ${targets[*]} " == *" $target "* ]] ||
    { echo "fuzz.sh: no target '$target' (${targets[*]})" >&2; exit 2; }
  targets=("$target")
fi
cmake --build "$dir" -j "$(nproc)" --target "${targets[@]/#/fuzz_}"

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
for t in "${targets[@]}"; do
  seeds=tests/fuzz/corpus/fuzz_$t
  mkdir -p "$dir/corpus/$t" "$dir/artifacts/$t"
  opts=(-max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048
        -print_final_stats=1 -artifact_prefix="$dir/artifacts/$t/")
  [ -f "tests/fuzz/fuzz_$t.dict" ] && opts+=(-dict="tests/fuzz/fuzz_$t.dict")
  [ -f "tests/fuzz/fuzz_$t.options" ] && read -r -a more <"tests/fuzz/fuzz_$t.options" \
    && opts+=("${more[@]}")
  echo "== fuzz $t for ${seconds}s"
  "$dir/tests/fuzz/fuzz_$t" "${opts[@]}" "$@" "$dir/corpus/$t" "$seeds"
done
