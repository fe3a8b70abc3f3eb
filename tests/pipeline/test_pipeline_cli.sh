#!/usr/bin/env bash
# test_pipeline_cli.sh WPOOL: `wpool pipeline run` as a user runs it: exit
# codes (0 done, 1 bad config / unreadable source / unwritable sink / failed
# stage, 2 usage, 3 interrupted), the pipeline.done report, SIGTERM drain
# with a checkpoint and --resume, kill -9 and --resume (at-least-once, with
# duplicates only after the checkpoint), and bounded memory: 2,000,000
# lines through a slow stage peak within 20 MB of 200,000 lines.
set -u
wpool=$1
scale=${WPOOL_TEST_TIME_SCALE:-1}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"
fails=0
pass() { echo "ok   $1"; }
fail() { echo "FAIL $1"; fails=$((fails + 1)); }
expect_rc() { # name want got
  if [ "$3" -eq "$2" ]; then pass "$1 (exit $3)"; else fail "$1: exit $3, want $2"; fi
}

cat > stages.lua <<'LUA'
local M = {}
local wp = require "workerpool"
function M.id(x) return x end
-- Slow for the first 400 items, so that a signal finds work in flight.
function M.slow(x)
  if tonumber(x) <= 400 then wp.sleep(0.005) end
  return x
end
-- Slow for the first 1200 items (3 s with 2 workers): kill -9 lands mid-run.
function M.slower(x)
  if tonumber(x) <= 1200 then wp.sleep(0.005) end
  return x
end
function M.spin(x) local s = 0 for i = 1, 200 do s = s + i end return x end
function M.boom(x) if x == "3" then error("boom") end return x end
return M
LUA
seq 1 2000 > in.txt

conf() { # name stage-handler sink-path [extra]
  cat > "$1.json" <<JSON
{"name": "$1", "source": {"type": "lines", "path": "in.txt"},
 "stages": [{"name": "s", "module": "stages.lua", "handler": "$2", "workers": 2,
             "batch": 8, "queue": 64}],
 "sink": {"type": "lines", "path": "$3"}, "checkpoint": "$1.cp" ${4:-}}
JSON
}

# ---- exit codes and the report --------------------------------------------
conf ok id out.txt
"$wpool" pipeline run --no-progress ok.json 2>log.txt
expect_rc "run ok" 0 $?
if cmp -s in.txt out.txt; then pass "output equals input"; else fail "output differs"; fi
if grep '"event":"pipeline.done"' log.txt | grep -q '"in":2000'; then
  pass "pipeline.done logged with counts"
else fail "no pipeline.done line: $(tail -2 log.txt)"; fi
"$wpool" pipeline run --no-progress ok.json --resume 2>/dev/null
expect_rc "resume of a completed run" 0 $?
conf fail boom out.txt ''
"$wpool" pipeline run fail.json 2>err.txt
expect_rc "on_error fail" 1 $?
if grep -q "wpool: pipeline fail failed: stage s, item 3: " err.txt; then pass "failure names stage and item"
else fail "failure message: $(cat err.txt)"; fi
conf nosink id /nonexistent/dir/out.txt
"$wpool" pipeline run nosink.json 2>err.txt
expect_rc "unwritable sink" 1 $?
sed 's/in.txt/missing.txt/' ok.json > nosource.json
"$wpool" pipeline run nosource.json 2>err.txt
expect_rc "unreadable source" 1 $?
echo '{"name": "x",' > bad.json
"$wpool" pipeline run bad.json 2>err.txt
expect_rc "bad config" 1 $?
if grep -q "^bad.json:2:0: " err.txt; then pass "syntax error position"; else fail "syntax error: $(cat err.txt)"; fi
"$wpool" pipeline run --bogus ok.json 2>/dev/null
expect_rc "usage error" 2 $?
"$wpool" --help | grep -q "wpool pipeline run" && pass "--help lists pipeline" || fail "--help"

# ---- progress lines and the metrics endpoint -----------------------------
conf prog slow out.txt
for _ in 1 2 3 4 5; do # a random port, another one if it is taken
  rm -f prog.cp
  port=$((20000 + RANDOM % 20000))
  "$wpool" pipeline run --progress --metrics-addr 127.0.0.1:$port prog.json 2>prog.txt &
  pid=$!
  metrics=""
  for _ in $(seq 1 $((40 * scale))); do
    metrics=$(curl -s "http://127.0.0.1:$port/metrics" 2>/dev/null)
    printf '%s' "$metrics" | grep -q 'pool="prog.s"' && break
    grep -q "address already in use" prog.txt && break
    sleep 0.05
  done
  wait $pid
  rc=$?
  grep -q "address already in use" prog.txt || break
