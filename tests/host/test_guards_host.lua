-- test_guards_host.lua (run by `wpool run`): the bounded queue's blocking
-- submit inside host coroutines.  With on_full = "block", a submit that
-- finds the queue full suspends only its own coroutine: timers keep
-- ticking and other coroutines keep running, and the submit succeeds once
-- room appears (or gives up after submit_timeout, or sees the pool stop).

-- The harness lives in tests/lua; find it from this script's path too.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = dir .. "/../lua/?.lua;" .. package.path

local T = require "harness"
local workerpool = require "workerpool"

local cleanup = { dicts = {}, pools = {}, timers = {} }

local function case(name, fn)
  T.test(name, function()
    cleanup = { dicts = {}, pools = {}, timers = {} }
    local ok, err = xpcall(fn, debug.traceback)
    for _, t in ipairs(cleanup.timers) do t:cancel() end
    for _, d in ipairs(cleanup.dicts) do d:set("release", true) end
    for _, p in ipairs(cleanup.pools) do pcall(p.stop, p) end
    if not ok then error(err, 0) end
  end)
end

local n = 0
local function newdict()
  n = n + 1
  local name = "test_guards_host." .. n
  local d = workerpool.shared(name)
  cleanup.dicts[#cleanup.dicts + 1] = d
  return d, name
end

local function newpool(opts)
  local p = workerpool.new(opts)
  cleanup.pools[#cleanup.pools + 1] = p
  return p
end

-- A timer counting its ticks in t.n.
local function ticker()
  local t = { n = 0 }
  t.timer = workerpool.every(0.01, function() t.n = t.n + 1 end)
  cleanup.timers[#cleanup.timers + 1] = t.timer
  return t
end

-- A task: counts itself in `started` and blocks until `release` is set.
local function blocker(dname)
  local W = require "workerpool"
  local d = W.shared(dname)
  d:incr("started", 1, 0)
  local deadline = W.now() + 30
  while d:get("release") == nil do
    if W.now() > deadline then error("blocker was never released") end
    W.sleep(0.001)
  end
  return W.worker_id()
end

-- Fills a pool of one worker and queue_cap 1: one task running, one queued.
local function fill(p, d, dn)
  local a = p:submit(blocker, dn)
  T.eventually(function() return (d:get("started") or 0) >= 1 end, 10, "running")
  local b = p:submit(blocker, dn)
  T.ok(a and b, "two tasks fit")
  return a, b
end

case("a blocking submit in a coroutine does not stall a timer, and succeeds "
  .. "once room appears", function()
  local d, dn = newdict()
  local p = newpool { max_workers = 1, queue_cap = 1, on_full = "block",
    submit_timeout = 20 }
  local a, b = fill(p, d, dn)
  local tick = ticker()
  local state = "waiting"
  local h = workerpool.spawn(function()
    local f, err = p:submit(blocker, dn)
    state = f and "submitted" or ("failed: " .. tostring(err))
    return f
  end)
  -- the spawned coroutine is parked in submit; the loop goes on
  local before = tick.n
  workerpool.sleep(0.3)
  T.eq(state, "waiting", "the submit is still waiting for room")
  T.eq(h:status(), "running")
  T.ok(tick.n - before >= 5, "the timer kept ticking (" .. (tick.n - before) .. ")")
  -- room appears
  d:set("release", true)
  local ok, f = h:join()
  T.eq(ok, true)
  T.eq(state, "submitted")
  T.ok(f, "submit returned a future")
  for _, g in ipairs { a, b, f } do T.eq(g:wait(10), true) end
  T.ok(tick.timer:active(), "the timer is still active")
end)

case("a blocking submit in a coroutine gives up after submit_timeout; the "
  .. "timer keeps ticking", function()
  local d, dn = newdict()
  local p = newpool { max_workers = 1, queue_cap = 1, on_full = "block",
    submit_timeout = 0.5 }
  fill(p, d, dn)
  local tick = ticker()
  local before = tick.n
  local t0 = workerpool.now()
  local f, err, code = p:submit(blocker, dn) -- the main coroutine parks
  local took = workerpool.now() - t0
  T.eq(f, nil)
  T.eq(err, "full")
  T.eq(code, "EFULL")
  T.ok(took >= 0.4 and took < 10, "about submit_timeout (" .. took .. " s)")
  T.ok(tick.n - before >= 10, "the timer ticked meanwhile (" .. (tick.n - before) .. ")")
end)

case("several coroutines wait for room; each gets in as room appears", function()
  local d, dn = newdict()
  local p = newpool { max_workers = 1, queue_cap = 1, on_full = "block",
    submit_timeout = 20 }
  local first = { fill(p, d, dn) }
  local tick = ticker()
  local hs = {}
  for i = 1, 3 do
    hs[i] = workerpool.spawn(function()
      return p:submit(function(x) return x end, i)
    end)
  end
  workerpool.sleep(0.2)
  for i = 1, 3 do T.eq(hs[i]:status(), "running", "coroutine " .. i .. " waits") end
  local before = tick.n
  d:set("release", true)
  for i = 1, 3 do
    local ok, f = hs[i]:join()
    T.eq(ok, true)
    local ok2, v = f:wait(10)
    T.eq(ok2, true)
    T.eq(v, i)
  end
  for _, g in ipairs(first) do T.eq(g:wait(10), true) end
  T.ok(tick.n >= before, "timer alive")
  T.eq(p:stats().submitted, 5)
end)

case("a coroutine waiting for room sees the pool stop", function()
  local d, dn = newdict()
  local p = newpool { max_workers = 1, queue_cap = 1, on_full = "block" }
  fill(p, d, dn)
  local h = workerpool.spawn(function() return p:submit(blocker, dn) end)
  workerpool.sleep(0.1)
  T.eq(h:status(), "running")
  -- Stop while the queue is still full (the blocker runs on), so no room
  -- can appear before the stop: the waiting coroutine must see "stopped".
  local s = workerpool.spawn(function() return p:stop() end)
  local ok, f, err, code = h:join()
  T.eq(ok, true)
  T.eq(f, nil)
  T.eq(err, "stopped")
  T.eq(code, "ESTOPPED")
  d:set("release", true) -- lets the stop join the blocker's worker
  T.eq(select(2, s:join()), 1, "stop discarded the queued task")
end)

-- A host coroutine waiting for room retries every 5 ms; the retries are
-- not drops.  A wait that succeeds counts no drop, one that gives up
-- exactly one, as in plain Lua.  (Each retry used to count, so one submit
-- that waited 0.3 s read as ~60 drops.)
case("dropped.full counts rejections, not the retries of a waiting coroutine",
function()
  local d, dn = newdict()
  local p = newpool { max_workers = 1, queue_cap = 1, on_full = "block",
    submit_timeout = 0.3 }
  fill(p, d, dn)
  local f, err = p:submit(blocker, dn) -- waits 0.3 s, then gives up
  T.eq(f, nil)
  T.eq(err, "full")
  T.eq(p:stats().dropped.full, 1, "one submit gave up: one drop")
  local q = newpool { max_workers = 1, queue_cap = 1, on_full = "block",
    submit_timeout = 20 }
  local d2, dn2 = newdict()
  fill(q, d2, dn2)
  workerpool.after(0.3, function() d2:set("release", true) end)
  T.ok(q:submit(blocker, dn2), "got in once room appeared")
  T.eq(q:stats().dropped.full, 0, "a submit that got in is no drop")
end)

T.run_host()
