-- test_guards.lua: the production guards of issue 4, each with a test that
-- fails without it (docs/guards.md describes them): deadlines that stop
-- runaway Lua (pcall and xpcall cannot swallow them), cancel of running and
-- queued tasks, stuck workers replaced, memory caps, state recycling,
-- bounded queues (reject and block), queued bytes, resizing, pool:stats(),
-- workerpool.metrics() (checked by promtool), logging calls, and the
-- checking of every new option and task descriptor field.
--
-- Tasks block by polling a shared dictionary until the test sets a key
-- (see `blocker`).  Timing bounds are generous: "ends promptly" means well
-- before what the guard prevents (a 30 s sleep, a loop that never ends),
-- and conditions that must become true are polled with T.eventually.

local T = require "harness"
local workerpool = require "workerpool"

-- ---- helpers ------------------------------------------------------------

local npools = 0
local S = T.suite("test_guards", function(opts)
  npools = npools + 1
  opts.name = opts.name or string.format("guards-%d", npools)
  if opts.idle_timeout == nil then opts.idle_timeout = 60 end
end)
local case, newdict, newpool = S.case, S.newdict, S.newpool
local count, wait_count, stays = S.count, S.wait_count, S.stays

-- Calls f(...) and returns the seconds it took, then its results.
local function timed(f, ...)
  local t0 = workerpool.now()
  local r = table.pack(f(...))
  return workerpool.now() - t0, table.unpack(r, 1, r.n)
end

