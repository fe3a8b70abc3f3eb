#!/usr/bin/env bash
# redis.sh: the Redis Streams example (docs/scale-out.md).  Starts a local
# redis-server on 127.0.0.1:6399 in a temporary folder, adds 2,000 webhook
# jobs (a few for a customer whose endpoint always fails), runs two
# `wpool pipeline run redis-stream.json` consumers of the group `wpool`
# until every job is done, stops them with SIGTERM, prints what is in the
# result and dead-letter streams, and stops the server.
#   bash scripts/examples/pipeline/redis.sh [path/to/wpool]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
wpool=${1:-$here/../../../build/wpool}
port=6399
dir=$(mktemp -d)
cli() { redis-cli -p "$port" "$@"; }
cleanup() {
  [ -n "${pids:-}" ] && kill $pids 2>/dev/null || true
  cli shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
if cli ping >/dev/null 2>&1; then
  echo "redis.sh: something already listens on port $port" >&2; exit 1
fi
redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --daemonize yes \
  --appendonly yes --save '' --logfile "$dir/redis.log"
until cli ping >/dev/null 2>&1; do sleep 0.05; done
cli eval "for i = 1, 2000 do
  local c = (i % 500 == 0) and 'broken' or ('customer-' .. (i % 7))
  redis.call('XADD', 'jobs', '*', 'customer', c, 'url', 'https://example.com/hook/' .. i,
             'body', '{\"n\":' .. i .. '}')
end return 1" 0 >/dev/null
cd "$here"
pids=""
for i in 1 2; do
  "$wpool" pipeline run --no-progress --log-level warn redis-stream.json 2>"$dir/consumer$i.log" &
  pids="$pids $!"
done
# Done when every job has a result or a dead letter and nothing is pending.
while :; do
  done_n=$(( $(cli xlen results) + $(cli xlen jobs.dead) ))
  pending=$(cli xpending jobs wpool | head -1)
  [ "$done_n" -ge 2000 ] && [ "$pending" = 0 ] && break
  sleep 0.2
done
kill -TERM $pids
wait $pids || true
pids=""
echo "results:      $(cli xlen results)"
echo "dead letters: $(cli xlen jobs.dead)"
echo "pending:      $(cli xpending jobs wpool | head -1)"
echo "a dead letter:"
cli xrange jobs.dead - + count 1 | sed -n '1,20p' | paste -sd' ' | cut -c1-300
