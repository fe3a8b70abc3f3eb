-- test_coroutines.lua: host coroutines under `wpool run`.  submit_wait,
-- f:wait, sleep and join suspend only the calling coroutine; spawn starts
-- one and returns a joinable handle; results reach the coroutine that asked
-- for them; a plain coroutine.yield() resumes on the next loop iteration;
-- an error in a spawned coroutine is its own and the loop goes on.
--
-- Every case runs in the main coroutine of the script, so every join and
-- wait below is also "from the main coroutine".  Nothing here depends on
-- the exact length of a sleep: bounds are generous for a loaded machine.

local T = require "harness"
local wp = require "workerpool"

-- ---- helpers ------------------------------------------------------------

local newdict = T.dict_maker("host.coroutines")

local gate = T.gate

local pack = T.pack

-- ---- spawn and join -----------------------------------------------------

T.test("spawn runs fn with its arguments; join gives true and results", function()
  local h = wp.spawn(function(a, b)
    wp.sleep(0.01)
    return a, nil, b, "x"
  end, 1, "two")
  T.eq(h:status(), "running", "spawn returned while the coroutine sleeps")
  local r = pack(h:join())
  T.eq(r.n, 5, "true and four results, a nil in the middle kept")
  T.eq(r[1], true)
  T.eq(r[2], 1)
  T.eq(r[3], nil)
  T.eq(r[4], "two")
  T.eq(r[5], "x")
  T.eq(h:status(), "done")
  -- Joining again gives the same outcome.
  r = pack(h:join())
  T.eq(r.n, 5, "a second join")
  T.eq(r[4], "two")
  -- A coroutine that never waits is done when spawn returns.
  local quick = wp.spawn(function(...) return select("#", ...) end)
  T.eq(quick:status(), "done")
  T.eq(select(2, quick:join()), 0)
end)

T.test("join of a failed coroutine gives false and the error with a traceback",
  function()
    local h = wp.spawn(function()
      wp.sleep(0.01)
      error("spawned failure")
    end)
    local ok, err = h:join()
    T.eq(ok, false)
    T.ok(err:find("spawned failure", 1, true), err)
    T.ok(err:find("stack traceback", 1, true), "a traceback: " .. err)
    T.eq(h:status(), "error")
    -- It fails before its first wait: the handle is already ended.
    local early = wp.spawn(function() error("at once") end)
    T.eq(early:status(), "error")
    ok, err = early:join()
    T.eq(ok, false)
    T.ok(err:find("at once", 1, true), err)
    -- An error value that is not a string is described.
    ok, err = wp.spawn(function() error({ code = 1 }) end):join()
    T.eq(ok, false)
    T.ok(err:find("error object is a table value", 1, true), err)
  end)

T.test("join from spawned coroutines; several joiners all wake", function()
  local target = wp.spawn(function()
    wp.sleep(0.05)
    return "target result"
  end)
  local joiners = {}
  for i = 1, 3 do
    joiners[i] = wp.spawn(function()
      local ok, v = target:join()
      return i, ok, v
    end)
  end
  for i = 1, 3 do
    T.eq(joiners[i]:status(), "running", "joiner " .. i .. " waits")
  end
  for i = 1, 3 do
    local ok, id, tok, v = joiners[i]:join()
    T.eq(ok, true)
    T.eq(id, i)
    T.eq(tok, true)
    T.eq(v, "target result")
  end
end)

T.test("join misuse: a coroutine joining itself, join outside a host coroutine",
  function()
    local h
    h = wp.spawn(function()
      wp.sleep(0) -- let spawn return and h be set
      return pcall(h.join, h)
    end)
    local ok, pok, err = h:join()
    T.eq(ok, true)
    T.eq(pok, false)
    T.ok(tostring(err):find("cannot join itself", 1, true), tostring(err))
    -- A plain coroutine inside a host coroutine cannot park.
    local sleeper = wp.spawn(function() wp.sleep(0.05) end)
    local pok2, err2 = coroutine.wrap(function()
      return pcall(sleeper.join, sleeper)
    end)()
    T.eq(pok2, false)
    T.ok(tostring(err2):find("host coroutine", 1, true), tostring(err2))
    T.eq(sleeper:join(), true)
    T.raises(function() wp.spawn() end, "bad argument #1 to 'spawn'")
    T.raises(function() wp.spawn(42) end, "bad argument #1 to 'spawn'")
  end)

-- ---- results reach the right coroutine ----------------------------------

