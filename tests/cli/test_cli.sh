#!/usr/bin/env bash
# test_cli.sh WPOOL: tests of the `wpool` command line (WPOOL is the path of
# the binary): --help and --version, usage errors (status 2, a `wpool:`
# message), script failures (status 1), logs (--log-file, --log-level), and
# the graceful shutdown on SIGTERM/SIGINT: on_shutdown handlers first, a
# drain within --drain-timeout, then a hard stop (status 3), logged as
# shutdown.draining, shutdown.progress, shutdown.deadline_exceeded and
# shutdown.stopped JSON lines.
#
# Every check counts; the script ends with an "N passed, N failed" line and
# exits non-zero when a check failed.  Every run of wpool has a time limit.
# Signalled runs start wpool directly in the background (not under
# timeout(1), which would forward a second copy of the signal), wait for the
# script to print "ready", and are killed past their own limit.
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

TMP=$(mktemp -d "${TMPDIR:-/tmp}/wpool-cli.XXXXXX")
OUT=$TMP/out
ERR=$TMP/err
bg_pids=()
cleanup() {
  local p
  for p in "${bg_pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

passed=0
failed=0
case_name=""
case_failed=0

# ---- reporting ----------------------------------------------------------

begin() {
  end_case
  case_name=$1
  case_failed=0
  echo "--- $case_name"
}

# Shows what the failed case's last run printed.
end_case() {
  if [ -n "$case_name" ] && [ "$case_failed" -gt 0 ]; then
    echo "    stdout of the last run:"
    head -c 3000 "$OUT" 2>/dev/null | sed 's/^/      | /'
    echo "    stderr of the last run:"
    head -c 3000 "$ERR" 2>/dev/null | sed 's/^/      | /'
  fi
  case_name=""
}

# check DESCRIPTION COMMAND...: one check, passing when COMMAND succeeds.
check() {
  local what=$1
  shift
  if "$@"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    case_failed=$((case_failed + 1))
    echo "FAIL [$case_name] $what"
  fi
}

# ---- predicates ---------------------------------------------------------

rc_is() { [ "$rc" -eq "$1" ]; }
out_has() { grep -qF -- "$1" "$OUT"; }
err_has() { grep -qF -- "$1" "$ERR"; }
out_lacks() { ! grep -qF -- "$1" "$OUT"; }
err_lacks() { ! grep -qF -- "$1" "$ERR"; }
out_empty() { [ ! -s "$OUT" ]; }
err_empty() { [ ! -s "$ERR" ]; }
out_is() { [ "$(cat "$OUT")" = "$1" ]; }
first_err_line_starts() { head -n 1 "$ERR" | grep -q "^$1"; }
err_lines_at_most() { [ "$(wc -l <"$ERR")" -le "$1" ]; }
# The usage errors: "wpool: message" on one line, then at most a hint line.
usage_error_shape() {
  first_err_line_starts "wpool: " && err_lines_at_most 2 &&
    [ "$(grep -c '^wpool:' "$ERR")" -eq 1 ]
}
lt() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }
ge() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a >= b) }'; }

# JSON log lines.  Python turns a log file into FILE.flat once (Python is
# slow to start), one line per field: "INDEX<TAB>EVENT<TAB>KEY<TAB>VALUE"
# with VALUE as JSON and INDEX the line's position among the JSON lines,
# after a first line "valid<TAB>yes|no": yes when there is at least one
# line and every line is a JSON object with ts, level and event.
cat >"$TMP/flatten.py" <<'EOF'
import json, sys

objs, bad = [], 0
with open(sys.argv[1], errors="replace") as fh:
    for line in fh:
        line = line.strip()
        if not line:
            continue
        try:
            o = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(o, dict):
            objs.append(o)
        else:
            bad += 1
valid = bool(objs) and not bad and all(
    isinstance(o.get("ts"), str) and
    o.get("level") in ("debug", "info", "warn", "error") and
    isinstance(o.get("event"), str) for o in objs)
with open(sys.argv[2], "w") as out:
    out.write("valid\t%s\n" % ("yes" if valid else "no"))
    for i, o in enumerate(objs):
        ev = str(o.get("event")).replace("\t", " ")
        for k, v in o.items():
            out.write("%d\t%s\t%s\t%s\n" % (i, ev, k.replace("\t", " "),
                                            json.dumps(v)))
