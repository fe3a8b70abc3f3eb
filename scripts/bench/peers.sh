#!/usr/bin/env bash
# peers.sh: the whole-process peer workloads of ../shared/bench/peers/
# (issue 16) run interleaved: ours, luv, ours, luv, ... (and a second build
# of ours in each round with --base), so that the VM's drift hits every
# engine alike.  Prints each engine's median, minimum and maximum wall
# time in ms and, per run, luv's time over ours.
#   bash scripts/bench/peers.sh W1 [RUNS] [--base BUILD_DIR] [--build-dir DIR]
# Defaults: 15 runs, build/.  UV_THREADPOOL_SIZE=2 as the harness wants.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
peers=${WPOOL_PEERS:-$root/../shared/bench/peers}
w=${1:?usage: peers.sh W1|W2|W3|W4 [RUNS] [--base DIR] [--build-dir DIR]}
shift
runs=15
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then runs=$1; shift; fi
build=build base=
while [ $# -gt 0 ]; do
  case "$1" in
    --base) base=$2; shift ;;
    --build-dir) build=$2; shift ;;
    *) echo "peers.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ -f "$peers/bench_wpool.lua" ] || { echo "peers.sh: no harness in $peers" >&2; exit 2; }
export UV_THREADPOOL_SIZE=2
ms() { # runs "$@" once, prints its wall time in ms; fails on a wrong result
  local t0 t1
  t0=$(date +%s%N)
  "$@" >/dev/null || { echo "peers.sh: failed: $*" >&2; exit 1; }
  t1=$(date +%s%N)
  echo $(((t1 - t0) / 1000000))
}
ours=() luv=() old=()
for _ in $(seq "$runs"); do
  [ -z "$base" ] || old+=("$(ms env LUA_CPATH="$base/?.so;;" lua5.4 "$peers/bench_wpool.lua" "$w")")
  ours+=("$(ms env LUA_CPATH="$root/$build/?.so;;" lua5.4 "$peers/bench_wpool.lua" "$w")")
  luv+=("$(ms lua5.4 "$peers/bench_luv.lua" "$w")")
done
stats() {
  printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1}
    END {m = NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
         printf "median %d ms, min %d, max %d", m, a[1], a[NR]}'
}
echo "$w, $runs interleaved runs, load $(cut -d' ' -f1-3 /proc/loadavg)"
[ -z "$base" ] || echo "  base ($base): $(stats "${old[@]}")"
echo "  ours ($build): $(stats "${ours[@]}")"
echo "  luv: $(stats "${luv[@]}")"
printf '  luv / ours per run:'
for i in "${!ours[@]}"; do awk -v a="${luv[$i]}" -v b="${ours[$i]}" 'BEGIN {printf " %.2f", a / b}'; done
echo