T.test("100 coroutines: every submit_wait result comes back to its caller",
  function()
    local pool = wp.new { max_workers = 4 }
    local handles = {}
    for id = 1, 100 do
      handles[id] = wp.spawn(function(me)
        local self = coroutine.running()
        for i = 1, 10 do
          -- Varying task lengths make completions arrive out of order.
          local a, b, tag = pool:submit_wait(function(x, y, s)
            require("workerpool").sleep(s)
            return x, y, string.format("%d/%d", x, y)
          end, me, i, ((me * 7 + i * 13) % 5) * 0.001)
          if coroutine.running() ~= self then error("resumed as another coroutine") end
          if a ~= me or b ~= i or tag ~= me .. "/" .. i then
            error(string.format("coroutine %d, call %d got %s, %s, %s", me, i,
              tostring(a), tostring(b), tostring(tag)))
          end
        end
        return me
      end, id)
    end
    for id = 1, 100 do
      local ok, me = handles[id]:join()
      T.eq(ok, true, "coroutine " .. id .. ": " .. tostring(me))
      T.eq(me, id)
    end
    T.eq(pool:stop_wait(), 0)
  end)

T.test("f:wait in many coroutines: each gets its own future's results", function()
  local pool = wp.new { max_workers = 3 }
  local futs, handles = {}, {}
  for i = 1, 30 do
    futs[i] = pool:submit(function(v, s)
      require("workerpool").sleep(s)
      return v, -v
    end, i, (30 - i) % 4 * 0.002)
  end
  -- Waiters in reverse order, two per future.
  for i = 30, 1, -1 do
    for k = 1, 2 do
      handles[#handles + 1] = wp.spawn(function()
        local ok, a, b = futs[i]:wait()
        return i, k, ok, a, b
      end)
    end
  end
  for _, h in ipairs(handles) do
    local ok, i, k, fok, a, b = h:join()
    T.eq(ok, true)
    T.eq(fok, true, "future " .. i .. " waiter " .. k)
    T.eq(a, i)
    T.eq(b, -i)
  end
  T.eq(pool:stop_wait(), 0)
end)

T.test("pool:map in a coroutine suspends only that coroutine", function()
  local pool = wp.new { max_workers = 2 }
  local ticks = 0
  local ticker = wp.spawn(function()
    while ticks < 1000 do
      ticks = ticks + 1
      wp.sleep(0.001)
    end
  end)
  local h = wp.spawn(function()
    local list = {}
    for i = 1, 8 do list[i] = i end
    return pool:map(function(x)
      require("workerpool").sleep(0.05)
      return x * 10
    end, list, { chunk = 1 })
  end)
  local ok, r = h:join()
  T.eq(ok, true)
  T.eq(r[8], 80)
  T.ok(ticks >= 5, "the loop kept running while map waited (" .. ticks .. " ticks)")
  ticks = 1000
  ticker:join()
  T.eq(pool:stop_wait(), 0)
end)

-- ---- waits suspend only their coroutine ---------------------------------

T.test("<close> on a pool suspends only its coroutine, as stop_wait does", function()
  local ticks = 0
  local ticker = wp.every(0.01, function() ticks = ticks + 1 end)
  local h = wp.spawn(function()
    do
      local pool <close> = wp.new { max_workers = 1 }
      for _ = 1, 4 do
        pool:submit(function() require("workerpool").sleep(0.1) end)
      end
      ticks = 0
    end -- closing drains: about 0.4 s
    return ticks
  end)
  local ok, during = h:join()
  T.eq(ok, true)
  T.ok(during >= 5, "the loop kept running during the drain (" .. during .. " ticks)")
  ticker:cancel()
end)


T.test("f:wait(timeout) gives nil, 'timeout' and blocks nobody else", function()
  local d, dn = newdict()
  local pool = wp.new { max_workers = 1 }
  local f = pool:submit(gate, dn, "open", "late value")
  local beats, stop = 0, false
  local beater = wp.spawn(function()
    while not stop do
      beats = beats + 1
      wp.sleep(0.01)
    end
  end)
  local waiter = wp.spawn(function()
    local t0 = wp.now()
    local r, err = f:wait(0.2)
    return r, err, wp.now() - t0
  end)
  T.eq(waiter:status(), "running", "spawn returned while the waiter waits")
  -- A second waiter on the same future without a timeout.
  local patient = wp.spawn(function() return f:wait() end)
  local beats0 = beats
  local ok, r, err, elapsed = waiter:join()
  T.eq(ok, true)
  T.eq(r, nil)
  T.eq(err, "timeout")
  T.ok(elapsed >= 0.15, string.format("the timeout was kept: %.3f s", elapsed))
  T.ok(elapsed < 5 * T.time_scale,
    string.format("returned soon after the timeout: %.3f s", elapsed))
  T.ok(beats - beats0 >= 3, string.format(
    "another coroutine ran during the wait (%d beats)", beats - beats0))
  T.eq(f:done(), false)
  T.eq(patient:status(), "running", "the patient waiter still waits")
  -- wait(0) on a pending future times out at once, without suspending:
  -- a coroutine that runs at every pass of the loop does not run meanwhile.
  local spins, spinning = 0, true
  local spinner = wp.spawn(function()
    while spinning do
      spins = spins + 1
      wp.sleep(0)
    end
  end)
  local spins1 = spins
  local zr, zerr = f:wait(0)
  T.eq(zr, nil)
  T.eq(zerr, "timeout")
  T.eq(spins, spins1, "wait(0) did not yield")
  spinning = false
  spinner:join()
  d:set("open", true)
  local pok, fok, v = patient:join()
  T.eq(pok, true)
  T.eq(fok, true)
  T.eq(v, "late value")
  -- Waiting again on the ended future gives its results at once.
  T.eq(select(2, f:wait(0)), "late value")
  stop = true
  T.eq(beater:join(), true)
  T.eq(pool:stop_wait(), 0)
end)