done
expect_rc "run with --progress and --metrics-addr" 0 $rc
if printf '%s' "$metrics" | grep -q 'pool="prog.s"'; then pass "the stage's pool is in /metrics"
else fail "no prog.s metrics: $(printf '%s' "$metrics" | head -3)"; fi
if grep -q "$(printf '\033')\[K.*s  *in  *[0-9]* *out" prog.txt; then pass "live progress lines"
else fail "no progress lines: $(head -c 300 prog.txt)"; fi

# ---- SIGTERM: drain, checkpoint, resume ----------------------------------
conf drain slow out.txt
rm -f out.txt drain.cp
"$wpool" pipeline run --no-progress --drain-timeout $((20 * scale)) drain.json 2>log.txt &
pid=$!
sleep 0.5
kill -TERM $pid
wait $pid
expect_rc "SIGTERM with work left" 3 $?
cp_seq=$(sed 's/.*"seq":\([0-9]*\).*/\1/' drain.cp)
lines=$(wc -l < out.txt)
if [ "$cp_seq" -gt 0 ] && [ "$lines" -ge "$cp_seq" ] && [ "$cp_seq" -lt 2000 ]; then
  pass "checkpoint $cp_seq, $lines lines written"
else fail "checkpoint '$cp_seq' with $lines lines"; fi
if head -n "$cp_seq" out.txt | cmp -s - <(seq 1 "$cp_seq"); then pass "checkpointed items are in the sink"
else fail "sink lacks checkpointed items"; fi
grep -q '"event":"pipeline.draining"' log.txt && pass "drain logged" || fail "no pipeline.draining"
"$wpool" pipeline run --no-progress --resume drain.json 2>/dev/null
expect_rc "resume after SIGTERM" 0 $?
if sort -n out.txt | uniq | cmp -s - in.txt; then pass "every item reached the sink after resume"
else fail "items missing after resume"; fi

# ---- kill -9 and resume: at least once ----------------------------------
conf crash slower out.txt
rm -f out.txt crash.cp
"$wpool" pipeline run --no-progress crash.json 2>/dev/null &
pid=$!
# The checkpoint is written at the start (0) and then every second.
for _ in $(seq 1 $((100 * scale))); do
  grep -q '"seq":[1-9]' crash.cp 2>/dev/null && break
  sleep 0.05
done
sleep 0.3
kill -9 $pid
wait $pid 2>/dev/null
cp_seq=$(sed 's/.*"seq":\([0-9]*\).*/\1/' crash.cp 2>/dev/null || echo 0)
"$wpool" pipeline run --no-progress --resume crash.json 2>/dev/null
expect_rc "resume after kill -9" 0 $?
if sort -n out.txt | uniq | cmp -s - in.txt; then pass "every item reached the sink at least once"
else fail "items lost across kill -9"; fi
if [ "$cp_seq" -gt 0 ] && [ "$cp_seq" -lt 2000 ]; then pass "killed mid-run, checkpoint $cp_seq"
else fail "kill -9 did not land mid-run (checkpoint '$cp_seq')"; fi
dups=$(sort -n out.txt | uniq -d | awk -v c="$cp_seq" '$1 <= c' | wc -l)
if [ "$dups" -eq 0 ]; then pass "no duplicates at or before checkpoint $cp_seq"
else fail "$dups duplicates before checkpoint $cp_seq"; fi

# ---- bounded memory ------------------------------------------------------
small=200000 big=2000000
if [ "$scale" -gt 1 ]; then small=50000 big=500000; fi # sanitizers: slower
seq 1 $small > small.txt
seq 1 $big > big.txt
for n in small big; do
  cat > mem_$n.json <<JSON
{"name": "mem", "source": {"type": "lines", "path": "$n.txt"},
 "stages": [{"name": "s", "module": "stages.lua", "handler": "spin", "batch": 64}],
 "sink": {"type": "null"}}
JSON
done
# ASan holds freed memory in its quarantine: off for these two runs.
peak() {
  ASAN_OPTIONS="${ASAN_OPTIONS:-}:quarantine_size_mb=0" /usr/bin/time -f %M \
    "$wpool" pipeline run --no-progress --log-level warn "$1" 2>&1 >/dev/null | tail -1
}
if ldd "$wpool" | grep -q libtsan; then
  # TSan keeps shadow memory and history for what the run touched.
  pass "peak RSS: not measured under TSan"
  echo "$fails failed"
  [ "$fails" -eq 0 ]
  exit
fi
a=$(peak mem_small.json)
b=$(peak mem_big.json)
if [ $((b - a)) -le 20480 ]; then pass "peak RSS $a KB ($small lines) vs $b KB ($big lines)"
else fail "peak RSS grew: $a KB -> $b KB"; fi

echo "$fails failed"
[ "$fails" -eq 0 ]