-- Runs a shell command with the sanitizer runtime (if the suite preloads
-- one) kept out of it; returns true when it exited 0, and its output.
local function sh(cmd)
  local p = assert(io.popen("env -u LD_PRELOAD " .. cmd .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  return ok == true, out
end

-- Runs Lua source `src` (BODY replaced, see below) in a child lua5.4 with
-- its stderr in file errf (or discarded); returns true when it exited 0,
-- and its stdout.  The child keeps the sanitizer runtime (the module
-- needs it); the shell around it does not.
local child_body
local function child(src, errf, env)
  local script = os.tmpname()
  local fh = assert(io.open(script, "w"))
  fh:write((src:gsub("BODY", child_body)))
  fh:close()
  local preload = os.getenv("LD_PRELOAD")
  local ok, out = sh(string.format("sh -c 'exec env %s %s %s %s 2> %s'",
    preload and ("LD_PRELOAD=" .. preload) or "", env or "",
    arg and arg[-1] or "lua5.4", script, errf or "/dev/null"))
  os.remove(script)
  return ok, out
end

-- A task: counts itself in `started`, blocks until the host sets `release`
-- in dict dname, returns its worker id.  Gives up after 30 s.
local function blocker(dname)
  local W = require "workerpool"
  local d = W.shared(dname)
  d:incr("started", 1, 0)
  local deadline = W.now() + 30
  while d:get("release") == nil do
    if W.now() > deadline then error("blocker was never released") end
    W.sleep(0.001)
  end
  d:incr("finished", 1, 0)
  return W.worker_id()
end

local function worker_id() return require("workerpool").worker_id() end

-- The runaway loops of the tasks below.  Under TSan a signal handler runs
-- only when its thread next enters a function TSan intercepts (malloc,
-- pthread_*, nanosleep...), never in the middle of a pure Lua loop, so
-- there the loops allocate a table per turn (BODY); elsewhere they are
-- the literal `while true do end`.  task(src) compiles a task function.
local TSAN = (os.getenv("LD_PRELOAD") or ""):find("tsan", 1, true) ~= nil
local BODY = TSAN and "local _ = {}" or ""
child_body = BODY

-- io.popen and os.execute start /bin/sh, which crashes with the TSan
-- runtime preloaded (as TSan runs of this suite do): there the cases that
-- start processes (promtool, python3, a child lua5.4) skip that part.
local CAN_SPAWN = not TSAN
local function skip(what)
  print("SKIP " .. what .. ": cannot start processes under TSan")
end
local function task(src)
  return assert(load("return " .. src:gsub("BODY", BODY), "=task"))()
end

local spin = task [[function() while true do BODY end end]]

-- ---- deadlines ------------------------------------------------------------

case("timeout: descriptor timeout stops `while true do end`, worker reused",
function()
  local p = newpool { max_workers = 1 }
  local _, id = p:submit(worker_id):wait(10)
  local f = p:submit({ fn = spin, timeout = 0.2, name = "spin" })
  local took, ok, err = timed(f.wait, f, 20)
  T.eq(ok, false, "ok")
  T.eq(err, "timeout")
  T.ok(took < 10, "ended promptly (" .. took .. " s)")
  T.eq(f:status(), "timeout")
  local ok2, id2 = p:submit(worker_id):wait(10)
  T.eq(ok2, true)
  T.eq(id2, id, "the same worker runs the next task")
  T.eq(p:workers(), 1)
  T.eventually(function() return p:stats().completed.timeout == 1 end, 10,
    "completed.timeout counts it")
  T.eq(p:stats().stuck_total, 0, "interrupted, not stuck")
end)

case("timeout: pool task_timeout stops a plain function; math.huge opts out",
function()
  local p = newpool { max_workers = 1, task_timeout = 0.2 }
  local _, id = p:submit(worker_id):wait(10)
  local ok, err = p:submit(spin):wait(20)
  T.eq(ok, false)
  T.eq(err, "timeout")
  -- a descriptor without timeout gets the pool's
  ok, err = p:submit({ fn = spin, name = "d" }):wait(20)
  T.eq(ok, false)
  T.eq(err, "timeout")
  -- a descriptor timeout overrides it either way
  local f = p:submit({ fn = function() require("workerpool").sleep(0.5); return "slept" end,
    timeout = math.huge })
  local ok3, r = f:wait(20)
  T.eq(ok3, true, "timeout = math.huge means no deadline")
  T.eq(r, "slept")
  local ok4, r4 = p:submit({ fn = function() require("workerpool").sleep(0.4); return 1 end,
    timeout = 10 }):wait(20)
  T.eq(ok4, true, "a longer descriptor timeout wins")
  T.eq(r4, 1)
  local ok5, id5 = p:submit(worker_id):wait(10)
  T.eq(ok5, true)
  T.eq(id5, id, "worker reused")
  T.eq(p:workers(), 1)
end)

case("timeout: pcall inside the task cannot swallow it", function()
  local p = newpool { max_workers = 1 }
  local _, id = p:submit(worker_id):wait(10)
  local f = p:submit({ timeout = 0.2, fn = task [[function()
    while true do pcall(function() while true do BODY end end) end
  end]] })
  local ok, err = f:wait(20)
  T.eq(ok, false)
  T.eq(err, "timeout")
  -- also when the pcall'd error is inspected and the loop goes on
  f = p:submit({ timeout = 0.2, fn = task [[function()
    local caught = 0
    while true do
      local ok1, e = pcall(function() while true do BODY end end)
      if not ok1 and tostring(e):find("timeout") then caught = caught + 1 end
    end
  end]] })
  ok, err = f:wait(20)
  T.eq(ok, false)
  T.eq(err, "timeout")
  local _, id2 = p:submit(worker_id):wait(10)
  T.eq(id2, id, "worker reused")
  T.eq(p:workers(), 1)
  T.eq(p:stats().stuck_total, 0)
end)

case("timeout: xpcall with a message handler cannot swallow it", function()
  local p = newpool { max_workers = 1 }
  local _, id = p:submit(worker_id):wait(10)
  local ok, err = p:submit({ timeout = 0.2, fn = task [[function()
    while true do
      xpcall(function() while true do BODY end end, function(e) return e end)
    end
  end]] }):wait(20)
  T.eq(ok, false)
  T.eq(err, "timeout")
  ok, err = p:submit({ timeout = 0.2, fn = task [[function()
    while true do xpcall(function() while true do BODY end end, debug.traceback) end
  end]] }):wait(20)
  T.eq(ok, false)
  T.eq(err, "timeout")
  local _, id2 = p:submit(worker_id):wait(10)
  T.eq(id2, id, "worker reused")
  T.eq(p:workers(), 1)
  T.eq(p:stats().stuck_total, 0)
end)

-- Lua runs the message handler of an error raised by a hook with hooks
-- off, so a handler that never returns cannot be interrupted: the worker
-- is declared stuck (documented limitation).
case("timeout: an xpcall handler that never returns is declared stuck",
function()
  local d, dn = newdict("xpstuck")
  local p = newpool { max_workers = 1, stuck_grace = 0.3 }
  local _, id = p:submit(worker_id):wait(10)
  local f = p:submit({ timeout = 0.2, fn = task [[function(dname)
    local dd = require("workerpool").shared(dname)
    while true do
      xpcall(function() while true do BODY end end, function()
        dd:incr("handler", 1, 0)
        while dd:get("release") == nil do end
      end)
    end
  end]] }, dn)
  local ok, err = f:wait(20)
  T.eq(ok, false)
  T.eq(err, "timeout")
  T.eventually(function() return p:stats().stuck_total == 1 end, 10, "stuck_total")
  T.eq(count(d, "handler"), 1, "the handler is running")
  local _, id2 = p:submit(worker_id):wait(10)
  T.ok(id2 ~= id, "a replacement runs the next task")
  -- once the handler returns, the task unwinds and the thread exits
  d:set("release", true)
  T.eventually(function() return p:stats().stuck == 0 end, 15, "stuck worker exits")
  T.eq(p:workers(), 1)
end)

case("timeout: a coroutine created after the interrupt inherits the hook",
function()
  local p = newpool { max_workers = 1, stuck_grace = 5 }
  local _, id = p:submit(worker_id):wait(10)
  -- the deadline passes in sleep (a C call), which returns early; the
  -- coroutine is created within the next few instructions, before the
  -- task's own coroutine raises, and loops forever
  local f = p:submit({ timeout = 0.2, fn = task [[function()
    require("workerpool").sleep(3)
    local co = coroutine.wrap(function() while true do BODY end end)
    co()
  end]] })
  local took, ok, err = timed(f.wait, f, 20)
  T.eq(ok, false)
  T.eq(err, "timeout")
  T.ok(took < 4, "interrupted, not left for stuck detection (" .. took .. " s)")
  local _, id2 = p:submit(worker_id):wait(10)
  T.eq(id2, id, "worker reused")
  T.eq(p:stats().stuck_total, 0)
end)

case("timeout: a loop in a coroutine resumed before the deadline is declared "
  .. "stuck (documented limitation)", function()
  local d, dn = newdict("costuck")
  local p = newpool { max_workers = 1, stuck_grace = 0.3 }
  local _, id = p:submit(worker_id):wait(10)
  -- the coroutine starts before the deadline and never yields back: the
  -- hook installed on the task's own coroutine never runs
  local f = p:submit({ timeout = 0.2, name = "co-loop", fn = task [[function(dname)
    local W = require "workerpool"
    local dd = W.shared(dname)
    local co = coroutine.wrap(function()
      dd:incr("started", 1, 0)
      while dd:get("release") == nil do end
    end)
    co()
    dd:set("returned", true)
    while true do BODY end -- interrupted here, by the task's own hook
  end]] }, dn)
  local took, ok, err = timed(f.wait, f, 20)
  T.eq(ok, false)
  T.eq(err, "timeout", "resolved as a timeout once declared stuck")
  T.ok(took >= 0.4, "resolved only after deadline + stuck_grace (" .. took .. " s)")
  T.eventually(function()
    local s = p:stats()
    return s.stuck == 1 and s.stuck_total == 1 and s.completed.timeout == 1
  end, 10, "stats().stuck, stuck_total and completed.timeout")
  T.eq(p:workers(), 0, "a stuck worker does not count as live")
  -- a replacement serves the next task
  local ok2, id2 = p:submit(worker_id):wait(10)
  T.eq(ok2, true)
  T.ok(id2 ~= id, "a new worker runs the next task")
  T.eq(p:workers(), 1)
  -- the stuck one, once it returns to Lua, is interrupted and exits
  d:set("release", true)
  T.eventually(function() return p:stats().stuck == 0 end, 15,
    "the stuck worker exits once it returns to Lua")
  T.eq(d:get("returned"), nil,
    "interrupted at its first instruction back in the task's coroutine")
  T.eq(p:stats().stuck_total, 1)
  T.eq(p:stats().completed.timeout, 1, "its end is not counted twice")
  -- and its state is never reused
  for _ = 1, 3 do
    local _, idn = p:submit(worker_id):wait(10)
    T.eq(idn, id2)
  end
  T.eq(p:workers(), 1)
end)

-- Regression: a worker declared stuck while it still decodes its task's
-- arguments (a deadline shorter than the decoding, and stuck_grace = 0)
-- used to read the task message after the watchdog, resolving the future,
-- had freed it: a heap-use-after-free under ASan, a segfault in a plain
-- build.  The worker now frees the message.  Runs in a child process so
-- that a crash fails only this case.
case("stuck while decoding its arguments: the task message stays valid", function()
  if not CAN_SPAWN then return skip("the child process") end
  local ok, out = child([[
    local W = require "workerpool"
    local p = W.new { max_workers = 1, stuck_grace = 0 }
    local big = {}
    for i = 1, 300000 do big[i] = "s" .. i end
    for _ = 1, 3 do
      local f = p:submit({ fn = function(t) return #t end, timeout = 0.001 }, big)
      print(f:wait(60))
    end
    local deadline = W.now() + 60
    while p:stats().stuck > 0 and W.now() < deadline do W.sleep(0.01) end
    p:stop()
  ]], nil, "ASAN_OPTIONS=detect_leaks=0") -- memory safety only: see the next case
  T.ok(ok, "the child exited 0; stdout: " .. out)
  local n = 0
  for line in out:gmatch("[^\n]+") do
    n = n + 1
    T.ok(line == "false\ttimeout" or line == "true\t300000", "outcome: " .. line)
  end
  T.eq(n, 3, "three outcomes")
end)

-- Threads of this process, or nil where /proc is missing.
local function threads()
  local f = io.open("/proc/self/status")
  if not f then return nil end
  local n
  for line in f:lines() do n = n or line:match("^Threads:%s*(%d+)") end
  f:close()
  return tonumber(n)
end

-- Engine bug (see the report): a worker declared stuck keeps w->stuck set
-- after its task returned, and stop() detaches every such worker instead of
-- joining it; so stop() returns while that thread still closes its state
-- (and a process exiting then has a thread tearing down a Lua state:
-- LeakSanitizer dies with "Tracer caught signal 11").
case("stop() joins a stuck worker that has returned", function()
  local before = threads()
  if not before then return print("SKIP no /proc/self/status") end
  local d, dn = newdict("stuckjoin")
  -- stuck_grace also bounds how long closing a state may take: it must
  -- exceed the close below, even under TSan on a loaded machine
  local p = newpool { max_workers = 1, stuck_grace = TSAN and 6 or 3,
    -- a state that takes a while to close
    init = string.format("KEEP = {} for i = 1, %d do KEEP[i] = 's' .. i end",
      TSAN and 100000 or 500000) }
  local f = p:submit({ timeout = 0.1, fn = function(dname)
    local dd = require("workerpool").shared(dname)
    coroutine.wrap(function() while dd:get("release") == nil do end end)()
  end }, dn)
  T.eq(select(2, f:wait(30)), "timeout")
  T.eventually(function() return p:stats().stuck_total == 1 end, 10, "declared stuck")
  d:set("release", true)
  T.eventually(function() return p:stats().stuck == 0 end, 15, "the task returned")
  T.eq(p:stop(), 0)
  local after = threads()
  T.ok(after <= before, string.format(
    "no thread of the pool is left once stop() returned (%d before, %d after)",
    before, after))
end)

case("timeout: a task blocked in workerpool.sleep(30) ends promptly", function()
  local p = newpool { max_workers = 1 }
  local _, id = p:submit(worker_id):wait(10)
  local f = p:submit({ timeout = 0.2, fn = function()
    require("workerpool").sleep(30)
    return "slept"
  end })
  local took, ok, err = timed(f.wait, f, 40)
  T.eq(ok, false)
  T.eq(err, "timeout")
  T.ok(took < 5, "sleep returned early (" .. took .. " s)")
  local _, id2 = p:submit(worker_id):wait(10)
  T.eq(id2, id)
  T.eq(p:stats().stuck_total, 0)
end)

-- Engine bug (see the report): workerpool.sleep only looks at the interrupt
-- when nanosleep is cut short by the signal, and the signal is sent once.
-- A task that sleeps again right after an interrupted sleep (before the
-- count hook raises, 1000 instructions later) sleeps in full, so the
-- worker is declared stuck although every call it makes is interruptible.
case("timeout: repeated short sleeps stop at the deadline, not as stuck",
function()
  local p = newpool { max_workers = 1, stuck_grace = 1.5 }
  local f = p:submit({ timeout = 0.2, fn = function()
    local W = require "workerpool"
    for _ = 1, 8 do W.sleep(0.5) end
    return "slept"
  end })
  local ok, err = f:wait(20)
  T.eq(ok, false)
  T.eq(err, "timeout")
  T.eventually(function() return p:running() == 0 and p:stats().stuck == 0 end,
    15, "the task ended")
  T.eq(p:stats().stuck_total, 0, "interrupted at its deadline, not declared stuck")
end)

-- ---- shutdown that always ends ---------------------------------------------

-- A task that loops in Lua until `release` is set in dict dname (so that a
-- failing case frees it), counting itself in `started` first.
local gated_spin = task [[function(dname)
  local d = require("workerpool").shared(dname)
  d:incr("started", 1, 0)
  while d:get("release") == nil do BODY end
  d:set("finished", true)
end]]

-- The same loop inside a coroutine resumed before any interrupt: the hook
-- set on the task's own coroutine never runs there, so only stuck
-- detection ends it.
local gated_co_spin = task [[function(dname)
  local d = require("workerpool").shared(dname)
  d:incr("started", 1, 0)
  coroutine.wrap(function() while d:get("release") == nil do end end)()
end]]

case("stop_wait(): task_timeout still interrupts a task running during the drain",
function()
  local d, dn = newdict("drainto")
  local p = newpool { max_workers = 1, task_timeout = 0.3 }
  local f = p:submit(gated_spin, dn)
  wait_count(d, "started", 1)
  local took, n = timed(p.stop_wait, p)
  T.eq(n, 0)
  T.eq(select(2, f:wait(0)), "timeout")
  T.ok(took < 10, "stop_wait ended (" .. took .. " s)")
end)

case("stop_wait(): a 2 s task with task_timeout = 0.3 does not run to the end",
function()
  local d, dn = newdict("drain2s")
  local p = newpool { max_workers = 1, task_timeout = 0.3 }
  local f = p:submit(task [[function(dname)
    local W = require "workerpool"
    local dd = W.shared(dname)
    dd:incr("started", 1, 0)
    local t = W.now() + 2
    while W.now() < t do BODY end
    dd:set("finished", true)
  end]], dn)
  wait_count(d, "started", 1)
  p:stop_wait()
  T.eq(select(2, f:wait(0)), "timeout")
  T.eq(d:get("finished"), nil, "interrupted at its deadline")
end)

case("stop(): a worker stuck during the drain is abandoned, not waited for",
function()
  local d, dn = newdict("drainstuck")
  local p = newpool { max_workers = 1, stuck_grace = 0.3 }
  local f = p:submit({ fn = gated_co_spin, timeout = 0.2 }, dn)
  wait_count(d, "started", 1)
  local took = timed(p.stop, p)
  T.ok(took < 10, "stop ended (" .. took .. " s)")
  T.eq(select(2, f:wait(0)), "timeout")
  T.eq(p:stats().stuck_total, 1)
end)

case("stop_wait(deadline): running tasks are interrupted as by cancel",
function()
  local d, dn = newdict("swdl")
  local p = newpool { max_workers = 2 }
  local run = { p:submit(gated_spin, dn), p:submit(task [[function(dname)
    local W = require "workerpool"
    W.shared(dname):incr("started", 1, 0)
    W.sleep(30)
  end]], dn) }
  wait_count(d, "started", 2)
  local queued = { p:submit(gated_spin, dn), p:submit(gated_spin, dn) }
  local took, n, k = timed(p.stop_wait, p, 0.2)
  T.eq(n, 2, "discarded")
  T.eq(k, 2, "interrupted")
  T.ok(took < 10, "stop_wait(0.2) ended (" .. took .. " s)")
  for _, f in ipairs(run) do T.eq(select(2, f:wait(0)), "cancelled") end
  for _, f in ipairs(queued) do T.eq(select(2, f:wait(0)), "discarded") end
  T.eq(d:get("finished"), nil)
  T.eq(p:stats().completed.cancelled, 2)
  T.eq(p:workers(), 0)
  -- a second stop_wait: nothing left
  T.eq(T.pack(p:stop_wait(0)).n, 2)
  T.eq(select(2, p:stop_wait(0)), 0)
end)

case("stop_wait(0) is the hard stop; a drained pool reports 0, 0", function()
  local d, dn = newdict("sw0")
  local p = newpool { max_workers = 1 }
  local f = p:submit(gated_spin, dn)
  wait_count(d, "started", 1)
  local q = p:submit(gated_spin, dn)
  local n, k = p:stop_wait(0)
  T.eq(n, 1)
  T.eq(k, 1)
  T.eq(select(2, f:wait(0)), "cancelled")
  T.eq(select(2, q:wait(0)), "discarded")
  local p2 = newpool { max_workers = 1 }
  T.eq(p2:submit_wait(function() return 1 end), 1)
  local n2, k2 = p2:stop_wait(5)
  T.eq(n2, 0)
  T.eq(k2, 0)
end)

case("stop_wait(deadline): a task that cannot be interrupted is abandoned after "
  .. "stuck_grace", function()
  local d, dn = newdict("swab")
  local p = newpool { max_workers = 1, stuck_grace = 0.3 }
  local f = p:submit(gated_co_spin, dn)
  wait_count(d, "started", 1)
  local took, n, k = timed(p.stop_wait, p, 0.1)
  T.eq(n, 0)
  T.eq(k, 1, "abandoned")
  T.ok(took >= 0.35 and took < 10, "deadline + stuck_grace (" .. took .. " s)")
  T.eq(select(2, f:wait(0)), "cancelled")
  T.eq(p:stats().stuck_total, 1)
end)

-- An init whose state never finishes closing: a __gc that waits for
-- `release` in dict dname.
local function hanging_gc_init(dname)
  return string.format([[
    local W = require "workerpool"
    local d = W.shared(%q)
    HANG = setmetatable({}, { __gc = function()
      d:incr("gc", 1, 0)
      while d:get("release") == nil do W.sleep(0.005) end
    end })
  ]], dname)
end

case("stop(): a state whose __gc never returns is abandoned after stuck_grace",
function()
  local d, dn = newdict("gchang")
  -- the state made by new, never used by a task
  local p1 = newpool { max_workers = 1, stuck_grace = 0.3, init = hanging_gc_init(dn) }
  local took = timed(p1.stop, p1)
  T.ok(took < 10, "stop of an unused pool ended (" .. took .. " s)")
  -- a state used by a worker thread
  local p2 = newpool { max_workers = 1, stuck_grace = 0.3, init = hanging_gc_init(dn) }
  T.eq(p2:submit_wait(function() return 1 end), 1)
  took = timed(p2.stop_wait, p2)
  T.ok(took < 10, "stop_wait ended (" .. took .. " s)")
  T.eq(p2:stats().stuck_total, 1, "logged and counted as stuck")
  -- a state recycled in the middle of the pool's life
  local p3 = newpool { max_workers = 1, stuck_grace = 0.3, max_tasks_per_worker = 1,
    init = hanging_gc_init(dn) }
  local f = p3:submit(function() return 1 end)
  T.eq(f:wait(10), true)
  took = timed(p3.stop_wait, p3)
  T.ok(took < 10, "stop_wait ended (" .. took .. " s)")
  wait_count(d, "gc", 3)
  d:set("release", true)
end)

-- ---- interrupts that arrive before the task runs ---------------------------

-- max_tasks_per_worker = 1 recycles the state after each task; the next
-- task waits for init (0.5 s) after it was taken: an interrupt sent then
-- used to be dropped.
local function slow_init(dname)
  return string.format([[
    local W = require "workerpool"
    W.shared(%q):incr("inits", 1, 0)
    local t = W.now() + 0.5
    while W.now() < t do end
  ]], dname)
end

case("cancel during a recycled state's init is honoured when the task starts",
function()
  local d, dn = newdict("lostcancel")
  local p = newpool { max_workers = 1, max_tasks_per_worker = 1, init = slow_init(dn) }
  T.eq(p:submit(function() return 1 end):wait(10), true)
  local f = p:submit(gated_spin, dn)
  wait_count(d, "inits", 2)
  T.eq(d:get("started"), nil, "still in init")
  T.eq(f:cancel(), true)
  local ok, err = f:wait(20)
  T.eq(ok, false)
  T.eq(err, "cancelled")
  T.eq(d:get("finished"), nil)
  T.eq(p:stop(), 0)
end)

case("a deadline passed during a recycled state's init is honoured", function()
  local _, dn = newdict("losttimeout")
  local p = newpool { max_workers = 1, max_tasks_per_worker = 1, task_timeout = 0.2,
    stuck_grace = 2, init = slow_init(dn) }
  T.eq(p:submit(function() return 1 end):wait(10), true)
  local f = p:submit(gated_spin, dn)
  local ok, err = f:wait(20)
  T.eq(ok, false)
  T.eq(err, "timeout")
  T.eventually(function() return p:running() == 0 end, 10, "the task ended")
  T.eq(p:stats().stuck_total, 0, "interrupted, not declared stuck")
end)

case("5 ms deadlines on busy workers: every task times out, none is stuck",
function()
  local p = newpool { max_workers = 8, stuck_grace = 5 }
  local spin_fn = task [[function() while true do BODY end end]]
  local fs = {}
  local n = TSAN and 300 or 1500
  for i = 1, n do
    fs[i] = p:submit({ fn = spin_fn, timeout = 0.001 * (1 + i % 5) })
  end
  for i = 1, n do
    local ok, err = fs[i]:wait(60)
    T.eq(ok, false, "task " .. i)
    T.eq(err, "timeout", "task " .. i)
  end
  T.eq(p:stats().stuck_total, 0, "no worker stuck")
end)

-- ---- idle workers, tiny durations -------------------------------------------

case("idle min_workers with idle_timeout = 0 sleep", function()
  local p = newpool { max_workers = 8, min_workers = 8, idle_timeout = 0 }
  T.eq(p:workers(), 8)
  workerpool.sleep(0.3) -- the workers open their states
  local c0, t0 = os.clock(), workerpool.now()
  workerpool.sleep(1)
  local cpu, wall = os.clock() - c0, workerpool.now() - t0
  T.ok(cpu < 0.2 * wall, string.format("%.2f s of CPU in %.2f s idle", cpu, wall))
  T.eq(p:workers(), 8, "never reaped")
end)

case("durations below 1 µs count as 1 µs, never as off", function()
  local d, dn = newdict("tiny")
  -- drop_log_interval: the watchdog must not hold the pool lock
  local p = newpool { max_workers = 2, drop_log_interval = 1e-10 }
  for i = 1, 20 do T.eq(p:submit_wait(function(x) return x end, i), i) end
  T.eq(p:stop(), 0)
  -- task_timeout and a descriptor timeout
  local p2 = newpool { max_workers = 2, task_timeout = 1e-10 }
  T.eq(select(2, p2:submit(gated_spin, dn):wait(20)), "timeout")
  T.eq(select(2, p2:submit({ fn = gated_spin, timeout = 1e-10 }, dn):wait(20)),
    "timeout")
  T.eq(d:get("finished"), nil)
end)

-- ---- pools not findable before new succeeded ----------------------------

case("workerpool.get does not find a pool whose init is still running or failed",
function()
  local d, dn = newdict("halfbuilt")
  local p = newpool { max_workers = 1 }
  local f = p:submit(function(dname)
    local W = require "workerpool"
    local dd = W.shared(dname)
    local found = 0
    dd:set("looking", true)
    while not dd:get("done") do
      if W.get("guards-halfbuilt") then found = found + 1 end
    end
    return found
  end, dn)
  T.eventually(function() return d:get("looking") end, 10, "the task looks")
  local ok, err = pcall(workerpool.new, { name = "guards-halfbuilt", max_workers = 1,
    init = "local t = require('workerpool').now() + 0.3 "
      .. "while require('workerpool').now() < t do end error('boom')" })
  T.eq(ok, false)
  T.ok(tostring(err):find("boom", 1, true), tostring(err))
  d:set("done", true)
  local _, found = f:wait(20)
  T.eq(found, 0, "never found")
  collectgarbage()
end)

case("init cannot reach its own pool through workerpool.get", function()
  local init = [[
    local W = require "workerpool"
    local self = W.get(W.pool_name())
    FOUND = self ~= nil
    if self then self:submit(function() return 1 end) end
    if FAIL then error("boom") end
  ]]
  local ok, err = pcall(workerpool.new, { name = "guards-self-fail", max_workers = 1,
    init = "FAIL = true " .. init })
  T.eq(ok, false)
  T.ok(tostring(err):find("boom", 1, true), tostring(err))
  local p = newpool { name = "guards-self", max_workers = 2, init = init }
  T.eq(p:submit_wait(function() return rawget(_G, "FOUND") end), false)
  T.eq(workerpool.get("guards-self"):name(), "guards-self", "findable once made")
  T.eq(p:stop_wait(), 0)
  collectgarbage()
end)

-- ---- cancel ---------------------------------------------------------------

case("cancel: a running Lua loop, then the worker is reused", function()
  local d, dn = newdict("cancelrun")
  local p = newpool { max_workers = 1 }
  local _, id = p:submit(worker_id):wait(10)
  local f = p:submit(task [[function(dname)
    require("workerpool").shared(dname):set("running", true)
    while true do pcall(function() while true do BODY end end) end
  end]], dn)
  T.eventually(function() return d:get("running") end, 10, "task started")
  T.eq(f:cancel(), true, "cancel of a running task")
  local again = f:cancel()
  T.eq(type(again), "boolean", "a second cancel answers")
  local took, ok, err = timed(f.wait, f, 20)
  T.eq(ok, false)
  T.eq(err, "cancelled")
  T.ok(took < 10, "ended promptly")
  T.eq(f:status(), "cancelled")
  T.eq(f:cancel(), false, "cancel after the end")
  T.eq(select(2, f:wait(0)), "cancelled", "the outcome does not change")
  local _, id2 = p:submit(worker_id):wait(10)
  T.eq(id2, id, "worker reused")
  T.eventually(function() return p:stats().completed.cancelled == 1 end, 10,
    "completed.cancelled")
end)

case("cancel: a task in workerpool.sleep(30)", function()
  local d, dn = newdict("cancelsleep")
  local p = newpool { max_workers = 1 }
  local f = p:submit(function(dname)
    local W = require "workerpool"
    W.shared(dname):set("running", true)
    W.sleep(30)
  end, dn)
  T.eventually(function() return d:get("running") end, 10, "task started")
  T.eq(f:cancel(), true)
  local took, ok, err = timed(f.wait, f, 40)
  T.eq(ok, false)
  T.eq(err, "cancelled")
  T.ok(took < 5, "sleep cut short (" .. took .. " s)")
end)

case("cancel: a queued task never runs; cancel twice; cancel of a finished task",
function()
  local d, dn = newdict("cancelq")
  local p = newpool { max_workers = 1 }
  local b = p:submit(blocker, dn)
  wait_count(d, "started", 1)
  local q = p:submit(function(dname)
    require("workerpool").shared(dname):set("queued_ran", true)
  end, dn)
  T.eq(p:waiting(), 1)
  T.eq(q:cancel(), true, "first cancel")
  T.eq(q:cancel(), false, "second cancel")
  T.eq(p:waiting(), 0, "removed from the queue")
  local ok, err = q:wait(0)
  T.eq(ok, false)
  T.eq(err, "cancelled")
  d:set("release", true)
  T.eq(b:wait(10), true)
  T.eq(b:cancel(), false, "cancel of a task that returned")
  T.eq(b:status(), "ok")
  -- the queue behind it still runs in order
  T.eq(p:submit(worker_id):wait(10), true)
  T.eq(d:get("queued_ran"), nil, "the cancelled task never ran")
  local s = p:stats()
  T.eq(s.completed.cancelled, 1)
  T.eq(s.dropped.discarded, 0)
end)

-- ---- memory caps ----------------------------------------------------------

case("memory_limit: an unbounded allocator fails, its neighbour completes",
function()
  local d, dn = newdict("mem")
  local p = newpool { max_workers = 2, memory_limit = 32 * 1024 * 1024 }
  -- the neighbour is running (on the other worker) for the whole time
  local nb = p:submit(function(dname)
    local t = {}
    for i = 1, 1000 do t[i] = string.rep("n", 100) .. i end -- some memory of its own
    local id = blocker(dname)
    return #t, id
  end, dn)
  wait_count(d, "started", 1)
  local hog = p:submit({ name = "hog", fn = function()
    local t, i = {}, 0
    while #t >= 0 do
      i = i + 1
      t[i] = string.rep("x", 1000) .. i
    end
  end })
  local ok, err = hog:wait(60)
  T.eq(ok, false)
  T.eq(err, "memory limit exceeded")
  T.eq(nb:done(), false, "the neighbour is still running")
  d:set("release", true)
  local ok2, n, nid = nb:wait(20)
  T.eq(ok2, true, "neighbour completes")
  T.eq(n, 1000)
  T.ok(nid, "neighbour ran in a worker")
  -- the pool still works (the hog's state was replaced)
  for _ = 1, 4 do
    local ok3, len = p:submit(function() return #string.rep("y", 1 << 20) end):wait(20)
    T.eq(ok3, true)
    T.eq(len, 1 << 20)
  end
  T.eventually(function()
    local st = p:stats()
    return st.memory_limit_hits == 1 and st.completed.error == 1
  end, 10, "memory_limit_hits")
  local s = p:stats()
  T.eq(s.completed.error, 1, "the hog counts as an error")
  T.ok(s.memory > 0 and s.memory < 2 * 32 * 1024 * 1024,
    "memory of the states stays under the caps (" .. s.memory .. ")")
end)

-- Engine bug (see the report): when the task catches the memory error
-- itself (pcall) and returns, the state is still closed and replaced (the
-- allocator refused it once), but memory_limit_hits, documented as the
-- number of states replaced, does not count it and no worker.memory_limit
-- event is sent.
case("memory_limit: a hit caught by the task's own pcall is still counted",
function()
  local d, dn = newdict("mempcall")
  local p = newpool { max_workers = 1, memory_limit = 16 * 1024 * 1024,
    init = string.format("require('workerpool').shared(%q):incr('inits', 1, 0)", dn) }
  local ok, caught, err = p:submit(function()
    return pcall(function()
      local t = {}
      for i = 1, math.huge do t[i] = string.rep("x", 1000) .. i .. #t end
    end)
  end):wait(60)
  T.eq(ok, true, "the task returned")
  T.eq(caught, false)
  T.eq(err, "not enough memory")
  T.eq(p:submit(worker_id):wait(10), true)
  T.eq(d:get("inits"), 2, "the state was replaced")
  T.eventually(function() return p:stats().memory_limit_hits == 1 end, 2,
    "memory_limit_hits counts the replaced state")
end)

case("memory_limit: a cap too small for a state fails workerpool.new clearly",
function()
  local ok, err = pcall(workerpool.new, { max_workers = 1, memory_limit = 1024 })
  T.eq(ok, false)
  T.ok(tostring(err):find("workerpool.new:", 1, true), err)
  T.ok(tostring(err):find("memory", 1, true), err)
end)

case("max_tasks_per_worker = 3: the state is recycled every 3 tasks", function()
  local d, dn = newdict("recycle")
  local p = newpool { max_workers = 1, max_tasks_per_worker = 3, init = string.format([[
      require("workerpool").shared(%q):incr("inits", 1, 0)
      runs = 0
      function run() runs = runs + 1; return runs end
    ]], dn) }
  T.eq(d:get("inits"), 1, "the first state is made by new")
  local seq = {}
  for i = 1, 7 do
    local ok, n = p:submit("run"):wait(10)
    T.eq(ok, true)
    seq[i] = n
  end
  T.eq(table.concat(seq, ","), "1,2,3,1,2,3,1", "globals start over every 3 tasks")
  T.eq(d:get("inits"), 3, "init ran 3 times")
  T.eq(p:workers(), 1)
end)

-- ---- bounded queue --------------------------------------------------------

case("queue_cap: a full queue rejects at once and counts every rejection",
function()
  local d, dn = newdict("full")
  local p = newpool { max_workers = 1, queue_cap = 2 }
  local running = p:submit(blocker, dn)
  wait_count(d, "started", 1)
  local q1, q2 = p:submit(blocker, dn), p:submit({ fn = blocker }, dn)
  T.ok(q1 and q2, "two fit")
  for i = 1, 3 do
    local took, f, err, code = timed(p.submit, p, blocker, dn)
    T.eq(f, nil, "rejection " .. i)
    T.eq(err, "full")
    T.eq(code, "EFULL")
    T.ok(took < 1, "at once (" .. took .. " s)")
  end
  T.eq(select(2, p:submit({ handler = "nope", name = "x" })), "full",
    "descriptors are rejected too")
  local s = p:stats()
  T.eq(s.dropped.full, 4)
  T.eq(s.submitted, 3)
  T.eq(s.queued, 2)
  d:set("release", true)
  for _, f in ipairs { running, q1, q2 } do T.eq(f:wait(10), true) end
  T.eq(p:submit(worker_id):wait(10), true, "room again")
  T.eq(p:stats().dropped.full, 4)
end)

case("on_full = block: a plain-Lua submit waits for room and succeeds",
function()
  local d, dn = newdict("block")
  local p = newpool { max_workers = 1, queue_cap = 1, on_full = "block",
    submit_timeout = 20 }
  local helper = newpool { max_workers = 1 }
  local running = p:submit(blocker, dn)
  wait_count(d, "started", 1)
  local queued = p:submit(blocker, dn)
  -- room appears only when the helper releases the blocker
  helper:submit(function(dname)
    local W = require "workerpool"
    W.sleep(0.3)
    W.shared(dname):set("release", true)
  end, dn)
  local took, f, err = timed(p.submit, p, blocker, dn)
  T.ok(f, "submit succeeded: " .. tostring(err))
  T.eq(d:get("release"), true, "it returned only after room appeared")
  T.ok(took < 15, "before submit_timeout")
  for _, g in ipairs { running, queued, f } do T.eq(g:wait(10), true) end
  T.eq(p:stats().dropped.full, 0)
end)

case("on_full = block: gives up with nil, \"full\" after submit_timeout",
function()
  local d, dn = newdict("blockto")
  local p = newpool { max_workers = 1, queue_cap = 1, on_full = "block",
    submit_timeout = 0.5 }
  p:submit(blocker, dn)
  wait_count(d, "started", 1)
  p:submit(blocker, dn)
  local took, f, err, code = timed(p.submit, p, blocker, dn)
  T.eq(f, nil)
  T.eq(err, "full")
  T.eq(code, "EFULL")
  T.ok(took >= 0.4, "waited about submit_timeout (" .. took .. " s)")
  T.ok(took < 10, "then gave up (" .. took .. " s)")
  T.eq(p:stats().dropped.full, 1)
  local z = newpool { max_workers = 1, queue_cap = 1, on_full = "block",
    submit_timeout = 0 }
  z:submit(blocker, dn)
  wait_count(d, "started", 2)
  z:submit(blocker, dn)
  took, f, err = timed(z.submit, z, blocker, dn)
  T.eq(f, nil)
  T.eq(err, "full")
  T.ok(took < 1, "submit_timeout = 0 does not wait")
end)

case("on_full = block: stopping the pool releases a blocked submitter",
function()
  local d, dn = newdict("blockstop")
  local p = newpool { max_workers = 1, queue_cap = 1, on_full = "block" }
  local helper = newpool { max_workers = 1 }
  p:submit(blocker, dn)
  wait_count(d, "started", 1)
  p:submit(blocker, dn)
  local name = p:name()
  helper:submit(function(pname, dname)
    local W = require "workerpool"
    W.sleep(0.3)
    local pool = W.get(pname)
    W.shared(dname):set("release", true)
    pool:stop()
  end, name, dn)
  local f, err, code = p:submit(blocker, dn)
  T.eq(f, nil)
  T.eq(err, "stopped")
  T.eq(code, "ESTOPPED")
  T.eq(p:stats().dropped.stopped, 1)
end)

-- ---- queued bytes ---------------------------------------------------------

case("queued_bytes: grows with big queued arguments, back to 0 after resume",
function()
  local p = newpool { max_workers = 2 }
  p:pause()
  local big = string.rep("a", 1 << 20)
  local fs = {}
  for i = 1, 4 do fs[i] = p:submit(function(s) return #s end, big) end
  local s = p:stats()
  T.eq(s.queued, 4)
  T.ok(s.queued_bytes >= 4 << 20, "at least the strings (" .. s.queued_bytes .. ")")
  T.ok(s.queued_bytes < (4 << 20) + 65536, "not much more (" .. s.queued_bytes .. ")")
  T.eq(fs[4]:cancel(), true)
  T.ok(p:stats().queued_bytes < (3 << 20) + 65536, "a cancelled task leaves")
  p:resume()
  for i = 1, 3 do
    local ok, n = fs[i]:wait(20)
    T.eq(ok, true)
    T.eq(n, 1 << 20)
  end
  T.eq(p:stats().queued_bytes, 0)
  -- discarded by stop: back to 0 as well
  p:pause()
  for _ = 1, 2 do p:submit(function(x) return #x end, big) end
  T.ok(p:stats().queued_bytes >= 2 << 20)
  T.eq(p:stop(), 2)
  T.eq(p:stats().queued_bytes, 0)
  T.eq(p:stats().dropped.discarded, 2)
end)

-- ---- resize ---------------------------------------------------------------

case("resize: growing from 1 to 4 runs 4 blocked tasks at once", function()
  local d, dn = newdict("grow")
  local p = newpool { max_workers = 1 }
  local fs = {}
  for i = 1, 4 do fs[i] = p:submit(blocker, dn) end
  wait_count(d, "started", 1)
  stays(function() return count(d, "started") == 1 end, 0.2, "only one runs")
  T.eq(p:resize(4), true)
  T.eq(p:size(), 4)
  T.eq(p:stats().max_workers, 4)
  wait_count(d, "started", 4, "all four run once grown")
  T.eq(p:running(), 4)
  T.eq(p:workers(), 4)
  d:set("release", true)
  local ids = {}
  for i = 1, 4 do
    local ok, id = fs[i]:wait(10)
    T.eq(ok, true)
    ids[id] = true
  end
  local n = 0
  for _ in pairs(ids) do n = n + 1 end
  T.eq(n, 4, "four different workers")
end)

case("resize: shrinking from 4 to 1 lets running tasks finish", function()
  local d, dn = newdict("shrink")
  local p = newpool { max_workers = 4 }
  local fs = {}
  for i = 1, 4 do fs[i] = p:submit(blocker, dn) end
  wait_count(d, "started", 4)
  T.eq(p:resize(1), true)
  T.eq(p:size(), 1)
  stays(function() return p:running() == 4 end, 0.2, "running tasks keep running")
  d:set("release", true)
  for i = 1, 4 do T.eq(fs[i]:wait(10), true, "task " .. i .. " finished") end
  T.eventually(function()
    return p:workers() == 1 and p:stats().completed.ok == 4
  end, 10, "workers() drops to 1")
  -- now one at a time
  d:set("release", nil)
  local a, b = p:submit(blocker, dn), p:submit(blocker, dn)
  wait_count(d, "started", 5)
  stays(function() return count(d, "started") == 5 end, 0.2, "one at a time")
  d:set("release", true)
  T.eq(a:wait(10), true)
  T.eq(b:wait(10), true)
  T.eventually(function() return p:stats().completed.ok == 6 end, 10, "completed.ok")
end)

case("resize: bad sizes raise; a stopped pool answers nil, \"stopped\"", function()
  local p = newpool { max_workers = 2, min_workers = 2 }
  T.raises(function() p:resize(0) end, "max_workers must be a positive integer")
  T.raises(function() p:resize(10001) end, "at most 10000")
  T.raises(function() p:resize(1.5) end, "integer")
  T.raises(function() p:resize("x") end, "number expected")
  T.raises(function() p:resize(1) end, "must not be below min_workers")
  T.eq(p:size(), 2)
  p:stop()
  local r, err, code = p:resize(3)
  T.eq(r, nil)
  T.eq(err, "stopped")
  T.eq(code, "ESTOPPED")
end)

-- ---- stats ----------------------------------------------------------------

local function check_hist(h, n, what)
  T.eq(h.count, n, what .. ".count")
  T.eq(#h.buckets, 15, what .. " has 15 buckets")
  local prev = 0
  for k, c in ipairs(h.buckets) do
    T.ok(c >= prev, string.format("%s bucket %d is cumulative", what, k))
    prev = c
  end
  T.eq(h.buckets[#h.buckets], h.count, what .. ": the last bucket is the count")
  T.eq(math.type(h.sum), "float", what .. ".sum")
end

case("stats: every field, counters by result and reason, histograms", function()
  local d, dn = newdict("stats")
  local p = newpool { max_workers = 1 }
  local s = p:stats()
  for _, k in ipairs { "submitted", "queued", "queued_bytes", "running", "workers",
    "stuck", "stuck_total", "max_workers", "memory", "memory_limit_hits" } do
    T.eq(math.type(s[k]), "integer", k)
  end
  for _, k in ipairs { "ok", "error", "timeout", "cancelled" } do
    T.eq(s.completed[k], 0, "completed." .. k)
  end
  for _, k in ipairs { "full", "stopped", "discarded", "policy" } do
    T.eq(s.dropped[k], 0, "dropped." .. k)
  end
  check_hist(s.duration, 0, "duration")
  check_hist(s.dwell, 0, "dwell")
  T.ok(s.memory > 0, "the first state is counted")
  T.eq(s.max_workers, 1)

  for _ = 1, 5 do T.eq(p:submit(worker_id):wait(10), true) end
  T.eq(p:submit(function() require("workerpool").sleep(0.1) end):wait(10), true)
  for _ = 1, 2 do T.eq(p:submit(function() error("boom") end):wait(10), false) end
  T.eq(select(2, p:submit({ fn = spin, timeout = 0.2 }):wait(20)), "timeout")
  local b = p:submit(blocker, dn)
  wait_count(d, "started", 1)
  local q = p:submit(worker_id)
  T.eq(q:cancel(), true)
  s = p:stats()
  T.eq(s.running, 1)
  T.eq(s.workers, 1)
  T.eq(s.queued, 0)
  d:set("release", true)
  T.eq(b:wait(10), true)
  -- counters follow the futures: wait for the last task's to land
  T.eventually(function()
    local st = p:stats()
    return st.completed.ok == 7 and st.duration.count == 10 and st.running == 0
  end, 10, "completed.ok")
  s = p:stats()
  T.eq(s.submitted, 11)
  T.eq(s.completed.error, 2)
  T.eq(s.completed.timeout, 1)
  T.eq(s.completed.cancelled, 1, "cancelled from the queue")
  T.eq(s.running, 0)
  -- histograms: every task that ran (10), not the one cancelled in the queue
  check_hist(s.duration, 10, "duration")
  check_hist(s.dwell, 10, "dwell")
  T.ok(s.duration.sum >= 0.3, "sum covers the sleep and the timeout")
  -- le = 0.064 s (bucket 7) cannot hold the 0.1 s sleep nor the timeout
  T.ok(s.duration.buckets[7] <= 8, "long tasks are in later buckets")
  -- dropped by reason
  p:pause()
  p:submit(worker_id)
  p:submit(worker_id)
  T.eq(p:stop(), 2)
  local f, err = p:submit(worker_id)
  T.eq(f, nil)
  T.eq(err, "stopped")
  s = p:stats()
  T.eq(s.dropped.discarded, 2)
  T.eq(s.dropped.stopped, 1)
  T.eq(s.dropped.full, 0)
  T.eq(s.dropped.policy, 0)
  T.eq(s.submitted, 13)
  T.eq(s.workers, 0)
end)

-- ---- metrics --------------------------------------------------------------

local function promtool(text)
  local path = os.tmpname()
  local fh = assert(io.open(path, "wb"))
  fh:write(text)
  fh:close()
  local ok, out = sh("promtool check metrics < " .. path)
  os.remove(path)
  return ok, out
end

local esc = require("workerpool.util").label

case("metrics: names, pool labels, values, and promtool accepts the text",
function()
  local p = newpool { max_workers = 2, name = "guards-metrics" }
  for _ = 1, 3 do T.eq(p:submit(worker_id):wait(10), true) end
  T.eq(p:submit(function() error("x") end):wait(10), false)
  T.eventually(function()
    local s = p:stats()
    return s.completed.error == 1 and s.completed.ok == 3 and s.duration.count == 4
  end, 10, "counted")
  local m = workerpool.metrics()
  local lbl = 'pool="guards-metrics"'
  for _, line in ipairs {
    "workerpool_submitted_total{" .. lbl .. "} 4",
    "workerpool_completed_total{" .. lbl .. ',result="ok"} 3',
    "workerpool_completed_total{" .. lbl .. ',result="error"} 1',
    "workerpool_completed_total{" .. lbl .. ',result="timeout"} 0',
    "workerpool_completed_total{" .. lbl .. ',result="cancelled"} 0',
    "workerpool_dropped_total{" .. lbl .. ',reason="full"} 0',
    "workerpool_dropped_total{" .. lbl .. ',reason="stopped"} 0',
    "workerpool_dropped_total{" .. lbl .. ',reason="discarded"} 0',
    "workerpool_dropped_total{" .. lbl .. ',reason="policy"} 0',
    "workerpool_memory_limit_hits_total{" .. lbl .. "} 0",
    "workerpool_stuck_workers_total{" .. lbl .. "} 0",
    "workerpool_queue_depth{" .. lbl .. "} 0",
    "workerpool_queued_bytes{" .. lbl .. "} 0",
    "workerpool_running_tasks{" .. lbl .. "} 0",
    "workerpool_stuck_workers{" .. lbl .. "} 0",
    "workerpool_max_workers{" .. lbl .. "} 2",
    "workerpool_task_duration_seconds_bucket{" .. lbl .. ',le="+Inf"} 4',
    "workerpool_task_duration_seconds_count{" .. lbl .. "} 4",
    "workerpool_queue_dwell_seconds_bucket{" .. lbl .. ',le="+Inf"} 4',
    "workerpool_queue_dwell_seconds_count{" .. lbl .. "} 4",
  } do
    T.ok(m:find("\n" .. line .. "\n", 1, true), "metrics has: " .. line)
  end
  for _, fam in ipairs {
    "workerpool_workers{", "workerpool_worker_memory_bytes{",
    "workerpool_task_duration_seconds_bucket{" .. lbl .. ',le="0.001"}',
    "workerpool_task_duration_seconds_bucket{" .. lbl .. ',le="8.192"}',
    "workerpool_task_duration_seconds_sum{",
    "workerpool_queue_dwell_seconds_sum{",
    "# TYPE workerpool_task_duration_seconds histogram",
    "# TYPE workerpool_submitted_total counter",
    "# TYPE workerpool_queue_depth gauge",
  } do
    T.ok(m:find(fam, 1, true), "metrics has: " .. fam)
  end
  if CAN_SPAWN then
    local ok, out = promtool(m)
    T.ok(ok, "promtool check metrics: " .. out)
  else
    skip("promtool check metrics")
  end
  -- a stopped pool leaves the exposition, except for workerpool_pool_stopped
  T.ok(workerpool.metrics():find("workerpool_pool_stopped{" .. lbl .. "} 0", 1, true),
    "a running pool is not stopped")
  p:stop()
  local stopped_line = "workerpool_pool_stopped{" .. lbl:gsub("%p", "%%%0") .. "} 1\n"
  local rest = workerpool.metrics():gsub(stopped_line, "")
  T.eq(rest:find(lbl, 1, true), nil, "a stopped pool is not listed")
  T.ok(workerpool.metrics():find("workerpool_pool_stopped{" .. lbl .. "} 1", 1, true),
    "workerpool_pool_stopped is 1 once it stopped")
end)

case("metrics: pool names with quotes, backslashes and newlines are escaped",
function()
  local names = { 'a"b', "c\\d", "e\nf", '\\"\n' }
  for _, n in ipairs(names) do
    local p = newpool { max_workers = 1, name = n }
    T.eq(p:submit(worker_id):wait(10), true)
  end
  local m = workerpool.metrics()
  for _, n in ipairs(names) do
    local line = "workerpool_submitted_total{pool=\"" .. esc(n) .. "\"} 1\n"
    T.ok(m:find(line, 1, true), "escaped: " .. line)
  end
  if not CAN_SPAWN then return skip("promtool check metrics") end
  local ok, out = promtool(m)
  T.ok(ok, "promtool check metrics: " .. out)
end)

-- ---- logs -----------------------------------------------------------------

case("logs: set_log_level and workerpool.log check their arguments", function()
  for _, bad in ipairs { "verbose", "INFO", "", "warning" } do
    T.raises(function() workerpool.set_log_level(bad) end,
      "level must be debug, info, warn, error or off", bad)
  end
  T.raises(function() workerpool.set_log_level() end, "string expected")
  T.raises(function() workerpool.set_log_level({}) end, "string expected")
  T.raises(function() workerpool.log("off", "m") end,
    "level must be debug, info, warn or error")
  T.raises(function() workerpool.log("trace", "m") end,
    "level must be debug, info, warn or error")
  T.raises(function() workerpool.log("info") end, "value expected")
  T.raises(function() workerpool.log("info", "m", 3) end, "table expected")
  T.raises(function() workerpool.log(nil, "m") end, "string expected")
  -- logging is off in plain lua5.4: these are accepted and print nothing
  workerpool.log("info", "hello", { a = 1, nested = { b = true } })
  workerpool.log("error", "no fields")
  workerpool.set_log_level("off")
  -- and from a worker state
  local p = newpool { max_workers = 1 }
  local ok, err = p:submit(function()
    local W = require "workerpool"
    W.log("warn", "from a worker", { id = W.worker_id() })
    return pcall(W.log, "nope", "x")
  end):wait(10)
  T.eq(ok, true)
  T.eq(err, false, "invalid level raises in a worker too")
end)

case("logs: in plain lua5.4, set_log_level('info') writes JSON events to stderr",
function()
  if not CAN_SPAWN then return skip("the child process") end
  local logf = os.tmpname()
  local ok, out = child([[
    local W = require "workerpool"
    W.set_log_level("info")
    local p = W.new { max_workers = 1, name = "logged", slow_task = 0.05 }
    p:submit({ fn = function() error("kaput") end, name = "bad" }):wait()
    p:submit({ fn = function() while true do BODY end end, name = "spin", timeout = 0.1 }):wait()
    p:submit({ fn = function() require("workerpool").sleep(0.3) end, name = "slow" }):wait()
    W.log("info", "hello", { k = "v" })
    W.sleep(0.1)
    p:stop()
  ]], logf)
  T.ok(ok, "child ran: " .. out)
  local check = [[
import json, sys
seen = {}
for line in open(sys.argv[1]):
    o = json.loads(line)
    for k in ("ts", "level", "event"):
        assert k in o, (k, o)
    seen.setdefault(o["event"], []).append(o)
def one(ev, **kw):
    for o in seen.get(ev, []):
        if all(o.get(k) == v for k, v in kw.items()):
            return o
    sys.exit("missing %s %r in %r" % (ev, kw, seen))
one("pool.created", pool="logged", max_workers=1, level="info")
e = one("task.error", pool="logged", task="bad", level="error")
assert "kaput" in e["error"] and "traceback" in e["error"], e
one("task.timeout", pool="logged", task="spin", level="warn")
one("task.slow", pool="logged", task="slow", level="warn")
one("log", msg="hello", k="v", level="info")
one("pool.stopped", pool="logged", dropped=0)
]]
  local py = os.tmpname()
  local fh = assert(io.open(py, "w"))
  fh:write(check)
  fh:close()
  local ok2, out2 = sh(string.format("python3 %s %s", py, logf))
  os.remove(logf)
  os.remove(py)
  T.ok(ok2, "log lines: " .. out2)
end)

-- ---- option checking ------------------------------------------------------

case("options: every guard option refuses wrong types and values", function()
  local nan = 0 / 0
  local bad = {
    queue_cap = { "1", -1, 0, nan, math.huge, 1.5, true },
    memory_limit = { "1", -1, 0, nan, math.huge, 1.5, {} },
    max_tasks_per_worker = { "1", -1, 0, nan, math.huge, 1.5, 2 ^ 31 },
    task_timeout = { "1", -1, 0, nan, math.huge, -math.huge },
    slow_task = { "1", -1, 0, nan, math.huge },
    drop_log_interval = { "1", -1, 0, nan, math.huge },
    stuck_grace = { "1", -1, nan, math.huge },
    submit_timeout = { "1", -1, nan, math.huge },
  }
  local msg = {
    queue_cap = "queue_cap must be a positive integer",
    memory_limit = "memory_limit must be a positive integer (bytes)",
    max_tasks_per_worker = "max_tasks_per_worker must be a positive integer",
    task_timeout = "task_timeout must be a positive number of seconds",
    slow_task = "slow_task must be a positive number of seconds",
    drop_log_interval = "drop_log_interval must be a positive number of seconds",
    stuck_grace = "stuck_grace must be a non-negative number of seconds",
    submit_timeout = "submit_timeout must be a non-negative number of seconds",
  }
  for k, values in pairs(bad) do
    for _, v in ipairs(values) do
      local opts = { max_workers = 1, [k] = v }
      local err = T.raises(function() workerpool.new(opts) end, "workerpool.new: " .. msg[k],
        k .. " = " .. tostring(v))
      T.eq(err:find("(at most 0)", 1, true), nil, "no nonsense bound: " .. err)
    end
  end
  -- accepted edge values
  for _, opts in ipairs {
    { stuck_grace = 0 }, { submit_timeout = 0, queue_cap = 1, on_full = "block" },
    { task_timeout = 1e-3 }, { task_timeout = 1e12 }, { slow_task = 1e12 },
    { queue_cap = 1 }, { memory_limit = 16 * 1024 * 1024 },
    { max_tasks_per_worker = 1 }, { drop_log_interval = 0.5 },
    { queue_cap = 3, on_full = "reject" },
  } do
    opts.max_workers = 1
    local p = workerpool.new(opts)
    p:stop()
  end
end)

-- Engine bug (see the report): the upper bound in these messages is
-- printed through an int cast, so it reads "(at most 0)".
case("options: too large a queue_cap or memory_limit names the real bound",
function()
  T.raises(function() workerpool.new { max_workers = 1, queue_cap = 1 << 41 } end,
    "queue_cap must be a positive integer (at most 1099511627776)")
  T.raises(function() workerpool.new { max_workers = 1, memory_limit = 1 << 49 } end,
    "memory_limit must be a positive integer (bytes) (at most 281474976710656)")
end)

case("options: on_full needs a queue_cap and one of two words", function()
  T.raises(function() workerpool.new { max_workers = 1, on_full = "block" } end,
    "workerpool.new: on_full needs a queue_cap")
  T.raises(function() workerpool.new { max_workers = 1, on_full = "reject" } end,
    "workerpool.new: on_full needs a queue_cap")
  for _, v in ipairs { "drop", "BLOCK", 1, true } do
    T.raises(function() workerpool.new { max_workers = 1, queue_cap = 1, on_full = v } end,
      'workerpool.new: on_full must be "reject" or "block"', tostring(v))
  end
  T.raises(function() workerpool.new { max_workers = 1, queue_cap = 1, bogus = 1 } end,
    "workerpool.new: unknown option 'bogus'")
end)

case("options: task descriptors are checked", function()
  local p = newpool { max_workers = 1 }
  local function f() return 1 end
  local cases = {
    { {}, "a task descriptor needs fn or handler" },
    { { name = "x" }, "a task descriptor needs fn or handler" },
    { { fn = f, handler = "h" }, "a task descriptor needs fn or handler" },
    { { fn = print }, "fn must be a Lua function" },
    { { fn = "f" }, "fn must be a Lua function" },
    { { handler = 1 }, "handler must be a string" },
    { { fn = f, bogus = 1 }, "unknown task field 'bogus'" },
    { { fn = f, [1] = 2 }, "unknown task field '1'" },
    { { fn = f, name = 1 }, "name must be a string" },
    { { fn = f, tenant = {} }, "tenant must be a string" },
    { { fn = f, timeout = 0 }, "timeout must be a positive number of seconds" },
    { { fn = f, timeout = -1 }, "timeout must be a positive number of seconds" },
    { { fn = f, timeout = 0 / 0 }, "timeout must be a positive number of seconds" },
    { { fn = f, timeout = -math.huge }, "timeout must be a positive number of seconds" },
    { { fn = f, timeout = "1" }, "timeout must be a positive number of seconds" },
  }
  for i, c in ipairs(cases) do
    T.raises(function() p:submit(c[1]) end, "bad argument #1 to 'submit' (" .. c[2],
      "submit case " .. i)
    T.raises(function() p:submit_wait(c[1]) end, "bad argument #1 to 'submit_wait' (" .. c[2],
      "submit_wait case " .. i)
  end
  T.eq(p:stats().submitted, 0, "nothing was queued")
  -- valid descriptors, with arguments after them
  local ok, r = p:submit({ fn = function(a, b) return a + b end, name = "add",
    tenant = "t1", timeout = 5 }, 2, 3):wait(10)
  T.eq(ok, true)
  T.eq(r, 5)
  T.eq(p:submit_wait({ fn = function(a) return a * 2 end, timeout = math.huge }, 21), 42)
end)

T.run()