T.test("workerpool.sleep in one coroutine does not block another", function()
  local order = {}
  local t0 = wp.now()
  local long = wp.spawn(function()
    wp.sleep(0.5)
    order[#order + 1] = "long"
    return wp.now() - t0
  end)
  T.eq(long:status(), "running", "spawn returned without waiting for the sleep")
  local short = wp.spawn(function()
    for i = 1, 5 do
      wp.sleep(0.01)
      order[#order + 1] = "short" .. i
    end
  end)
  local _, slept = long:join()
  short:join()
  T.eq(table.concat(order, ","), "short1,short2,short3,short4,short5,long")
  T.ok(slept >= 0.45, string.format("the long sleep lasted %.3f s", slept))
  -- sleep(0) is a wait too: it returns on a later iteration.
  local n = 0
  local z = wp.spawn(function()
    wp.sleep(0)
    n = n + 1
  end)
  T.eq(n, 0, "sleep(0) suspended the coroutine")
  z:join()
  T.eq(n, 1)
  T.raises(function() wp.sleep(-1) end, "bad argument #1 to 'sleep'")
end)

-- ---- plain yields -------------------------------------------------------

T.test("a plain coroutine.yield() resumes on the next loop iteration", function()
  local n = 0
  local h = wp.spawn(function()
    for _ = 1, 3 do
      n = n + 1
      local back = pack(coroutine.yield("dropped", "values"))
      if back.n ~= 0 then error("yield returned values") end
    end
    return "finished"
  end)
  T.eq(n, 1, "spawn ran the coroutine until its first yield")
  T.eq(h:status(), "running")
  coroutine.yield() -- the main coroutine yields too
  T.ok(n >= 2 and n <= 3, "the yielding coroutine ran again: " .. n)
  local ok, v = h:join()
  T.eq(ok, true)
  T.eq(v, "finished")
  T.eq(n, 3)
end)

T.test("a coroutine that keeps yielding does not starve timers", function()
  local fired = false
  wp.after(0.02, function() fired = true end)
  local spins = 0
  local deadline = wp.now() + 10
  while not fired and wp.now() < deadline do
    spins = spins + 1
    coroutine.yield()
  end
  T.ok(fired, "the timer fired while the coroutine yielded")
  T.ok(spins > 1, "several iterations passed: " .. spins)
end)

T.test("plain coroutines inside host coroutines keep Lua's semantics", function()
  local pool = wp.new { max_workers = 1 }
  local gen = coroutine.wrap(function()
    coroutine.yield(1)
    -- Not a host coroutine: submit_wait blocks the thread, as in lua5.4.
    coroutine.yield(pool:submit_wait(function() return 2 end))
    return 3
  end)
  T.eq(gen(), 1)
  T.eq(gen(), 2)
  T.eq(gen(), 3)
  T.eq(pool:stop_wait(), 0)
end)

-- ---- errors -------------------------------------------------------------

T.test("an error in a spawned coroutine does not stop the loop", function()
  local failing = wp.spawn(function()
    wp.sleep(0.01)
    error("not fatal")
  end)
  local survivor = wp.spawn(function()
    wp.sleep(0.05)
    return "alive"
  end)
  local ticked = 0
  local t = wp.every(0.01, function() ticked = ticked + 1 end)
  T.eq((failing:join()), false)
  local ok, v = survivor:join()
  T.eq(ok, true)
  T.eq(v, "alive")
  T.eventually(function() return ticked >= 3 end, 10, "the timer keeps firing")
  T.eq(t:cancel(), true)
  -- An error in a timer callback or an on_done callback neither.
  wp.after(0, function() error("timer callback error") end)
  local pool = wp.new { max_workers = 1 }
  local f = pool:submit(function() return 1 end)
  f:on_done(function() error("on_done callback error") end)
  wp.sleep(0.05)
  T.eq(pool:submit_wait(function() return "still works" end), "still works")
  T.eq(pool:stop_wait(), 0)
end)

-- ---- in_host ------------------------------------------------------------

T.test("in_host() is true in the main coroutine, spawned ones and timers", function()
  T.eq(wp.in_host(), true)
  T.eq(select(2, wp.spawn(function() return wp.in_host() end):join()), true)
  local seen
  wp.after(0, function() seen = wp.in_host() end)
  wp.sleep(0.05)
  T.eq(seen, true)
  -- A worker state of the host's pools is not the host.
  local pool <close> = wp.new { max_workers = 1 }
  T.eq(pool:submit_wait(function() return require("workerpool").in_host() end), false)
end)

T.run_host()
