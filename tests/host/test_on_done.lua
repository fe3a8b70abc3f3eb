-- test_on_done.lua: f:on_done(cb) under `wpool run`.  cb(ok, ...) runs on
-- the loop thread, in a host coroutine of its own, once the task ended:
-- with true and the results, false and the error, false and "discarded" or
-- "cancelled".  For a future that already ended it is queued, so it runs
-- later, never inside the on_done call.

local T = require "harness"
local wp = require "workerpool"

local newdict = T.dict_maker("host.on_done")

local gate = T.gate

local pack = T.pack

-- Waits (suspending) until f ended, without watching it from the loop.
local function poll_done(f)
  T.eventually(function() return f:done() end, 10, "the task ended")
end

T.test("cb(true, results...) runs on the loop once the task returned", function()
  local d, dn = newdict()
  local pool = wp.new { max_workers = 1 }
  local f = pool:submit(gate, dn, "open", "a", nil, 3)
  local got
  f:on_done(function(...)
    got = pack(...)
    got.worker = wp.worker_id()
    got.yieldable = coroutine.isyieldable()
    -- A host coroutine of its own: it may wait.
    got.waited = pool:submit_wait(function() return "from the callback" end)
  end)
  wp.sleep(0.05)
  T.eq(got, nil, "not before the task ended")
  d:set("open", true)
  T.eventually(function() return got and got.waited end, 10, "the callback ran")
  T.eq(got.n, 4, "ok and three results, the nil kept")
  T.eq(got[1], true)
  T.eq(got[2], "a")
  T.eq(got[3], nil)
  T.eq(got[4], 3)
  T.eq(got.worker, nil, "the callback runs in the host state, not a worker")
  T.eq(got.yieldable, true)
  T.eq(got.waited, "from the callback")
  T.eq(pool:stop_wait(), 0)
end)

T.test("cb(false, err) when the task raised", function()
  local pool = wp.new { max_workers = 1 }
  local got
  pool:submit(function() error("task failure") end):on_done(function(...)
    got = pack(...)
  end)
  T.eventually(function() return got end, 10, "the callback ran")
  T.eq(got[1], false)
  T.ok(tostring(got[2]):find("task failure", 1, true), tostring(got[2]))
  T.ok(tostring(got[2]):find("stack traceback", 1, true), tostring(got[2]))
  T.eq(pool:stop_wait(), 0)
end)

