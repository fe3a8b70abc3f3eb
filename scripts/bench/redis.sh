#!/usr/bin/env bash
# redis.sh: the Redis Streams benchmark (issue 15, docs/performance.md,
# "Redis Streams"): entries/s for 1, 2 and 3 `wpool pipeline run` consumer
# processes of one consumer group, and the cost per entry against a jsonl
# file source, on a private redis-server (scripts/bench/redis.lua).
#   bash scripts/bench/redis.sh [--entries N] [--reps R] [--build-dir DIR]
# Defaults: 200,000 entries, best of 3.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
build=build entries=200000 reps=3
while [ $# -gt 0 ]; do
  case "$1" in
    --entries) entries=$2; shift ;;
    --reps) reps=$2; shift ;;
    --build-dir) build=$2; shift ;;
    *) echo "redis.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
wpool=$root/$build/wpool
[ -x "$wpool" ] || { echo "redis.sh: $wpool not found (bash scripts/build.sh $build)" >&2; exit 2; }
command -v redis-server >/dev/null || { echo "redis.sh: redis-server not found (scripts/setup.sh)" >&2; exit 2; }
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
LUA_PATH="$root/tests/redis/?.lua;$root/lua/?.lua;;" \
  "$wpool" run "$root/scripts/bench/redis.lua" "$wpool" "$entries" "$reps"
