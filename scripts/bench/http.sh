#!/usr/bin/env bash
# http.sh: the HTTP benchmark (issue 14, docs/performance.md, "HTTP
# server"): scripts/examples/http_server.lua under `wpool run`, loaded by
# wrk over keep-alive connections, one wrk run per path; reports req/s and
# the latency percentiles wrk measures (p50, p99), then stops the server
# with SIGTERM and checks that it drained cleanly (exit status 0).
#   bash scripts/bench/http.sh [--build-dir DIR] [--duration S]
#        [--connections C] [--threads T] [--workers W] [--reps R]
#        [--path P]...
# Defaults: build/, 10 s per run, 50 connections, 1 wrk thread, 2 pool
# workers, 3 repetitions, paths / (a tiny task: the loop, parser and pool
# round trip) and /work?n=10000 (10,000 rounds of hashing per request, in
# the pool).  The figure per path is the median over the repetitions.  wrk is
# a benchmark-only tool, installed here (apt-get, as root) when missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
build=build duration=10 conns=50 threads=1 workers=2 reps=3
paths=()
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build=$2; shift ;;
    --duration) duration=$2; shift ;;
    --connections) conns=$2; shift ;;
    --threads) threads=$2; shift ;;
    --workers) workers=$2; shift ;;
    --reps) reps=$2; shift ;;
    --path) paths+=("$2"); shift ;;
    *) echo "http.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ ${#paths[@]} -gt 0 ] || paths=("/" "/work?n=10000")
case "$build" in /*) ;; *) build=$root/$build ;; esac
wpool=$build/wpool
[ -x "$wpool" ] || { echo "http.sh: $wpool not found (bash scripts/build.sh $build)" >&2; exit 2; }

if ! command -v wrk >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "http.sh: installing wrk" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends wrk >/dev/null
  else
    echo "http.sh: wrk is not installed (apt-get install wrk)" >&2
    exit 2
  fi
fi

work=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

"$wpool" run --log-file "$work/log" scripts/examples/http_server.lua 0 "$workers" &
pid=$!
port=
for _ in $(seq 1 200); do
  port=$(grep -o '"port":[0-9]*' "$work/log" 2>/dev/null | head -1 | cut -d: -f2 || true)
  [ -n "$port" ] && break
  kill -0 "$pid" 2>/dev/null || { echo "http.sh: the server died: $(cat "$work/log")" >&2; exit 1; }
  sleep 0.05
done
[ -n "$port" ] || { echo "http.sh: the server did not start" >&2; exit 1; }

echo "wpool $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?'), cores: $(nproc), load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "wrk -t$threads -c$conns -d${duration}s --latency, pool workers: $workers, reps: $reps"

# Prints "req/s p50_ms p99_ms non2xx" of one wrk run's output.
parse() {
  awk '
    function ms(v) {
      if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
      if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
      if (v ~ /s$/) return substr(v, 1, length(v) - 1) * 1000
      return v
    }
    /^ +50%/ { p50 = ms($2) }
    /^ +99%/ { p99 = ms($2) }
    /^Requests\/sec:/ { rps = $2 }
    /Non-2xx or 3xx responses:/ { bad = $5 }
    /Socket errors:/ { bad = bad "+sock" }
    END { printf "%s %s %s %s\n", rps, p50, p99, bad == "" ? 0 : bad }'
}
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

printf '%-16s %10s %10s %10s  %s\n' path "req/s" "p50 ms" "p99 ms" "each run (req/s p50 p99)"
status=0
for path in "${paths[@]}"; do
  url="http://127.0.0.1:$port$path"
  wrk -t"$threads" -c"$conns" -d2s "$url" >/dev/null # warm-up
  runs=()
  : >"$work/runs"
  for _ in $(seq 1 "$reps"); do
    r=$(wrk -t"$threads" -c"$conns" -d"${duration}s" --latency "$url" | parse)
    echo "$r" >>"$work/runs"
    runs+=("$(echo "$r" | awk '{ printf "%.0f %.2f %.2f", $1, $2, $3 }')")
    if [ "$(echo "$r" | cut -d' ' -f4)" != 0 ]; then
      echo "http.sh: $path: errors or non-2xx responses: $r" >&2
      status=1
    fi
  done
  printf '%-16s %10.0f %10.2f %10.2f  %s\n' "$path" \
    "$(cut -d' ' -f1 "$work/runs" | median)" \
    "$(cut -d' ' -f2 "$work/runs" | median)" \
    "$(cut -d' ' -f3 "$work/runs" | median)" \
    "$(IFS=';'; echo "${runs[*]}")"
done

kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
pid=
if [ $rc -ne 0 ] || ! grep -q '"http.listener_closed"' "$work/log"; then
  echo "http.sh: the SIGTERM drain failed (exit $rc)" >&2
  tail -5 "$work/log" >&2
  exit 1
fi
echo "SIGTERM: drained, exit 0; load after: $(cut -d' ' -f1-3 /proc/loadavg)"
exit $status
