#!/usr/bin/env bash
# test_http.sh WPOOL: the health and metrics endpoints of
# `wpool run --metrics-addr HOST:PORT` (WPOOL is the path of the binary),
# checked with real clients: curl, raw sockets from python3, wrk and
# promtool.  GET /healthz, /readyz, /metrics; 404 and 405; 400 and a closed
# connection for malformed and oversized requests; a slow client that does
# not stall other requests; a short wrk load without errors; /readyz 503
# during a SIGTERM drain while /healthz stays 200, and exit status 0 after
# it; the --log-file JSON lines, with every guard event the server script
# provokes.
#
# Ends with an "N passed, N failed" line and exits non-zero when a check
# failed.  Every step has a time limit; the server is killed at the end.
set -u

if [ $# -lt 1 ]; then
  echo "usage: $0 path/to/wpool" >&2
  exit 2
fi
WPOOL=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
if [ ! -x "$WPOOL" ]; then
  echo "$0: $WPOOL is not an executable" >&2
  exit 2
fi

# Sanitizer builds preload their runtime for the Lua suites; the clients
# started here (curl, python3, wrk, promtool) must not get it.  wpool is
# instrumented itself and keeps it.
WPOOL_PRELOAD=${LD_PRELOAD:-}
unset LD_PRELOAD

TMP=$(mktemp -d "${TMPDIR:-/tmp}/wpool-http.XXXXXX")
SERVER_PID=""
BG=()
cleanup() {
  local p
  for p in "${BG[@]}"; do kill -KILL "$p" 2>/dev/null; done
  if [ -n "$SERVER_PID" ]; then kill -KILL "$SERVER_PID" 2>/dev/null; fi
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok   $1"; }
bad() { failed=$((failed + 1)); echo "FAIL $1"; }
check() { # DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}
not_in_file() { ! grep -qF -- "$1" "$2"; }
eq() { # DESCRIPTION GOT WANT
  if [ "$2" = "$3" ]; then ok "$1"; else bad "$1 (got '$2', want '$3')"; fi
}

for tool in curl python3 promtool wrk; do
  if ! command -v "$tool" >/dev/null; then
    echo "$0: $tool is missing (scripts/setup.sh installs it)" >&2
    exit 2
  fi
done

# HTTP status of a request: code METHOD PATH
code() {
  timeout 10 curl -s -o /dev/null -w '%{http_code}' --max-time 5 \
    -X "$1" "http://127.0.0.1:$PORT$2"
}

# Sends raw bytes (a python bytes literal) and prints the status line, then
# "closed" when the server closed the connection within 5 s.
raw() {
  timeout 15 python3 - "$PORT" "$1" <<'EOF'
import socket, sys, time
port, payload = int(sys.argv[1]), eval(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port), timeout=5)
try:
    s.sendall(payload)
except OSError:
    pass  # the server may close before reading everything
data = b""
closed = False
deadline = time.time() + 5
while time.time() < deadline:
    try:
        chunk = s.recv(65536)
    except ConnectionResetError:
        closed = True
        break
    except socket.timeout:
        break
    if not chunk:
        closed = True
        break
    data += chunk
print(data.split(b"\r\n", 1)[0].decode("latin-1"))
print("closed" if closed else "open")
EOF
}

# ---- the server script ------------------------------------------------------

cat > "$TMP/server.lua" <<'EOF'
-- Provokes every guard event, then serves until SIGTERM.  A task started
-- on request (the file arg[2] appears) keeps the drain busy for ~3 s.
local W = require "workerpool"
local trigger = arg[1]
local d = W.shared("http-test")

local web = W.new { name = "web", max_workers = 2, queue_cap = 2,
  slow_task = 0.05, drop_log_interval = 0.2, stuck_grace = 0.2 }
-- (owner handles stay referenced: a collected one would stop its pool,
-- and /readyz turns 503 once any pool stopped)
local odd = W.new { name = 'odd"pool\\name', max_workers = 1 }
local mem = W.new { name = "mem", max_workers = 1, memory_limit = 16 * 1024 * 1024 }

web:submit({ name = "bad", fn = function() error("boom") end }):wait()
-- (the loop allocates so that TSan builds, which run signal handlers only
-- at intercepted calls, interrupt it too; tests/lua/test_guards.lua has the
-- pure `while true do end`)
web:submit({ name = "spin", timeout = 0.1, fn = function()
  while true do local _ = {} end
end }):wait()
web:submit({ name = "slow", fn = function() require("workerpool").sleep(0.2) end }):wait()
mem:submit({ name = "hog", fn = function()
  local t = {}
  for i = 1, math.huge do t[i] = string.rep("x", 1000) .. i end
end }):wait()
odd:submit(function() return 1 end):wait()
-- a worker stuck in a coroutine until released
local stuck = web:submit({ name = "stuck", timeout = 0.1, fn = function()
  local dd = require("workerpool").shared("http-test")
  coroutine.wrap(function() while not dd:get("release") do end end)()
end })
stuck:wait()
while web:stats().stuck_total < 1 do W.sleep(0.01) end
d:set("release", true)
while web:stats().stuck > 0 do W.sleep(0.01) end
-- rejections by the full queue, summarised in one tasks.dropped line
d:set("hold", true)
local function hold()
  local dd = require("workerpool").shared("http-test")
  while dd:get("hold") do require("workerpool").sleep(0.005) end
end
for _ = 1, 8 do web:submit(hold) end
W.sleep(0.5)
d:set("hold", nil)
web:resize(3)
W.log("info", "server ready", { port = arg[2] })
print("ready")
io.stdout:flush()

while true do
  local fh = io.open(trigger)
  if fh then fh:close() break end
  W.sleep(0.05)
end
web:submit({ name = "drain", fn = function()
  local WW = require "workerpool"
  WW.shared("http-test"):set("draining", true)
  WW.sleep(3)
end })
while not d:get("draining") do W.sleep(0.01) end
print("drain task running")
io.stdout:flush()
while true do W.sleep(3600) end
EOF

# Starts the server on a free port; sets PORT and SERVER_PID.
start_server() {
  local try
  for try in 1 2 3 4 5; do
    PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    : > "$TMP/out"
    : > "$TMP/err"
    env ${WPOOL_PRELOAD:+LD_PRELOAD=$WPOOL_PRELOAD} "$WPOOL" run \
      --metrics-addr "127.0.0.1:$PORT" --log-file "$TMP/log" --drain-timeout 10 \
      "$TMP/server.lua" "$TMP/trigger" "$PORT" > "$TMP/out" 2> "$TMP/err" &
    SERVER_PID=$!
    local i
    for i in $(seq 1 600); do # up to 60 s (sanitizer builds are slow)
      if grep -q '^ready$' "$TMP/out"; then return 0; fi
      if ! kill -0 "$SERVER_PID" 2>/dev/null; then break; fi
      sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
    SERVER_PID=""
    if ! grep -q 'cannot serve' "$TMP/err"; then break; fi # not a port clash
  done
  echo "server did not start; stderr:" >&2
  cat "$TMP/err" >&2
  return 1
}

# ---- usage of --metrics-addr ------------------------------------------------

echo 'print("x")' > "$TMP/x.lua"
timeout 20 "$WPOOL" run --metrics-addr nonsense "$TMP/x.lua" > /dev/null 2> "$TMP/e1"
eq "--metrics-addr without a port fails" "$?" "1"
check "... saying why" grep -q "cannot serve on nonsense" "$TMP/e1"

# ---- the endpoints ------------------------------------------------------

if ! start_server; then
  bad "the server starts and prints ready"
  echo "$passed passed, $failed failed"
  exit 1
fi
ok "the server starts and prints ready"

timeout 20 "$WPOOL" run --metrics-addr "127.0.0.1:$PORT" "$TMP/x.lua" > /dev/null 2> "$TMP/e2"
eq "a port in use fails" "$?" "1"
check "... saying why" grep -q "cannot serve on 127.0.0.1:$PORT" "$TMP/e2"

eq "GET /healthz" "$(code GET /healthz)" 200
eq "GET /readyz" "$(code GET /readyz)" 200
eq "GET /healthz?x=1 (query ignored)" "$(code GET '/healthz?x=1')" 200
eq "GET /metrics" "$(code GET /metrics)" 200
eq "GET /unknown" "$(code GET /unknown)" 404
eq "GET /" "$(code GET /)" 404
eq "POST /healthz" "$(code POST /healthz)" 405
eq "DELETE /metrics" "$(code DELETE /metrics)" 405
body=$(timeout 10 curl -s --max-time 5 "http://127.0.0.1:$PORT/healthz")
eq "/healthz body" "$body" "ok"

timeout 10 curl -s --max-time 5 -D "$TMP/mhead" -o "$TMP/metrics" "http://127.0.0.1:$PORT/metrics"
check "/metrics is Prometheus text 0.0.4" grep -qi '^content-type: text/plain; version=0.0.4' "$TMP/mhead"
if timeout 20 promtool check metrics < "$TMP/metrics" > "$TMP/prom" 2>&1; then
  ok "/metrics passes promtool check metrics"
else
  bad "/metrics passes promtool check metrics: $(head -c 2000 "$TMP/prom")"
fi
for want in \
  'workerpool_submitted_total{pool="web"}' \
  'workerpool_completed_total{pool="web",result="error"} 1' \
  'workerpool_completed_total{pool="web",result="timeout"} 2' \
  'workerpool_stuck_workers_total{pool="web"} 1' \
  'workerpool_stuck_workers{pool="web"} 0' \
  'workerpool_memory_limit_hits_total{pool="mem"} 1' \
  'workerpool_max_workers{pool="web"} 3' \
  'workerpool_submitted_total{pool="odd\"pool\\name"} 1' \
  'workerpool_task_duration_seconds_bucket{pool="web",le="+Inf"}' \
  'workerpool_queue_dwell_seconds_count{pool="web"}'; do
  check "/metrics has $want" grep -qF "$want" "$TMP/metrics"
done
full=$(grep -F 'workerpool_dropped_total{pool="web",reason="full"}' "$TMP/metrics" | awk '{print $2}')
check "/metrics counts the rejections (dropped full = ${full:-none})" \
  test "${full:-0}" -ge 1

# keep-alive: two requests on one connection
out=$(timeout 10 curl -s --max-time 5 -o /dev/null -w '%{http_code} %{num_connects}\n' \
  "http://127.0.0.1:$PORT/healthz" -o /dev/null "http://127.0.0.1:$PORT/readyz")
eq "keep-alive: two answers on one connection" "$(echo "$out" | tr '\n' ' ')" "200 1 200 0 "

# ---- bad requests -------------------------------------------------------

res=$(raw 'b"GARBAGE\x01\x02 nonsense\r\n\r\n"')
eq "malformed request: 400" "$(echo "$res" | head -1 | cut -d' ' -f2)" "400"
eq "malformed request: connection closed" "$(echo "$res" | tail -1)" "closed"

res=$(raw 'b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n"')
eq "bad header value: 400" "$(echo "$res" | head -1 | cut -d' ' -f2)" "400"
eq "bad header value: connection closed" "$(echo "$res" | tail -1)" "closed"

res=$(raw 'b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"')
eq "20 KB URL: 400" "$(echo "$res" | head -1 | cut -d' ' -f2)" "400"
eq "20 KB URL: connection closed" "$(echo "$res" | tail -1)" "closed"

res=$(raw 'b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n"')
eq "20 KB header: 400" "$(echo "$res" | head -1 | cut -d' ' -f2)" "400"
eq "20 KB header: connection closed" "$(echo "$res" | tail -1)" "closed"

res=$(raw 'b"GET /" + b"a" * 1000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"')
eq "1 KB URL (over the URL limit, under the request limit): 400" \
  "$(echo "$res" | head -1 | cut -d' ' -f2)" "400"

eq "still serving after bad requests" "$(code GET /healthz)" 200

# ---- a slow client ------------------------------------------------------

# Sends half a request and stays connected; reports how long the server
# kept it (it disconnects idle clients after 5 s).
timeout 30 python3 - "$PORT" > "$TMP/slow" 2>&1 <<'EOF' &
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: unfinished
print("connected", flush=True)
t0 = time.time()
try:
    data = s.recv(100)
except OSError as e:
    data = b""
print("closed after %.1f s, got %r" % (time.time() - t0, data[:40]), flush=True)
EOF
slow_pid=$!
BG+=("$slow_pid")
for _ in $(seq 1 100); do grep -q connected "$TMP/slow" && break; sleep 0.05; done
check "slow client connected" grep -q connected "$TMP/slow"
start=$(date +%s%N)
eq "GET /healthz while a slow client holds a connection" "$(code GET /healthz)" 200
eq "GET /metrics while a slow client holds a connection" "$(code GET /metrics)" 200
took=$((($(date +%s%N) - start) / 1000000))
check "answered promptly (${took} ms)" test "$took" -lt 4000

# ---- a short load -------------------------------------------------------

for path in /healthz /metrics; do
  timeout 30 wrk -t1 -c8 -d2s --timeout 2s "http://127.0.0.1:$PORT$path" > "$TMP/wrk" 2>&1
  rc=$?
  reqs=$(awk '/requests in/ {print $1}' "$TMP/wrk")
  check "wrk $path ran (rc $rc)" test "$rc" = 0
  check "wrk $path made requests (${reqs:-0})" test "${reqs:-0}" -gt 0
  if grep -qE 'Socket errors|Non-2xx' "$TMP/wrk"; then
    bad "wrk $path: no errors or timeouts: $(grep -E 'Socket errors|Non-2xx' "$TMP/wrk")"
  else
    ok "wrk $path: no errors or timeouts"
  fi
done

# the slow client was disconnected by the idle timer, not by the load
wait "$slow_pid" 2>/dev/null
check "the slow client was disconnected after the idle time ($(tail -1 "$TMP/slow"))" \
  grep -qE 'closed after ([4-9]|1[0-9])\.' "$TMP/slow"

# ---- clients that do not read ---------------------------------------------

# Pipelines /metrics requests and resets the connection while the answers
# are still being written: the server must lose only that connection (it
# used to die of SIGPIPE, status 141).
timeout 60 python3 - "$PORT" > "$TMP/rst" 2>&1 <<'EOF'
import socket, struct, sys, time
port = int(sys.argv[1])
for _ in range(5):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 300)
    try:
        s.recv(100)  # the answers are being written
    except OSError:
        pass
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # a reset, with most answers unsent
    time.sleep(0.2)
print("done")
EOF
check "clients that reset mid-answer: the server lives" kill -0 "$SERVER_PID"
eq "GET /healthz after the resets" "$(code GET /healthz)" 200

# Pipelines requests for 4 s without reading any answer, while /healthz is
# timed on another connection and the server's memory is sampled.  Output
# per connection is bounded: the server stops reading that client instead
# of buffering answers (it used to grow by ~100 MB/s and answer /healthz
# in seconds).
timeout 60 python3 - "$PORT" "$SERVER_PID" > "$TMP/flood" 2>&1 <<'EOF'
import socket, sys, threading, time
port, pid = int(sys.argv[1]), sys.argv[2]
def rss_kb():
    for line in open("/proc/%s/status" % pid):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
stop = time.time() + 4
def flood():
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setblocking(False)
    req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 100
    while time.time() < stop:
        try:
            s.send(req)
        except BlockingIOError:
            time.sleep(0.01)  # the server stopped reading: fine
        except OSError:
            break  # the server closed it: fine too
    time.sleep(1)
    s.close()
t = threading.Thread(target=flood)
base = rss_kb()
t.start()
worst, peak = 0.0, base
while time.time() < stop:
    t0 = time.time()
    h = socket.create_connection(("127.0.0.1", port), timeout=10)
    h.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        chunk = h.recv(4096)
        if not chunk:
            break
        data += chunk
    h.close()
    worst = max(worst, time.time() - t0)
    if not data.startswith(b"HTTP/1.1 200"):
        print("healthz failed: %r" % data[:60])
    peak = max(peak, rss_kb())
    time.sleep(0.1)
t.join()
print("growth_mb %d" % ((peak - base) // 1024))
print("healthz_ms %d" % (worst * 1000))
EOF
growth=$(awk '/^growth_mb/ {print $2}' "$TMP/flood")
hz=$(awk '/^healthz_ms/ {print $2}' "$TMP/flood")
check "a client that never reads: memory stays bounded (+${growth:-?} MB)" \
  test "${growth:-9999}" -lt 150
check "... and /healthz stays fast meanwhile (worst ${hz:-?} ms)" \
  test "${hz:-99999}" -lt 1500
check "... and answered 200 every time" not_in_file "healthz failed" "$TMP/flood"
check "... and the server lives" kill -0 "$SERVER_PID"

# ---- the drain ----------------------------------------------------------

touch "$TMP/trigger"
for _ in $(seq 1 300); do
  grep -q 'drain task running' "$TMP/out" && break
  sleep 0.1
done
check "a slow task is running" grep -q 'drain task running' "$TMP/out"
eq "/readyz before SIGTERM" "$(code GET /readyz)" 200
kill -TERM "$SERVER_PID"
ready=""
for _ in $(seq 1 40); do
  ready=$(code GET /readyz)
  [ "$ready" = 503 ] && break
  sleep 0.05
done
eq "/readyz during the drain" "$ready" 503
eq "/healthz during the drain" "$(code GET /healthz)" 200
eq "/metrics during the drain" "$(code GET /metrics)" 200
check "the server is still draining" kill -0 "$SERVER_PID"

status=""
for _ in $(seq 1 300); do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    wait "$SERVER_PID"
    status=$?
    break
  fi
  sleep 0.1
done
if [ -z "$status" ]; then
  kill -KILL "$SERVER_PID" 2>/dev/null
  status="still running after 30 s"
fi
SERVER_PID=""
eq "the server exits 0 after a clean drain" "$status" 0
if [ "$status" != 0 ]; then sed 's/^/    | /' "$TMP/err" | head -50; fi
eq "nothing answers after the exit" "$(code GET /healthz)" 000
if grep -q 'Sanitizer' "$TMP/err"; then
  bad "no sanitizer report from the server"
  grep -A30 'Sanitizer' "$TMP/err" | head -60 | sed 's/^/    | /'
else
  ok "no sanitizer report from the server"
fi

# ---- the log file -------------------------------------------------------

# Prints "ok WHAT" or "FAIL WHAT" per expected line.
timeout 20 python3 - "$TMP/log" > "$TMP/logcheck" 2>&1 <<'EOF'
import json, sys
events = {}
n = 0
try:
    for line in open(sys.argv[1]):
        o = json.loads(line)          # every line is one JSON object
        n += 1
        for k in ("ts", "level", "event"):
            assert k in o, ("missing", k, o)
        events.setdefault(o["event"], []).append(o)
    print("ok %d lines parse as JSON objects with ts, level and event" % n)
except Exception as e:
    print("FAIL the lines parse as JSON: %r" % (e,))

def one(ev, check=None, **kw):
    what = "%s %s" % (ev, " ".join("%s=%r" % kv for kv in kw.items()))
    for o in events.get(ev, []):
        if all(o.get(k) == v for k, v in kw.items()) and (check is None or check(o)):
            print("ok log line " + what)
            return
    print("FAIL log line " + what + " (events: %s)" % " ".join(sorted(events)))

one("pool.created", pool="web", level="info", max_workers=2)
one("pool.created", pool='odd"pool\\name')
one("task.error", lambda e: "boom" in e["error"] and "stack traceback" in e["error"],
    pool="web", task="bad", level="error")
one("task.timeout", pool="web", task="spin", level="warn", timeout_s=0.1)
one("task.slow", lambda e: e["running_s"] >= 0.05, pool="web", task="slow", level="warn")
one("worker.stuck", lambda e: e["past_deadline_s"] >= 0.2, pool="web", task="stuck",
    level="error")
one("worker.memory_limit", pool="mem", task="hog", level="warn",
    limit_bytes=16 * 1024 * 1024)
one("tasks.dropped", lambda e: e["dropped"] >= 1 and "reason=full" in e["msg"],
    pool="web", reason="full", level="warn", interval_s=0.2)
one("pool.resized", pool="web", max_workers=3, was=2, level="info")
one("log", msg="server ready", level="info")
one("shutdown.draining", reason="SIGTERM", level="info")
one("shutdown.progress", level="info")
one("pool.draining", pool="web", queued=0, running=1)
one("pool.stopped", pool="web", dropped=0, level="info")
one("shutdown.stopped", clean=True, dropped=0, abandoned=0)
# Engine bug (see the report): a pool drained by the host's shutdown is
# stopped with wp_pool_stop after the drain, and finish_stop only logs
# pool.drained while the state is still DRAINING.
one("pool.drained", pool="web", level="info")
EOF
while read -r verdict what; do
  case $verdict in
    ok) ok "log file: $what" ;;
    *) bad "log file: $verdict $what" ;;
  esac
done < "$TMP/logcheck"
grep -q . "$TMP/logcheck" || bad "log file: the checker printed nothing"
if grep -q FAIL "$TMP/logcheck"; then head -c 4000 "$TMP/log" | sed 's/^/    | /'; fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
