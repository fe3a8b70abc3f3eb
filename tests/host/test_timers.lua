-- test_timers.lua: timers under `wpool run` (after, every, cancel) and the
-- loop's liveness while work is in flight: a timer keeps firing on
-- schedule while 1,000 submit_wait calls run in 100 coroutines, and while
-- a coroutine waits in stop_wait(deadline) or pause, which must not block
-- the loop either.
--
-- Liveness is measured, not assumed: a ticker records when it fired, and
-- the largest gap between consecutive ticks (counting the start and the
-- end of the measured window) must stay under a generous bound.

local T = require "harness"
local wp = require "workerpool"

-- Loop stalls longer than this fail a test; tasks take a few ms and the
-- ticker asks for 10 ms, so only a blocked loop comes near it.
local MAX_GAP = 1.0 * T.time_scale

-- Starts a ticker every 10 ms.  ticker.stop() cancels it and returns the
-- number of ticks and the largest gap between ticks, counting from the
-- start and up to the stop.
local function ticker(on_tick)
  local times = {}
  local t0 = wp.now()
  local t = wp.every(0.01, function()
    times[#times + 1] = wp.now()
    if on_tick then on_tick() end
  end)
  local self = { times = times }
  function self.stop()
    local t1 = wp.now()
    T.eq(t:cancel(), true, "the ticker was still active")
    local gap, prev = 0, t0
    for _, at in ipairs(times) do
      gap = math.max(gap, at - prev)
      prev = at
    end
    gap = math.max(gap, t1 - prev)
    return #times, gap, t1 - t0
  end
  return self
end

local function check_live(n, gap, elapsed, what)
  T.ok(n > 0, what .. ": the ticker fired")
  T.ok(gap < MAX_GAP, string.format(
    "%s: the loop was blocked for %.3f s (%d ticks in %.3f s)", what, gap, n,
    elapsed))
end

local newdict = T.dict_maker("host.timers")

local gate = T.gate

-- ---- after, every, cancel -----------------------------------------------

T.test("after fires once, later", function()
  local fired, at = 0, nil
  local t0 = wp.now()
  local t = wp.after(0.05, function()
    fired = fired + 1
    at = wp.now()
  end)
  T.eq(t:active(), true)
  T.eq(fired, 0, "not at once")
  T.eventually(function() return fired > 0 end, 10, "after fired")
  T.ok(at - t0 >= 0.04, string.format("fired after %.3f s", at - t0))
  wp.sleep(0.1)
  T.eq(fired, 1, "only once")
  T.eq(t:active(), false)
  T.eq(t:cancel(), false, "cancel after it fired")
  -- after(0) fires on a later iteration, not inside the call.
  local zero = 0
  wp.after(0, function() zero = zero + 1 end)
  T.eq(zero, 0)
  T.eventually(function() return zero == 1 end, 10, "after(0) fired")
end)

T.test("every repeats until cancel, which returns true then false", function()
  local n = 0
  local t = wp.every(0.01, function() n = n + 1 end)
  T.eq(t:active(), true)
  T.eventually(function() return n >= 5 end, 10, "five ticks")
  T.eq(t:cancel(), true)
  T.eq(t:active(), false)
  T.eq(t:cancel(), false, "the second cancel")
  local stopped_at = n
  wp.sleep(0.1)
  T.eq(n, stopped_at, "no tick after cancel")
end)

T.test("cancel before the first firing: the callback never runs", function()
  local n = 0
  local a = wp.after(0.03, function() n = n + 1 end)
  local e = wp.every(0.03, function() n = n + 1 end)
  T.eq(a:cancel(), true)
  T.eq(e:cancel(), true)
  wp.sleep(0.15)
  T.eq(n, 0)
end)

T.test("a timer can cancel itself from its callback", function()
  local n, results = 0, {}
  local t
  t = wp.every(0.01, function()
    n = n + 1
    if n == 3 then
      results[#results + 1] = t:cancel()
      results[#results + 1] = t:cancel()
    end
  end)
  T.eventually(function() return #results == 2 end, 10, "third tick")
  T.eq(results[1], true)
  T.eq(results[2], false)
  wp.sleep(0.1)
  T.eq(n, 3, "no tick after the cancel")
end)

T.test("timer callbacks are host coroutines: they can wait", function()
  local pool = wp.new { max_workers = 1 }
  local got
  wp.after(0, function()
    local v = pool:submit_wait(function(x) return x * 2 end, 21)
    wp.sleep(0.01)
    got = v
  end)
  T.eventually(function() return got ~= nil end, 10, "the callback finished")
  T.eq(got, 42)
  T.eq(pool:stop_wait(), 0)
end)

T.test("a timer whose handle was dropped still fires", function()
  local fired = false
  do
    wp.after(0.02, function() fired = true end)
  end
  collectgarbage()
  collectgarbage()
  T.eventually(function() return fired end, 10, "the timer fired")
end)

T.test("timer argument checks", function()
  local fn = function() end
  T.raises(function() wp.every(0, fn) end, "interval must be a positive")
  T.raises(function() wp.every(-1, fn) end, "interval must be a positive")
  T.raises(function() wp.after(-0.5, fn) end, "delay must be a non-negative")
  T.raises(function() wp.after("soon", fn) end, "bad argument #1 to 'after'")
  T.raises(function() wp.every(0.1) end, "bad argument #2 to 'every'")
  T.raises(function() wp.after(0.1, 5) end, "bad argument #2 to 'after'")
end)

-- The time a timer waits counts from the call, even when the loop has not
-- woken up for a while (the script ran synchronously since): libuv's
-- cached loop time must not make sleep, after or a wait's timeout end
-- early.
T.test("sleep, after and f:wait(timeout) count from the call, not from a stale loop time",
  function()
    local function busy(s)
      local t = wp.now()
      while wp.now() - t < s do end
    end
    busy(0.2)
    local t0 = wp.now()
    wp.sleep(0.1)
    local slept = wp.now() - t0
    busy(0.2)
    t0 = wp.now()
    local fired
    wp.after(0.1, function() fired = wp.now() - t0 end)
    T.eventually(function() return fired end, 10, "after fired")
    local pool = wp.new { max_workers = 1 }
    local f = pool:submit(function() require("workerpool").sleep(0.5) end)
    busy(0.2)
    t0 = wp.now()
    local r, err = f:wait(0.1)
    local waited = wp.now() - t0
    T.eq(r, nil)
    T.eq(err, "timeout")
    T.ok(slept >= 0.09, string.format("sleep(0.1) returned after %.3f s", slept))
    T.ok(fired >= 0.09, string.format("after(0.1) fired after %.3f s", fired))
    T.ok(waited >= 0.09, string.format("f:wait(0.1) timed out after %.3f s", waited))
    T.eq(pool:stop_wait(), 0)
  end)

-- sleep(0) is a wait for the next loop iteration: a coroutine polling with
-- it must let the loop go on (other timers fire), also when it is resumed
-- from a timer callback itself.
T.test("a coroutine polling with sleep(0) lets timers fire", function()
  local t0, fired = wp.now(), false
  wp.after(0.05, function() fired = true end)
  local polls = 0
  while not fired and wp.now() - t0 < 1 do
    polls = polls + 1
    wp.sleep(0)
  end
  T.ok(fired, string.format(
    "after(0.05) fired while a coroutine polled with sleep(0) (%d polls in %.3f s)",
    polls, wp.now() - t0))
end)

-- ---- liveness under load ------------------------------------------------

T.test("a timer keeps firing while 1,000 submit_wait calls run in 100 coroutines",
  function()
    local pool = wp.new { max_workers = 8 }
    local inflight, most_seen = 0, 0
    local tk = ticker(function()
      if inflight > most_seen then most_seen = inflight end
    end)
    local handles = {}
    for id = 1, 100 do
      handles[id] = wp.spawn(function()
        for i = 1, 10 do
          inflight = inflight + 1
          local a, b = pool:submit_wait(function(x, y)
            require("workerpool").sleep(0.003)
            return x, y
          end, id, i)
          inflight = inflight - 1
          if a ~= id or b ~= i then
            error(string.format("coroutine %d got %s/%s for call %d", id,
              tostring(a), tostring(b), i))
          end
        end
        return "done"
      end)
    end
    T.eq(inflight, 100, "all 100 coroutines wait in submit_wait at once")
    for id = 1, 100 do
      local ok, v = handles[id]:join()
      T.eq(ok, true, "coroutine " .. id .. ": " .. tostring(v))
      T.eq(v, "done")
    end
    T.eq(inflight, 0)
    local n, gap, elapsed = tk.stop()
    check_live(n, gap, elapsed, "1,000 submit_wait")
    T.ok(n >= 3, string.format("%d ticks in %.3f s", n, elapsed))
    T.ok(most_seen >= 50, "a tick saw many calls in flight: " .. most_seen)
    T.eq(pool:stop_wait(), 0)
  end)

T.test("stop_wait(deadline) in a coroutine: the loop ticks, late tasks are stopped",
  function()
    local pool = wp.new { max_workers = 1 }
    local futs = {}
    for i = 1, 5 do
      futs[i] = pool:submit(function(k)
        require("workerpool").sleep(0.5)
        return k
      end, i)
    end
    local tk = ticker()
    local t0 = wp.now()
    local discarded, interrupted = pool:stop_wait(0.2)
    local took = wp.now() - t0
    local n, gap, elapsed = tk.stop()
    check_live(n, gap, elapsed, "stop_wait(0.2)")
    T.ok(n >= 3, string.format("%d ticks during stop_wait", n))
    T.eq(math.type(discarded), "integer")
    T.ok(discarded >= 1 and discarded <= 4, "discarded " .. discarded)
    T.ok(took >= 0.15, string.format("the deadline was kept: %.3f s", took))
    T.ok(took < 10 * T.time_scale,
      string.format("stop_wait returned after %.3f s", took))
    local statuses = {}
    for _, f in ipairs(futs) do
      local st = f:status()
      statuses[st] = (statuses[st] or 0) + 1
    end
    T.eq(statuses.discarded, discarded, "the count matches the discarded futures")
    T.eq(interrupted, 1, "the running task was interrupted")
    T.eq(statuses.cancelled, 1, "and ended cancelled")
    T.eq(statuses.ok or 0, 4 - discarded, "the others ran")
    T.eq(pool:stopped(), true)
    local r, err = pool:submit(function() end)
    T.eq(r, nil)
    T.eq(err, "stopped")
    T.eq(select(2, futs[5]:wait()), "discarded")
  end)

T.test("stop_wait() in a coroutine runs everything while the loop ticks", function()
  local pool = wp.new { max_workers = 2 }
  local futs = {}
  for i = 1, 10 do
    futs[i] = pool:submit(function(k)
      require("workerpool").sleep(0.02)
      return k
    end, i)
  end
  local tk = ticker()
  T.eq(pool:stop_wait(), 0)
  local n, gap, elapsed = tk.stop()
  check_live(n, gap, elapsed, "stop_wait()")
  for i, f in ipairs(futs) do T.eq(select(2, f:wait(0)), i) end
end)

T.test("pause in a coroutine does not block the loop", function()
  local d, dn = newdict()
  local pool = wp.new { max_workers = 1 }
  local running = pool:submit(gate, dn, "open", "ran")
  T.eventually(function() return pool:running() == 1 end, 10, "task started")
  local tk = ticker()
  local pauser = wp.spawn(function()
    pool:pause()
    return "paused"
  end)
  T.eq(pauser:status(), "running", "pause waits for the running task")
  wp.sleep(0.2)
  T.eq(pauser:status(), "running")
  T.ok(#tk.times >= 3, "ticks while pause waits: " .. #tk.times)
  d:set("open", true)
  local ok, v = pauser:join()
  T.eq(ok, true)
  T.eq(v, "paused")
  local n, gap, elapsed = tk.stop()
  check_live(n, gap, elapsed, "pause")
  T.eq(select(2, running:wait(0)), "ran")
  -- While paused, nothing starts; resume lets it run.
  local f = pool:submit(function() return "after resume" end)
  local r, err = f:wait(0.1)
  T.eq(r, nil)
  T.eq(err, "timeout")
  pool:resume()
  T.eq(select(2, f:wait(10)), "after resume")
  T.eq(pool:stop_wait(), 0)
end)

T.test("stop in a coroutine returns the number discarded", function()
  local d, dn = newdict()
  local pool = wp.new { max_workers = 1 }
  pool:submit(gate, dn, "open")
  local queued = {}
  for i = 1, 3 do queued[i] = pool:submit(function() end) end
  T.eventually(function() return pool:running() == 1 end, 10, "task started")
  local stopper = wp.spawn(function() return pool:stop() end)
  T.eventually(function() return queued[3]:done() end, 10,
    "stop discarded the queue")
  T.eq(stopper:status(), "running", "stop waits for the running task")
  d:set("open", true)
  local ok, n = stopper:join()
  T.eq(ok, true)
  T.eq(n, 3)
  for i = 1, 3 do T.eq(queued[i]:status(), "discarded") end
end)

T.run_host()
