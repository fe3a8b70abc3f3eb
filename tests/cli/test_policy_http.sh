#!/usr/bin/env bash
# test_policy_http.sh WPOOL: the policy series on `wpool run --metrics-addr`:
# after a breaker trips and a tenant's burst is throttled, GET /metrics
# shows the breaker's state, transitions and refusals, the tenant's
# admitted and rejected series, the refusal reasons of
# workerpool_dropped_total, a Lua collector's series (and not an invalid
# collector's), and promtool accepts the whole text.  Then a pool whose
# only worker is stuck past its deadline while a task waits: /readyz
# answers 503, /debug/pools shows the task's name, tenant and a growing
# running_s, and /readyz answers 200 again once the worker is replaced.
#
# Ends with an "N passed, N failed" line and exits non-zero when a check
# failed.  The server is killed at the end.
set -u

if [ $# -lt 1 ]; then
  echo "usage: $0 path/to/wpool" >&2
  exit 2
fi
WPOOL=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
WPOOL_PRELOAD=${LD_PRELOAD:-}
unset LD_PRELOAD

TMP=$(mktemp -d "${TMPDIR:-/tmp}/wpool-phttp.XXXXXX")
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill -KILL "$SERVER_PID" 2>/dev/null; fi
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok   $1"; }
bad() { failed=$((failed + 1)); echo "FAIL $1"; }
has() { # DESCRIPTION LITERAL
  if grep -qF -- "$2" "$TMP/metrics"; then ok "$1"; else bad "$1: no '$2'"; fi
}

for tool in curl python3 promtool; do
  if ! command -v "$tool" >/dev/null; then
    echo "$0: $tool is missing (scripts/setup.sh installs it)" >&2
    exit 2
  fi
done

cat > "$TMP/server.lua" <<'EOF'
local W = require "workerpool"
local api = W.new { name = "api", max_workers = 2, init = [[
  function fail() error("down") end
  function work() return 1 end
]] }
local b = W.breaker.new { name = "db", consecutive_failures = 2, open_timeout = 3600 }
api:use(W.tenant.bucket { rate = 0.001, burst = 3 }):use(b)
local works = {}
for _ = 1, 5 do works[#works + 1] = api:submit({ handler = "work", tenant = "acme" }) end
for _, f in ipairs(works) do f:wait() end -- their successes count before the failures
for _ = 1, 2 do api:submit("fail"):wait() end
for _ = 1, 2 do assert(select(2, api:submit("work")) == "open") end
-- task events of a task with a tenant carry it
local lp = W.new { name = "logs", max_workers = 1, slow_task = 0.05 }
lp:submit({ name = "e", tenant = "t1", fn = function() error("x") end }):wait()
lp:submit({ name = "s", tenant = "t1", fn = function() require("workerpool").sleep(0.3) end }):wait()
lp:submit({ name = "to", tenant = "t1", timeout = 0.05,
  fn = function() require("workerpool").sleep(2) end }):wait()
W.metrics_collector("app", function()
  return "# HELP app_jobs_total Jobs.\n# TYPE app_jobs_total counter\napp_jobs_total 7\n"
end)
W.metrics_collector("broken", function() return "}{ not prometheus\n" end)
-- on the trigger file: wedge pool "wedge" (its worker spins in a
-- coroutine, where the deadline cannot interrupt it, until declared stuck
-- 3 s past the deadline and replaced)
local wedge = W.new { name = "wedge", max_workers = 1, stuck_grace = 3 }
W.spawn(function()
  while not io.open(arg[1]) do W.sleep(0.05) end
  wedge:submit({ name = "spin", tenant = "acme", timeout = 0.2, fn = function()
    local d = require("workerpool").shared("phttp")
    coroutine.wrap(function() while not d:get("release") do end end)()
  end })
  wedge:submit(function() end) -- waits behind it
end)
W.on_shutdown(function() W.shared("phttp"):set("release", true) end)
print("ready")
io.stdout:flush()
while true do W.sleep(3600) end
EOF

for try in 1 2 3 4 5; do
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  : > "$TMP/out"
  env ${WPOOL_PRELOAD:+LD_PRELOAD=$WPOOL_PRELOAD} "$WPOOL" run \
    --metrics-addr "127.0.0.1:$PORT" --log-file "$TMP/log" \
    "$TMP/server.lua" "$TMP/trigger" > "$TMP/out" 2> "$TMP/err" &
  SERVER_PID=$!
  up=0
  for i in $(seq 1 600); do
    if grep -q '^ready$' "$TMP/out"; then up=1; break; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then break; fi
    sleep 0.1
  done
  if [ $up = 1 ]; then break; fi
  kill -KILL "$SERVER_PID" 2>/dev/null
  wait "$SERVER_PID" 2>/dev/null
  SERVER_PID=""
  if ! grep -q 'cannot serve' "$TMP/err"; then break; fi
done
if [ -z "$SERVER_PID" ]; then
  echo "server did not start; stderr:" >&2
  cat "$TMP/err" >&2
  exit 1
fi

timeout 10 curl -s --max-time 5 "http://127.0.0.1:$PORT/metrics" > "$TMP/metrics"
has "breaker state" 'workerpool_breaker_state{breaker="db",state="open"} 1'
has "breaker transitions" 'workerpool_breaker_transitions_total{breaker="db",to="open"} 1'
has "breaker refusals" 'workerpool_breaker_rejected_total{breaker="db",reason="open"} 2'
has "tenant admitted" 'workerpool_tenant_admitted_total{pool="api",tenant="acme"} 3'
has "tenant rejected" \
  'workerpool_tenant_rejected_total{pool="api",tenant="acme",reason="rate_limited"} 2'
has "dropped by reason" 'workerpool_dropped_total{pool="api",reason="rate_limited"} 2'
has "breaker refusals in drops" 'workerpool_dropped_total{pool="api",reason="breaker_open"} 2'
has "pool not stopped" 'workerpool_pool_stopped{pool="api"} 0'
has "a collector's series" 'app_jobs_total 7'
if grep -qF 'not prometheus' "$TMP/metrics"; then
  bad "an invalid collector is dropped"
else
  ok "an invalid collector is dropped"
fi
if grep 'metrics collector dropped' "$TMP/log" | grep -q '"collector":"broken"'; then
  ok "and logged"
else
  bad "and logged: $(cat "$TMP/log" | tail -3)"
fi
for ev in task.error task.slow task.timeout; do
  if grep "\"event\":\"$ev\"" "$TMP/log" | grep '"pool":"logs"' | grep -q '"tenant":"t1"'; then
    ok "$ev carries the tenant"
  else
    bad "$ev carries the tenant: $(grep "$ev" "$TMP/log" | head -2)"
  fi
done
if out=$(promtool check metrics < "$TMP/metrics" 2>&1); then
  ok "promtool check metrics"
else
  bad "promtool check metrics: $out"
fi

code() { timeout 10 curl -s -o /dev/null -w '%{http_code}' --max-time 5 \
  "http://127.0.0.1:$PORT$1"; }
eq() { if [ "$2" = "$3" ]; then ok "$1"; else bad "$1 (got '$2', want '$3')"; fi; }
# prints "task tenant running_s" of pool wedge's running worker
spin() {
  timeout 10 curl -s --max-time 5 "http://127.0.0.1:$PORT/debug/pools" |
    python3 -c '
import json, sys
for p in json.load(sys.stdin):
    if p["pool"] == "wedge":
        for w in p["workers"]:
            if "task" in w:
                print(w["task"], w.get("tenant"), w["running_s"], w["state"])'
}
eq "/readyz before" "$(code /readyz)" 200
touch "$TMP/trigger"
got=""
for i in $(seq 1 100); do
  got=$(code /readyz)
  if [ "$got" = 503 ]; then break; fi
  sleep 0.05
done
eq "/readyz answers 503 while the pool is wedged" "$got" 503
read -r t1 tn1 r1 st1 <<< "$(spin)"
sleep 0.3
read -r t2 tn2 r2 st2 <<< "$(spin)"
eq "/debug/pools names the running task" "$t1 $tn1" "spin acme"
if python3 -c "import sys; sys.exit(0 if float('$r2') > float('$r1') > 0 else 1)" 2>/dev/null; then
  ok "running_s grows ($r1 -> $r2)"
else
  bad "running_s grows ($r1 -> $r2)"
fi
got=""
for i in $(seq 1 300); do
  got=$(code /readyz)
  if [ "$got" = 200 ]; then break; fi
  sleep 0.1
done
eq "/readyz answers 200 once the stuck worker is replaced" "$got" 200

kill -KILL "$SERVER_PID" 2>/dev/null
wait "$SERVER_PID" 2>/dev/null
SERVER_PID=""
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