EOF
# logq FILE QUERY ARGS...:
#   count EVENT          lines with that event
#   field EVENT KEY      KEY of the first line with EVENT, as JSON, or MISSING
#   index EVENT          position of EVENT's first line, or -1
#   log_msg_index MSG    position of the workerpool.log line with msg MSG
#   all_valid            yes or no (see above)
logq() {
  local file=$1 q=$2 flat=$1.flat
  shift 2
  if [ ! -e "$flat" ] || [ "$file" -nt "$flat" ]; then
    python3 "$TMP/flatten.py" "$file" "$flat" || return 1
  fi
  case $q in
  count)
    awk -F'\t' -v e="$1" 'NR > 1 && $2 == e && $3 == "event" { n++ }
      END { print n + 0 }' "$flat" ;;
  field)
    awk -F'\t' -v e="$1" -v k="$2" 'NR > 1 && $2 == e && $3 == k {
      print $4; found = 1; exit } END { if (!found) print "MISSING" }' "$flat" ;;
  index)
    awk -F'\t' -v e="$1" 'NR > 1 && $2 == e { print $1; found = 1; exit }
      END { if (!found) print -1 }' "$flat" ;;
  log_msg_index)
    awk -F'\t' -v m="\"$1\"" 'NR > 1 && $2 == "log" && $3 == "msg" &&
      $4 == m { print $1; found = 1; exit } END { if (!found) print -1 }' \
      "$flat" ;;
  all_valid)
    awk -F'\t' 'NR == 1 { print $2 }' "$flat" ;;
  esac
}
# field_is FILE EVENT KEY VALUE (VALUE as JSON: 0, true, "SIGTERM")
field_is() { [ "$(logq "$1" field "$2" "$3")" = "$4" ]; }
# field_test FILE EVENT KEY OP N: an integer field compared with N
field_test() {
  local v
  v=$(logq "$1" field "$2" "$3")
  [[ "$v" =~ ^-?[0-9]+$ ]] || return 1
  case $4 in
  -ge) [ "$v" -ge "$5" ] ;;
  -gt) [ "$v" -gt "$5" ] ;;
  -eq) [ "$v" -eq "$5" ] ;;
  *) return 1 ;;
  esac
}
field_present() { [ "$(logq "$1" field "$2" "$3")" != MISSING ]; }
field_contains() { logq "$1" field "$2" "$3" | grep -qF -- "$4"; }
has_event() { [ "$(logq "$1" count "$2")" -ge 1 ]; }
# The line the on_shutdown handler of drain.lua logs precedes
# shutdown.draining.
handler_first() {
  local h d
  h=$(logq "$ERR" log_msg_index "on_shutdown handler")
  d=$(logq "$ERR" index shutdown.draining)
  [ "$h" -ge 0 ] && [ "$d" -ge 0 ] && [ "$h" -lt "$d" ]
}
before() { # before FILE EVENT_A EVENT_B: A's first line comes before B's
  local a b
  a=$(logq "$1" index "$2")
  b=$(logq "$1" index "$3")
  [ "$a" -ge 0 ] && [ "$b" -ge 0 ] && [ "$a" -lt "$b" ]
}

# ---- running wpool --------------------------------------------------------