T.test("a future that already ended: cb is queued, not called inside on_done",
  function()
    local pool = wp.new { max_workers = 1 }
    local f = pool:submit(function() return "x", "y" end)
    poll_done(f)
    local order = {}
    f:on_done(function(ok, a, b)
      order[#order + 1] = string.format("cb %s %s %s", tostring(ok), a, b)
    end)
    order[#order + 1] = "after on_done"
    T.eq(#order, 1, "the callback did not run synchronously")
    T.eventually(function() return #order == 2 end, 10, "the callback ran")
    T.eq(order[1], "after on_done")
    T.eq(order[2], "cb true x y")
    T.eq(pool:stop_wait(), 0)
  end)

T.test("a future a wait detached: cb(true, result) is queued the same way",
  function()
    local pool = wp.new { max_workers = 1 }
    local got, order = {}, {}
    for i, task in ipairs {
      function() return 42 end, function() return 0.5 end,
      function() return false end, function() return nil end,
      function() end,
    } do
      local f = pool:submit(task)
      local res = pack(f:wait())
      T.eq(res[1], true)
      T.eq(getmetatable(f).__gc, nil, "detached: no finalizer")
      f:on_done(function(...)
        got[i] = pack(...)
        order[#order + 1] = i
      end)
      T.eq(got[i], nil, "not called inside on_done")
      -- Twice: each call runs its callback once.
      f:on_done(function() order[#order + 1] = -i end)
    end
    T.eventually(function() return #order == 10 end, 10, "the callbacks ran")
    T.eq(table.concat(order, " "), "1 -1 2 -2 3 -3 4 -4 5 -5")
    T.eq(got[1].n, 2); T.eq(math.type(got[1][2]), "integer"); T.eq(got[1][2], 42)
    T.eq(got[2].n, 2); T.eq(math.type(got[2][2]), "float"); T.eq(got[2][2], 0.5)
    T.eq(got[3].n, 2); T.eq(got[3][2], false)
    T.eq(got[4].n, 2); T.eq(got[4][2], nil)
    T.eq(got[5].n, 1, "no result: ok alone")
    T.eq(got[5][1], true)
    -- A parked wait and a detaching wait on the same future.
    local d, dn = newdict()
    local f = pool:submit(gate, dn, "open2", 7)
    local parked
    wp.spawn(function() parked = pack(f:wait()) end)
    d:set("open2", true)
    poll_done(f)
    T.eq(pack(f:wait())[2], 7)
    T.eventually(function() return parked end, 10, "the parked wait returned")
    T.eq(parked.n, 2); T.eq(parked[1], true); T.eq(parked[2], 7)
    T.eq(pool:stop_wait(), 0)
  end)

T.test("cancelled futures: cb(false, 'cancelled'), also after the fact",
  function()
    local d, dn = newdict()
    local pool = wp.new { max_workers = 1 }
    pool:submit(gate, dn, "open")
    T.eventually(function() return pool:running() == 1 end, 10, "started")
    local f = pool:submit(function() return "never" end)
    local got, late
    f:on_done(function(...) got = pack(...) end)
    T.eq(f:cancel(), true)
    T.eq(got, nil, "not called inside cancel")
    T.eventually(function() return got end, 10, "the callback ran")
    T.eq(got.n, 2)
    T.eq(got[1], false)
    T.eq(got[2], "cancelled")
    -- A second future, cancelled before anyone watched it.
    local g = pool:submit(function() return "never" end)
    T.eq(g:cancel(), true)
    g:on_done(function(...) late = pack(...) end)
    T.eq(late, nil, "queued")
    T.eventually(function() return late end, 10, "the late callback ran")
    T.eq(late[1], false)
    T.eq(late[2], "cancelled")
    d:set("open", true)
    T.eq(pool:stop_wait(), 0)
  end)

T.test("discarded futures: cb(false, 'discarded')", function()
  local d, dn = newdict()
  local pool = wp.new { max_workers = 1 }
  pool:submit(gate, dn, "open")
  T.eventually(function() return pool:running() == 1 end, 10, "started")
  local f = pool:submit(function() return "never" end)
  local got
  f:on_done(function(...) got = pack(...) end)
  local stopper = wp.spawn(function() return pool:stop() end)
  T.eventually(function() return got end, 10, "the callback ran")
  T.eq(got.n, 2)
  T.eq(got[1], false)
  T.eq(got[2], "discarded")
  d:set("open", true)
  T.eq(select(2, stopper:join()), 1)
end)

T.test("several callbacks on one future all run, in order", function()
  local d, dn = newdict()
  local pool = wp.new { max_workers = 1 }
  local f = pool:submit(gate, dn, "open", 7)
  local calls = {}
  for i = 1, 3 do
    f:on_done(function(ok, v) calls[#calls + 1] = { i, ok, v } end)
  end
  d:set("open", true)
  T.eventually(function() return #calls == 3 end, 10, "three callbacks")
  for i = 1, 3 do
    T.eq(calls[i][1], i, "order")
    T.eq(calls[i][2], true)
    T.eq(calls[i][3], 7)
  end
  T.eq(pool:stop_wait(), 0)
end)

T.test("on_done and a waiting coroutine on the same future", function()
  local d, dn = newdict()
  local pool = wp.new { max_workers = 1 }
  local f = pool:submit(gate, dn, "open", "shared")
  local got
  f:on_done(function(ok, v) got = { ok, v } end)
  local waiter = wp.spawn(function() return f:wait() end)
  d:set("open", true)
  local ok, fok, v = waiter:join()
  T.eq(ok, true)
  T.eq(fok, true)
  T.eq(v, "shared")
  T.eventually(function() return got end, 10, "the callback ran")
  T.eq(got[2], "shared")
  T.eq(pool:stop_wait(), 0)
end)

-- A future's completion can be watched more than once: after a host
-- coroutine waited for it, or after an earlier callback ran, on_done
-- still queues cb.  (Until the core took several completion callbacks per
-- future, the second watch was dropped: cb never ran and the loop never
-- ended.)
T.test("on_done after a host coroutine waited for the future", function()
  local pool = wp.new { max_workers = 1 }
  local f = pool:submit(function()
    require("workerpool").sleep(0.02)
    return "waited"
  end)
  T.eq(select(2, f:wait()), "waited") -- parks: the loop watched f
  local got
  f:on_done(function(ok, v) got = { ok, v } end)
  T.eventually(function() return got end, 5, "the callback ran")
  T.eq(got[1], true)
  T.eq(got[2], "waited")
  T.eq(pool:stop_wait(), 0)
end)

T.test("on_done again after an earlier callback ran", function()
  local pool = wp.new { max_workers = 1 }
  local f = pool:submit(function() return "twice" end)
  local first, second
  f:on_done(function(ok, v) first = { ok, v } end)
  T.eventually(function() return first end, 5, "the first callback ran")
  f:on_done(function(ok, v) second = { ok, v } end)
  T.eventually(function() return second end, 5, "the second callback ran")
  T.eq(second[2], "twice")
  T.eq(pool:stop_wait(), 0)
end)

T.test("on_done argument check", function()
  local pool = wp.new { max_workers = 1 }
  local f = pool:submit(function() end)
  T.raises(function() f:on_done() end, "function expected")
  T.raises(function() f:on_done("cb") end, "function expected")
  f:wait()
  T.eq(pool:stop_wait(), 0)
end)

T.test("an undecodable result: cb gets false and the error, f:wait raises it", function()
  local pool = wp.new { max_workers = 1,
    init = 'package.loaded["only-in-the-worker"] = { 1, 2 }' }
  local f = pool:submit(function()
    require("workerpool").sleep(0.05)
    return package.loaded["only-in-the-worker"] -- travels by name
  end)
  local got
  f:on_done(function(...) got = pack(...) end)
  -- The waiter registered after the callback still wakes.
  T.raises(function() f:wait() end, "only-in-the-worker", "f:wait")
  T.eventually(function() return got end, 10, "the callback ran")
  T.eq(got[1], false, "cb: ok")
  T.ok(tostring(got[2]):find("only-in-the-worker", 1, true), "cb: the decode error")
  T.eq(pool:stop_wait(), 0)
end)

T.run_host()