# run ARGS...: runs wpool to its end (60 s at most); sets rc.
run() {
  rm -f "$TMP"/*.flat
  timeout -k 5 60 "$WPOOL" "$@" >"$OUT" 2>"$ERR" </dev/null
  rc=$?
}

now_us() { echo "${EPOCHREALTIME/./}"; }
seconds_since() { # seconds_since T_US
  awk -v a="$(now_us)" -v b="$1" 'BEGIN { printf "%.3f", (a - b) / 1e6 }'
}

# start ARGS...: starts wpool in the background; sets pid.  OUT and ERR are
# emptied first, here: were they emptied by the child's redirections,
# wait_for could find the last run's "ready" and signal the child before
# it has become wpool, and the forked shell would swallow the signal (it
# still has this script's trap, and ignores SIGINT as a background job).
start() {
  rm -f "$TMP"/*.flat
  : >"$OUT"
  : >"$ERR"
  "$WPOOL" "$@" >"$OUT" 2>"$ERR" </dev/null &
  pid=$!
  bg_pids+=("$pid")
}

# alive PID: the process runs (exists and is not a zombie).
alive() {
  local st
  st=$(sed -E 's/^[0-9]+ \(.*\) (.).*$/\1/' "/proc/$1/stat" 2>/dev/null) ||
    return 1
  [ -n "$st" ] && [ "$st" != Z ]
}

# wait_for FILE TEXT SECONDS: polls until FILE contains TEXT; fails past
# SECONDS or when the process ended first.
wait_for() {
  local limit_us=$(($(now_us) + $3 * 1000000))
  until grep -qF -- "$2" "$1" 2>/dev/null; do
    if [ "$(now_us)" -ge "$limit_us" ] || ! alive "$pid"; then
      grep -qF -- "$2" "$1" 2>/dev/null
      return
    fi
    sleep 0.05
  done
}

# finish SECONDS: waits for the background wpool to end; past SECONDS kills
# it.  Sets rc (or rc=-1 when it had to be killed) and took (seconds since
# sent_at, set by the caller when it signalled).
finish() {
  local limit_us=$(($(now_us) + $1 * 1000000))
  while alive "$pid"; do
    if [ "$(now_us)" -ge "$limit_us" ]; then
      post_mortem "$pid"
      kill -KILL "$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      rc=-1
      took=$(seconds_since "$sent_at")
      echo "    (wpool did not end within $1 s: killed)"
      return
    fi
    sleep 0.05
  done
  wait "$pid"
  rc=$?
  took=$(seconds_since "$sent_at")
}

# post_mortem PID: what a wpool that did not end was doing: its signal
# masks and, when gdb is there, every thread's stack.
post_mortem() {
  echo "    post mortem of $1:"
  grep -E '^(State|Threads|SigQ|SigPnd|ShdPnd|SigBlk|SigIgn|SigCgt)' \
    "/proc/$1/status" 2>/dev/null | sed 's/^/      | /'
  if command -v gdb >/dev/null; then
    timeout 30 gdb -p "$1" -batch -ex 'thread apply all bt' 2>/dev/null |
      grep -E '^(#|Thread)' | head -80 | sed 's/^/      | /'
  fi
}

signal() { # signal SIG: sends SIG to the background wpool, timing from now
  sent_at=$(now_us)
  kill "-$1" "$pid"
}

script() { # script NAME: writes stdin to $TMP/NAME, prints the path
  cat >"$TMP/$1"
  echo "$TMP/$1"
}

# ---- scripts ------------------------------------------------------------

S_HELLO=$(script hello.lua <<'EOF'
print("hello", select("#", ...), ...)
for i = 1, #arg do print("arg", i, arg[i]) end
EOF
)

S_SYNTAX=$(script syntax.lua <<'EOF'
local x = = 1
EOF
)

S_RAISE=$(script raise.lua <<'EOF'
print("before the error")
local function kaput() error("kaput: the script failed") end
kaput()
EOF
)

S_LOG=$(script log.lua <<'EOF'
local wp = require "workerpool"
wp.log("info", "an info line", { k = 1 })
wp.log("error", "an error line")
local pool = wp.new { max_workers = 1 }
print(pool:submit_wait(function() return "ran" end))
pool:stop_wait()
EOF
)

# Ten tasks of 0.2 s on two workers; an on_shutdown handler prints a marker
# and logs a line.  The ticker keeps the loop alive until the signal.
S_DRAIN=$(script drain.lua <<'EOF'
local wp = require "workerpool"
local pool = wp.new { max_workers = 2 }
for i = 1, 10 do
  pool:submit(function(k)
    require("workerpool").sleep(0.2)
    io.write(string.format("task %d done\n", k)) -- one write: no interleaving
    io.flush()
  end, i)
end
wp.every(0.05, function() end)
wp.on_shutdown(function()
  wp.log("info", "on_shutdown handler")
  print("on_shutdown handler ran")
  io.stdout:flush()
end)
print("ready")
io.stdout:flush()
EOF
)

# One task that never ends on the only worker, three more queued.
S_STUCK=$(script stuck.lua <<'EOF'
local wp = require "workerpool"
local pool = wp.new { max_workers = 1 }
pool:submit(function() require("workerpool").sleep(1000) end)
for _ = 1, 3 do pool:submit(function() end) end
wp.every(0.05, function() end)
print("ready")
io.stdout:flush()
EOF
)

# Four tasks of 1 s on one worker: a drain of about 4 s.
S_SLOW=$(script slow.lua <<'EOF'
local wp = require "workerpool"
local pool = wp.new { max_workers = 1 }
for _ = 1, 4 do
  pool:submit(function() require("workerpool").sleep(1) end)
end
wp.every(0.05, function() end)
print("ready")
io.stdout:flush()
EOF
)

S_IDLE=$(script idle.lua <<'EOF'
local wp = require "workerpool"
wp.every(0.05, function() end)
print("ready")
io.stdout:flush()
EOF
)

# What the on_shutdown handlers are for: the script stops its own producer
# (its last timer) there.  The drain must still run to its end.
S_PRODUCER=$(script producer.lua <<'EOF'
local wp = require "workerpool"
local pool = wp.new { max_workers = 1 }
local stuck = arg[1] == "stuck"
pool:submit(function(s)
  require("workerpool").sleep(s and 1000 or 0.5)
end, stuck)
for _ = 1, 3 do pool:submit(function() end) end
local producer = wp.every(0.05, function() end)
wp.on_shutdown(function()
  producer:cancel()
  print("producer stopped")
  io.stdout:flush()
end)
print("ready")
io.stdout:flush()
EOF
)

S_HANDLERS=$(script handlers.lua <<'EOF'
local wp = require "workerpool"
wp.every(0.05, function() end)
for i = 1, 3 do
  wp.on_shutdown(function()
    print("handler " .. i)
    io.stdout:flush()
  end)
end
print("ready")
io.stdout:flush()
EOF
)

# The script waits in its own pool:stop_wait() when the signal comes: that
# pool is part of the shutdown story and its deadline.  Its first task never
# ends (a thread that ended unjoined would be a TSan report at _exit).
S_OWN_STOP=$(script own_stop.lua <<'EOF'
local wp = require "workerpool"
local pool = wp.new { max_workers = 1 }
pool:submit(function() require("workerpool").sleep(1000) end)
for _ = 1, 19 do
  pool:submit(function() require("workerpool").sleep(0.5) end)
end
wp.on_shutdown(function()
  print("on_shutdown handler ran")
  io.stdout:flush()
end)
print("ready")
io.stdout:flush()
pool:stop_wait()
print("stop_wait returned")
EOF
)

# The script returns at once: its pool drains at exit, and a signal then
# must still start the shutdown story.  arg[1] tasks; with arg[2] "stuck"
# the first one never ends.
S_EXIT_DRAIN=$(script exit_drain.lua <<'EOF'
local wp = require "workerpool"
local pool = wp.new { max_workers = 1 }
local n = tonumber(arg[1]) or 20
local stuck = arg[2] == "stuck"
for i = 1, n do
  pool:submit(function(k, forever)
    require("workerpool").sleep(forever and 1000 or 0.5)
    io.write(string.format("task %d done\n", k))
    io.flush()
  end, i, stuck and i == 1)
end
wp.on_shutdown(function()
  print("on_shutdown handler ran")
  io.stdout:flush()
end)
print("ready")
io.stdout:flush()
EOF
)

# A main chunk busy in Lua (allocating, so that TSan builds, which run
# signal handlers only at intercepted calls, see the signal too); with
# "pcall", one that catches every error and goes on.
S_BUSY=$(script busy.lua <<'EOF'
local function spin()
  local x = 0
  while true do
    x = x + 1
    if x % 64 == 0 then local _ = {} end
  end
end
print("ready")
io.stdout:flush()
if arg[1] == "pcall" then
  while true do pcall(spin) end
end
spin()
EOF
)

S_TABLE_ERROR=$(script table_error.lua <<'EOF'
error(setmetatable({}, { __tostring = function() return "custom error object" end }))
EOF
)

# Two spawned coroutines join each other and the main script joins one:
# nothing can ever wake it.
S_JOIN_CYCLE=$(script join_cycle.lua <<'EOF'
local wp = require "workerpool"
local a, b
a = wp.spawn(function() wp.sleep(0.01) return b:join() end)
b = wp.spawn(function() wp.sleep(0.01) return a:join() end)
a:join()
print("unreachable")
EOF
)

# ---- help, version, usage errors ----------------------------------------

begin "--help"
run --help
check "exit 0" rc_is 0
check "usage on stdout" out_has "usage: wpool run"
check "options listed" out_has "--drain-timeout"
check "nothing on stderr" err_empty
run run --help
check "run --help: exit 0" rc_is 0
check "run --help: usage on stdout" out_has "usage: wpool run"

begin "--version"
run --version
check "exit 0" rc_is 0
check "a version on stdout" grep -qE '^wpool [0-9]+\.[0-9]+\.[0-9]+' "$OUT"
check "nothing on stderr" err_empty

begin "no arguments"
run
check "exit 2" rc_is 2
check "usage on stderr" err_has "usage: wpool run"
check "nothing on stdout" out_empty

usage_case() { # usage_case TEXT ARGS...: a usage error mentioning TEXT
  local text=$1
  shift
  begin "usage error: wpool $*"
  run "$@"
  check "exit 2" rc_is 2
  check "one-line error starting with 'wpool:'" usage_error_shape
  check "the error mentions '$text'" err_has "$text"
  check "the script did not run" out_empty
}
usage_case "bogus" bogus
usage_case "--bogus" run --bogus "$S_HELLO"
usage_case "abc" run --drain-timeout abc "$S_HELLO"
usage_case "-1" run --drain-timeout -1 "$S_HELLO"
usage_case "nan" run --drain-timeout nan "$S_HELLO"
usage_case "inf" run --drain-timeout inf "$S_HELLO"
usage_case "--drain-timeout" run --drain-timeout
usage_case "loud" run --log-level loud "$S_HELLO"
usage_case "script" run
usage_case "script" run --log-level warn

# ---- scripts that fail --------------------------------------------------

begin "missing script"
run run "$TMP/no-such-script.lua"
check "exit 1" rc_is 1
check "one line" err_lines_at_most 1
check "wpool: cannot open ..." first_err_line_starts "wpool: cannot open $TMP/no-such-script.lua"
check "says why" err_has "No such file or directory"
check "nothing on stdout" out_empty

begin "syntax error"
run run "$S_SYNTAX"
check "exit 1" rc_is 1
check "wpool: and the message" first_err_line_starts "wpool: "
check "names file and line" err_has "$S_SYNTAX:1:"
check "the parser's message" err_has "unexpected symbol"

begin "a script that raises"
run run "$S_RAISE"
check "exit 1" rc_is 1
check "its output before the error" out_is "before the error"
check "the message" err_has "kaput: the script failed"
check "wpool: prefix" first_err_line_starts "wpool: "
check "a traceback" err_has "stack traceback"
check "the traceback names the function" err_has "'kaput'"

# ---- scripts that work --------------------------------------------------

begin "a normal script"
run run "$S_HELLO" one "two words"
check "exit 0" rc_is 0
check "its output, with its arguments" out_is "$(printf 'hello\t2\tone\ttwo words\narg\t1\tone\narg\t2\ttwo words')"
check "nothing on stderr" err_empty

begin "options after the script belong to the script"
run run "$S_HELLO" --log-level loud
check "exit 0" rc_is 0
check "arg[1] and arg[2]" out_has "$(printf 'arg\t1\t--log-level')"
run run -- "$S_HELLO" x
check "-- ends the options: exit 0" rc_is 0
check "-- ends the options: output" out_has "$(printf 'hello\t1\tx')"

begin "--log-file"
LOGF=$TMP/log.jsonl
run run --log-file "$LOGF" "$S_LOG"
check "exit 0" rc_is 0
check "the script's output" out_is "ran"
check "no log lines on stderr" err_empty
check "every line is a JSON log line" [ "$(logq "$LOGF" all_valid)" = yes ]
check "the script's info line" [ "$(logq "$LOGF" log_msg_index "an info line")" -ge 0 ]
check "its fields" grep -qF '"k":1' "$LOGF"
check "the engine's lines (pool.created)" has_event "$LOGF" pool.created
n1=$(wc -l <"$LOGF")
run run --log-file "$LOGF" "$S_LOG"
check "a second run appends" [ "$(wc -l <"$LOGF")" -eq $((n1 * 2)) ]
run run --log-file "$TMP/no-such-dir/log" "$S_LOG"
check "unwritable log file: exit 1" rc_is 1
check "unwritable log file: wpool: error" first_err_line_starts "wpool: cannot open log file"
check "unwritable log file: the script did not run" out_empty

begin "--log-level"
run run "$S_LOG"
check "default: exit 0" rc_is 0
check "default: info lines shown" [ "$(logq "$ERR" log_msg_index "an info line")" -ge 0 ]
run run --log-level error "$S_LOG"
check "error: exit 0" rc_is 0
check "error: the error line is shown" [ "$(logq "$ERR" log_msg_index "an error line")" -ge 0 ]
check "error: info lines hidden" [ "$(logq "$ERR" log_msg_index "an info line")" -lt 0 ]
check "error: the engine's info lines hidden" [ "$(logq "$ERR" count pool.created)" -eq 0 ]

# ---- signals: graceful shutdown ------------------------------------------

begin "SIGTERM with queued work: drains, handlers first, exit 0"
start run "$S_DRAIN"
check "the script got ready" wait_for "$OUT" ready 60
signal TERM
finish 60
check "exit 0" rc_is 0
check "the on_shutdown handler ran" out_has "on_shutdown handler ran"
check "every queued task ran" [ "$(grep -c '^task [0-9]* done$' "$OUT")" -eq 10 ]
check "shutdown.draining" has_event "$ERR" shutdown.draining
check "draining: reason SIGTERM" field_is "$ERR" shutdown.draining reason '"SIGTERM"'
check "draining: the queue depth" field_test "$ERR" shutdown.draining queued -ge 1
check "the handler ran before the drain began" handler_first
check "shutdown.stopped" has_event "$ERR" shutdown.stopped
check "stopped: dropped 0" field_is "$ERR" shutdown.stopped dropped 0
check "stopped: clean" field_is "$ERR" shutdown.stopped clean true
check "no deadline_exceeded" [ "$(logq "$ERR" count shutdown.deadline_exceeded)" -eq 0 ]
check "draining before stopped" before "$ERR" shutdown.draining shutdown.stopped

begin "SIGTERM with nothing to drain: exit 0"
start run "$S_IDLE"
check "the script got ready" wait_for "$OUT" ready 60
signal TERM
finish 60
check "exit 0" rc_is 0
check "draining: 0 queued" field_is "$ERR" shutdown.draining queued 0
check "stopped: clean" field_is "$ERR" shutdown.stopped clean true

begin "SIGTERM with a stuck task: deadline, hard stop, exit 3"
start run --drain-timeout 1 "$S_STUCK"
check "the script got ready" wait_for "$OUT" ready 60
signal TERM
finish 30
check "exit 3" rc_is 3
check "ended after roughly the deadline (<20 s): $took s" lt "$took" 20
check "not before the deadline: $took s" ge "$took" 0.9
check "shutdown.draining" has_event "$ERR" shutdown.draining
check "draining: the queue depth" field_test "$ERR" shutdown.draining queued -ge 1
check "draining: deadline_s" field_is "$ERR" shutdown.draining deadline_s 1.0
check "shutdown.deadline_exceeded" has_event "$ERR" shutdown.deadline_exceeded
check "deadline_exceeded: reason deadline" field_is "$ERR" shutdown.deadline_exceeded reason '"deadline"'
check "shutdown.stopped" has_event "$ERR" shutdown.stopped
check "stopped: dropped > 0" field_test "$ERR" shutdown.stopped dropped -gt 0
check "stopped: dropped = the 3 queued" field_is "$ERR" shutdown.stopped dropped 3
check "stopped: not clean" field_is "$ERR" shutdown.stopped clean false
check "order: draining, deadline_exceeded, stopped" \
  before "$ERR" shutdown.draining shutdown.deadline_exceeded
check "order: deadline_exceeded before stopped" \
  before "$ERR" shutdown.deadline_exceeded shutdown.stopped

begin "a drain longer than 2 s logs shutdown.progress"
start run --drain-timeout 8 "$S_SLOW"
check "the script got ready" wait_for "$OUT" ready 60
signal TERM
finish 60
check "exit 0 (drained within the deadline)" rc_is 0
check "shutdown.progress logged" has_event "$ERR" shutdown.progress
check "progress: queued" field_test "$ERR" shutdown.progress queued -ge 0
check "progress: running" field_test "$ERR" shutdown.progress running -ge 0
check "progress: elapsed_s" field_present "$ERR" shutdown.progress elapsed_s
check "progress: remaining_s" field_present "$ERR" shutdown.progress remaining_s
check "progress between draining and stopped" \
  before "$ERR" shutdown.draining shutdown.progress
check "progress before stopped" before "$ERR" shutdown.progress shutdown.stopped
check "stopped: clean" field_is "$ERR" shutdown.stopped clean true

begin "a second SIGINT during the drain forces the hard stop"
start run --drain-timeout 60 "$S_STUCK"
check "the script got ready" wait_for "$OUT" ready 60
signal INT
check "the drain began" wait_for "$ERR" '"event":"shutdown.draining"' 30
sleep 0.2
kill -INT "$pid"
finish 40
check "exit 3" rc_is 3
check "well before the 60 s drain timeout: $took s" lt "$took" 30
check "draining: reason SIGINT" field_is "$ERR" shutdown.draining reason '"SIGINT"'
check "deadline_exceeded: reason mentions second" \
  field_contains "$ERR" shutdown.deadline_exceeded reason second
check "stopped: dropped > 0" field_test "$ERR" shutdown.stopped dropped -gt 0

begin "every on_shutdown handler runs"
start run "$S_HANDLERS"
check "the script got ready" wait_for "$OUT" ready 60
signal TERM
finish 30
check "exit 0" rc_is 0
check "handler 1 ran" out_has "handler 1"
check "handler 2 ran" out_has "handler 2"
check "handler 3 ran" out_has "handler 3"
check "no coroutine.error" [ "$(logq "$ERR" count coroutine.error)" -eq 0 ]
check "stopped: clean" field_is "$ERR" shutdown.stopped clean true

begin "on_shutdown stops the script's last timer: the drain still completes"
start run --drain-timeout 20 "$S_PRODUCER"
check "the script got ready" wait_for "$OUT" ready 60
signal TERM
finish 40
check "exit 0" rc_is 0
check "the handler ran" out_has "producer stopped"
check "shutdown.draining" has_event "$ERR" shutdown.draining
check "shutdown.stopped" has_event "$ERR" shutdown.stopped
check "stopped: clean" field_is "$ERR" shutdown.stopped clean true

begin "on_shutdown stops the last timer, a task is stuck: the deadline still holds"
start run --drain-timeout 1 "$S_PRODUCER" stuck
check "the script got ready" wait_for "$OUT" ready 60
signal TERM
finish 20
check "exit 3" rc_is 3
check "ended after roughly the deadline (<20 s): $took s" lt "$took" 20
check "shutdown.deadline_exceeded" has_event "$ERR" shutdown.deadline_exceeded
check "stopped: dropped > 0" field_test "$ERR" shutdown.stopped dropped -gt 0

begin "SIGTERM while the script is in its own pool:stop_wait(): the deadline holds"
start run --drain-timeout 1 "$S_OWN_STOP"
check "the script got ready" wait_for "$OUT" ready 60
signal TERM
finish 30
check "exit 3" rc_is 3
check "ended after roughly the deadline (<20 s): $took s" lt "$took" 20
check "not before the deadline: $took s" ge "$took" 0.9
check "the on_shutdown handler ran" out_has "on_shutdown handler ran"
check "draining: the pool in stop_wait counts" field_is "$ERR" shutdown.draining pools 1
check "draining: its queue" field_test "$ERR" shutdown.draining queued -ge 1
check "shutdown.deadline_exceeded" has_event "$ERR" shutdown.deadline_exceeded
check "stopped: dropped > 0" field_test "$ERR" shutdown.stopped dropped -gt 0
check "stopped: not clean" field_is "$ERR" shutdown.stopped clean false

begin "a second SIGTERM during the script's own stop_wait forces the hard stop"
start run --drain-timeout 60 "$S_OWN_STOP"
check "the script got ready" wait_for "$OUT" ready 60
signal TERM
check "the drain began" wait_for "$ERR" '"event":"shutdown.draining"' 30
sleep 0.2
kill -TERM "$pid"
finish 40
check "exit 3" rc_is 3
check "well before the 60 s drain timeout: $took s" lt "$took" 30
check "deadline_exceeded: reason second SIGTERM" \
  field_is "$ERR" shutdown.deadline_exceeded reason '"second SIGTERM"'
check "stopped: dropped > 0" field_test "$ERR" shutdown.stopped dropped -gt 0

begin "SIGTERM while pools drain at exit: the shutdown story, not a kill"
start run --drain-timeout 1 "$S_EXIT_DRAIN" 20 stuck
check "the script got ready" wait_for "$OUT" ready 60
sleep 0.2
signal TERM
finish 30
check "exit 3 (not 143)" rc_is 3
check "ended after roughly the deadline (<20 s): $took s" lt "$took" 20
check "the on_shutdown handler ran" out_has "on_shutdown handler ran"
check "shutdown.draining" has_event "$ERR" shutdown.draining
check "draining: the pool counts" field_is "$ERR" shutdown.draining pools 1
check "draining: its queue" field_test "$ERR" shutdown.draining queued -ge 1
check "shutdown.deadline_exceeded" has_event "$ERR" shutdown.deadline_exceeded
check "stopped: the dropped tasks counted" field_test "$ERR" shutdown.stopped dropped -gt 0
check "stopped: not clean" field_is "$ERR" shutdown.stopped clean false

begin "pools drain at exit when the script returns"
run run "$S_EXIT_DRAIN" 3
check "exit 0" rc_is 0
check "every task ran" [ "$(grep -c '^task [0-9]* done$' "$OUT")" -eq 3 ]
check "no on_shutdown without a signal" out_lacks "on_shutdown handler ran"
check "no shutdown story without a signal" [ "$(logq "$ERR" count shutdown.draining)" -eq 0 ]

begin "SIGINT interrupts a busy main chunk, then the shutdown runs"
start run "$S_BUSY"
check "the script got ready" wait_for "$OUT" ready 60
sleep 0.2
signal INT
finish 30
check "exit 1" rc_is 1
check "promptly: $took s" lt "$took" 10
check "interrupted!" err_has "interrupted!"
check "a traceback" err_has "stack traceback"
check "shutdown.draining" field_is "$ERR" shutdown.draining reason '"SIGINT"'
check "shutdown.stopped" field_is "$ERR" shutdown.stopped clean true

begin "SIGINT interrupts a busy main chunk that catches errors"
start run "$S_BUSY" pcall
check "the script got ready" wait_for "$OUT" ready 60
sleep 0.2
signal INT
finish 30
check "exit 1" rc_is 1
check "interrupted!" err_has "interrupted!"
check "shutdown.stopped" has_event "$ERR" shutdown.stopped

begin "SIGTERM interrupts a main chunk still busy a second later"
start run "$S_BUSY"
check "the script got ready" wait_for "$OUT" ready 60
sleep 0.2
signal TERM
finish 30
check "exit 1" rc_is 1
check "after the grace second, well before SIGKILL: $took s" lt "$took" 20
check "not before the grace second: $took s" ge "$took" 0.9
check "interrupted!" err_has "interrupted!"
check "shutdown.draining" field_is "$ERR" shutdown.draining reason '"SIGTERM"'
check "shutdown.stopped" has_event "$ERR" shutdown.stopped

begin "a table error object: its __tostring"
run run "$S_TABLE_ERROR"
check "exit 1" rc_is 1
check "the __tostring text" err_has "wpool: custom error object"
check "not the type" err_lacks "error object is a table value"
check "a traceback" err_has "stack traceback"

begin "a main script that can never be woken: an error, not exit 0"
run run "$S_JOIN_CYCLE"
check "exit 1" rc_is 1
check "it says so" err_has "wpool: the main script did not finish"
check "it names the join cycle" err_has "(a join cycle)"
check "a traceback of the main script" err_has "in method 'join'"
check "the script did not go on" out_lacks "unreachable"

S_BIG_OUTPUT=$(script big_output.lua <<'EOF'
local line = ("x"):rep(99) .. "\n"
local failed
for _ = 1, 20000 do
  local ok, err = io.stdout:write(line)
  if not ok then failed = err break end
end
io.stderr:write("write failed: ", tostring(failed), "\n")
EOF
)

begin "stdout closed early (| head): SIGPIPE is ignored, the write fails"
rm -f "$TMP"/*.flat
timeout -k 5 60 "$WPOOL" run "$S_BIG_OUTPUT" 2>"$ERR" </dev/null | head -c 10 >"$OUT"
rc=${PIPESTATUS[0]}
check "exit 0, not killed by SIGPIPE (141)" rc_is 0
check "the write reported EPIPE" err_has "write failed: Broken pipe"

end_case
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
