-- test_pool.lua: pools through the Lua module.  A port of every test of
-- gammazero/workerpool's own suite (TestExample, TestMaxWorkers,
-- TestReuseWorkers, TestWorkerTimeout, TestStop, TestStopWait,
-- TestSubmitWait, TestOverflow, TestStopRace, TestWaitingQueueSizeRace,
-- TestPause, TestWorkerLeak), plus the life cycle of pools, futures and
-- names, and the checking of workerpool.new's options.
--
-- Go's tests block tasks on channels; here a task blocks by polling a
-- shared dictionary until the host sets a key (see `blocker`).  Go's
-- goroutines become the worker threads of a second, helper pool whose tasks
-- reach the pool under test through workerpool.get.  Nothing depends on the
-- exact length of a sleep: "becomes true" is polled with generous bounds,
-- and short windows are only used to check that something stays false.

local T = require "harness"
local workerpool = require "workerpool"

-- ---- helpers ------------------------------------------------------------

local S = T.suite("test_pool")
local case, newdict, newpool = S.case, S.newdict, S.newpool
local count, wait_count, stays = S.count, S.wait_count, S.stays

-- Threads of this process, or nil where /proc is missing.
local function threads()
  local f = io.open("/proc/self/status")
  if not f then return nil end
  local n
  for line in f:lines() do
    n = n or line:match("^Threads:%s*(%d+)")
  end
  f:close()
  return tonumber(n)
end

-- A task (runs in a worker): counts itself in `started`, blocks until the
-- host sets `release` in dict dname (with until_stopped, also until its own
-- pool has begun to stop), counts itself in `finished`, returns its worker
-- id.  Gives up after 30 s so that a broken test cannot hang forever.
local function blocker(dname, until_stopped)
  local W = require "workerpool"
  local d = W.shared(dname)
  local own = until_stopped and W.get(W.pool_name())
  d:incr("started", 1, 0)
  local deadline = W.now() + 30
  while d:get("release") == nil do
    if until_stopped and (not own or own:stopped()) then break end
    if W.now() > deadline then error("blocker was never released") end
    W.sleep(0.001)
  end
  d:incr("finished", 1, 0)
  return W.worker_id()
end

-- A task: counts itself under key k of dict dname, after sleeping s.
local function counter(dname, k, s)
  local W = require "workerpool"
  if s then W.sleep(s) end
  return W.shared(dname):incr(k or "ran", 1, 0)
end

-- A task for a helper pool: calls method m of the pool named `name` with
-- the remaining arguments and returns its results ("gone" when the pool
-- cannot be found).
local function remote(name, m, ...)
  local W = require "workerpool"
  local p = W.get(name)
  if not p then return "gone" end
  return p[m](p, ...)
end

-- ---- the Go suite ---------------------------------------------------------

case("Example: stop_wait runs every submitted request", function()
  local d, dn = newdict("example")
  local pool = newpool { max_workers = 2 }
  local requests = { "alpha", "beta", "gamma", "delta", "epsilon" }
  local futs = {}
  for i, r in ipairs(requests) do
    futs[i] = pool:submit(function(dname, req)
      local W = require "workerpool"
      local dd = W.shared(dname)
      dd:set(req, true)
      dd:incr("count", 1, 0)
      return "handled " .. req
    end, dn, r)
    T.ok(futs[i], "submit " .. r)
  end
  T.eq(pool:stop_wait(), 0)
  T.eq(d:get("count"), #requests)
  for i, r in ipairs(requests) do
    T.eq(d:get(r), true, r)
    local ok, res = futs[i]:wait(0)
    T.eq(ok, true, r)
    T.eq(res, "handled " .. r)
  end
  T.eq(pool:stopped(), true)
  T.eq(pool:workers(), 0)
end)

case("MaxWorkers: max_workers tasks run at once, never more", function()
  local max = 20
  local d, dn = newdict("max")
  local pool = newpool { max_workers = max, idle_timeout = 60 }
  T.eq(pool:size(), max)
  T.eq(pool:workers(), 0, "workers start lazily")
  local futs = {}
  for i = 1, max do futs[i] = pool:submit(blocker, dn) end
  wait_count(d, "started", max, "all max tasks started concurrently")
  T.eq(pool:running(), max)
  T.eq(pool:workers(), max)
  T.eq(pool:waiting(), 0)
  -- More tasks queue instead of starting workers.
  for i = max + 1, max + 5 do futs[i] = pool:submit(blocker, dn) end
  T.eq(pool:waiting(), 5)
  stays(function()
    return pool:workers() == max and pool:running() == max and
      count(d, "started") == max
  end, 0.05, "no worker beyond max_workers")
  d:set("release", true)
  local ids = {}
  for i = 1, max + 5 do
    T.ok(pool:workers() <= max, "workers <= max")
    T.ok(pool:running() <= max, "running <= max")
    local ok, id = futs[i]:wait(10)
    T.eq(ok, true, "task " .. i)
    ids[id] = true
  end
  local n = 0
  for id in pairs(ids) do
    T.ok(id >= 1, "worker ids are positive")
    n = n + 1
  end
  T.eq(n, max, "distinct worker ids")
  T.eq(pool:stop_wait(), 0)
  T.eq(pool:workers(), 0)
end)

case("ReuseWorkers: sequential tasks reuse one worker", function()
  local d, dn = newdict("reuse")
  local pool = newpool { max_workers = 5, idle_timeout = 60 }
  local first
  for i = 1, 10 do
    local f = pool:submit(function(dname, k)
      local W = require "workerpool"
      local dd = W.shared(dname)
      local deadline = W.now() + 30
      while dd:get(k) == nil do
        if W.now() > deadline then error("never released") end
        W.sleep(0.001)
      end
      return W.worker_id()
    end, dn, "go" .. i)
    d:set("go" .. i, true)
    local ok, id = f:wait(10)
    T.eq(ok, true, "task " .. i)
    first = first or id
    T.eq(id, first, "task " .. i .. " ran on the same worker")
    -- The pause of the Go test: the worker goes back to idle.
    T.eventually(function() return pool:running() == 0 end, 10, "idle")
    workerpool.sleep(0.01)
  end
  T.eq(first, 1)
  T.eq(pool:workers(), 1, "only one worker was ever created")
  T.eq(pool:stop_wait(), 0)
end)

case("WorkerTimeout: idle workers are reaped one at a time", function()
  local n, idle = 20, 0.2
  local d, dn = newdict("timeout")
  local pool = newpool { max_workers = n, idle_timeout = idle }
  for _ = 1, n do pool:submit(blocker, dn) end
  wait_count(d, "started", n)
  T.eq(pool:running(), n)
  T.eq(pool:workers(), n, "no idle worker while all are busy")
  local t_release = workerpool.now()
  d:set("release", true)
  T.eventually(function() return pool:running() == 0 end, 10, "tasks done")
  -- Sample the worker count every 10 ms until it reaches 0.  Each sample
  -- keeps the clock before and after the count was read.
  local samples = {}
  local deadline = workerpool.now() + 10 + 2 * n * idle
  repeat
    local t0 = workerpool.now()
    local c = pool:workers()
    samples[#samples + 1] = { t0 = t0, c = c, t1 = workerpool.now() }
    if c == 0 then break end
    workerpool.sleep(0.01)
  until workerpool.now() > deadline
  local last = samples[#samples]
  T.eq(last.c, 0, "every idle worker was reaped in time")
  if samples[1].t1 - t_release < idle then
    T.eq(samples[1].c, n, "nothing reaped before one idle period")
  end
  local seen = {}
  for i = 2, #samples do
    local a, b = samples[i - 1], samples[i]
    T.ok(b.c <= a.c, "the count never grows")
    -- Reaps are at least one idle period apart: between two reads at most
    -- 1 + floor(elapsed / idle) workers can go.
    local limit = 1 + math.floor((b.t1 - a.t0) / idle)
    if a.c - b.c > limit then
      error(string.format("%d workers reaped within %.3f s (at most %d)",
        a.c - b.c, b.t1 - a.t0, limit))
    end
    if b.c > 0 and b.c < n then seen[b.c] = true end
  end
  local distinct = 0
  for _ in pairs(seen) do distinct = distinct + 1 end
  T.ok(distinct >= 5, "counts between n and 0 were observed " ..
    "(workers go one at a time, not all at once)")
  -- The k-th reap comes at least k idle periods after the last task ended,
  -- so all of them take at least n idle periods from the release.
  T.ok(last.t1 - t_release >= n * idle - 0.01, string.format(
    "reaping %d workers took %.3f s, at least %.3f s expected",
    n, last.t1 - t_release, n * idle))
  -- A later burst starts a fresh worker; ids are never reused.
  local id = pool:submit_wait(function() return require("workerpool").worker_id() end)
  T.ok(id > n, "a new worker id after reaping: " .. tostring(id))
  T.eq(pool:stop_wait(), 0)
end)

case("WorkerNoTimeout: idle_timeout < 0 never reaps", function()
  local n = 5
  local d, dn = newdict("notimeout")
  local pool = newpool { max_workers = n, idle_timeout = -1 }
  for _ = 1, n do pool:submit(blocker, dn) end
  wait_count(d, "started", n)
  d:set("release", true)
  T.eventually(function() return pool:running() == 0 end, 10, "tasks done")
  stays(function() return pool:workers() == n end, 1.0,
    "workers are kept with idle_timeout = -1")
  T.eq(pool:stop_wait(), 0)
  T.eq(pool:workers(), 0)
end)

case("min_workers: started at once and never reaped", function()
  local d, dn = newdict("minw")
  local pool = newpool { max_workers = 6, min_workers = 2, idle_timeout = 0.05 }
  T.eq(pool:workers(), 2, "min_workers started by new")
  for _ = 1, 6 do pool:submit(blocker, dn) end
  wait_count(d, "started", 6)
  T.eq(pool:workers(), 6)
  d:set("release", true)
  T.eventually(function() return pool:workers() == 2 end, 10,
    "reaped down to min_workers")
  stays(function() return pool:workers() == 2 end, 0.5,
    "never below min_workers")
  T.eq(pool:submit_wait(function() return 7 end), 7)
  T.eq(pool:stop(), 0)
  T.eq(pool:workers(), 0, "stop ends min_workers too")
end)

case("Stop: running tasks finish, queued tasks are discarded", function()
  local n, extra = 20, 5
  local d, dn = newdict("stop")
  local pool = newpool { max_workers = n }
  local futs = {}
  -- These tasks block until their pool begins to stop.
  for i = 1, n + extra do futs[i] = pool:submit(blocker, dn, true) end
  wait_count(d, "started", n)
  T.eq(pool:running(), n)
  T.eq(pool:waiting(), extra)
  T.eq(pool:stopped(), false)
  T.eq(pool:stop(), extra, "stop returns the number discarded")
  T.eq(pool:stopped(), true)
  T.eq(pool:workers(), 0, "no workers after stop")
  T.eq(pool:running(), 0)
  T.eq(pool:waiting(), 0)
  T.eq(count(d, "started"), n, "queued tasks never started")
  T.eq(count(d, "finished"), n, "running tasks finished")
  for i = 1, n do
    T.eq(futs[i]:wait(0), true, "running task " .. i)
    T.eq(futs[i]:status(), "ok")
  end
  for i = n + 1, n + extra do
    local ok, err = futs[i]:wait(0)
    T.eq(ok, false, "queued task " .. i)
    T.eq(err, "discarded")
    T.eq(futs[i]:status(), "discarded")
    T.eq(futs[i]:done(), true)
  end
  T.eq(pool:stop(), 0, "a second stop discards nothing")
  T.eq(pool:stop_wait(), 0)
end)

case("Stop: after the tasks were released, nothing is discarded", function()
  local n = 20
  local d, dn = newdict("stop2")
  local pool = newpool { max_workers = n }
  for _ = 1, n do pool:submit(blocker, dn) end
  wait_count(d, "started", n)
  d:set("release", true)
  T.eq(pool:stopped(), false)
  T.eq(pool:stop(), 0)
  T.eq(count(d, "finished"), n)
  T.eq(pool:workers(), 0)
  T.eq(pool:stopped(), true)
end)

case("StopWait: queued tasks all run; a second stop_wait is a no-op", function()
  local d, dn = newdict("stopwait")
  local pool = newpool { max_workers = 5 }
  local futs = {}
  for i = 1, 5 do futs[i] = pool:submit(blocker, dn, true) end
  for i = 6, 35 do futs[i] = pool:submit(counter, dn, "ran", 0.001) end
  wait_count(d, "started", 5)
  T.eq(pool:waiting(), 30)
  T.eq(pool:stop_wait(), 0)
  T.eq(count(d, "ran"), 30, "every queued task ran")
  for i = 1, 35 do T.eq(futs[i]:wait(0), true, "task " .. i) end
  T.eq(pool:stopped(), true)
  T.eq(pool:workers(), 0)
  T.eq(pool:waiting(), 0)
  local t0 = workerpool.now()
  T.eq(pool:stop_wait(), 0)
  T.eq(pool:stop(), 0)
  T.ok(workerpool.now() - t0 < 5, "second stops return at once")
  T.eq(count(d, "ran"), 30)
end)

case("SubmitWait: submit returns at once, submit_wait after the task", function()
  local d, dn = newdict("submitwait")
  local pool = newpool { max_workers = 1 }
  -- Go ignores nil tasks; here they are argument errors.
  T.raises(function() pool:submit(nil) end, "bad argument #1 to 'submit'")
  T.raises(function() pool:submit_wait(nil) end,
    "bad argument #1 to 'submit_wait'")
  T.raises(function() pool:submit(print) end, "bad argument #1 to 'submit'")
  local f = pool:submit(blocker, dn)
  T.eq(f:done(), false, "submit did not wait for the task")
  wait_count(d, "started", 1)
  T.eq(f:status(), "pending")
  d:set("release", true)
  local a, b = pool:submit_wait(function(dname)
    local W = require "workerpool"
    W.sleep(0.05)
    W.shared(dname):set("done2", true)
    return "x", 42
  end, dn)
  T.eq(a, "x")
  T.eq(b, 42)
  T.eq(d:get("done2"), true, "submit_wait waited for the task")
  T.eq(f:done(), true, "the earlier task ran first")
  local e = T.raises(function()
    pool:submit_wait(function() error("kaboom") end)
  end, "kaboom", "submit_wait raises the task's error")
  T.ok(e:find("stack traceback", 1, true), "with the worker's traceback")
  local ok, err = pool:submit(function() error("kaboom2") end):wait(10)
  T.eq(ok, false)
  T.ok(err:find("kaboom2", 1, true), "f:wait returns the error")
  T.eq(pool:stop_wait(), 0)
end)

case("Overflow: tasks beyond max_workers wait; stop discards them", function()
  local d, dn = newdict("overflow")
  local pool = newpool { max_workers = 2 }
  local futs = {}
  for i = 1, 64 do futs[i] = pool:submit(blocker, dn, true) end
  wait_count(d, "started", 2)
  T.eq(pool:waiting(), 62)
  T.eq(pool:running(), 2)
  T.eq(pool:workers(), 2)
  T.eq(pool:stop(), 62)
  T.eq(count(d, "started"), 2)
  local ok_n, discarded_n = 0, 0
  for i = 1, 64 do
    local ok, err = futs[i]:wait(0)
    if ok then
      ok_n = ok_n + 1
    elseif err == "discarded" then
      discarded_n = discarded_n + 1
    end
  end
  T.eq(ok_n, 2)
  T.eq(discarded_n, 62)
end)

case("bursts of long tasks start every idle worker, round after round", function()
  -- A submit may skip the pool lock while no worker needs waking (see
  -- docs/architecture.md, "The inbox"); one spinning worker takes one
  -- task, so a burst must still wake the sleeping ones.
  local pool = newpool { max_workers = 4, min_workers = 4, idle_timeout = -1 }
  for round = 1, 150 do
    local d, dn = newdict("burst" .. round)
    -- Mostly at once, while a worker that just finished still spins.
    if round % 10 == 0 then workerpool.sleep(0.002) end
    local futs = {}
    for i = 1, 4 do futs[i] = pool:submit(blocker, dn) end
    wait_count(d, "started", 4, "round " .. round .. ": 4 tasks started at once")
    d:set("release", true)
    for i = 1, 4 do T.eq(futs[i]:wait(10), true) end
  end
  T.eq(pool:stop_wait(), 0)
end)

case("a task queued behind a hung one starts on the other worker", function()
  -- While tasks are short, a worker that goes idle beside a running one
  -- sleeps light and submits do not wake it (docs/architecture.md, "The
  -- light sleep"): it must still come for a task within its bound, at
  -- every point of its backoff and after it, even if the running task
  -- never ends.
  local pool = newpool { max_workers = 2, min_workers = 2, idle_timeout = -1 }
  local inc = function(x) return x + 1 end
  for i = 1, 200 do T.eq(pool:submit_wait(inc, i), i + 1) end
  local d, dn = newdict("behind")
  local hung = pool:submit(blocker, dn)
  wait_count(d, "started", 1, "the hung task runs")
  for round, pause in ipairs { 0, 0, 0.0002, 0.0005, 0.001, 0.002, 0.004, 0.02 } do
    -- The other worker runs this one, then goes idle beside the hung task.
    T.eq(pool:submit(inc, round):wait(10), true, "round " .. round)
    if pause > 0 then workerpool.sleep(pause) end
    local ok, r = pool:submit(inc, round):wait(10)
    T.eq(ok, true, "round " .. round .. ": started beside the hung task")
    T.eq(r, round + 1)
  end
  T.eq(hung:done(), false)
  d:set("release", true)
  T.eq(hung:wait(10), true)
  T.eq(pool:stop_wait(), 0)
end)

case("StopRace: concurrent stops from several threads all return", function()
  local d, dn = newdict("stoprace")
  local target = newpool { max_workers = 20 }
  local tname = target:name()
  for _ = 1, 20 do target:submit(blocker, dn, true) end
  for _ = 1, 10 do target:submit(blocker, dn, true) end
  wait_count(d, "started", 20)
  T.eq(target:waiting(), 10)
  local ncallers = 5
  local helper = newpool { max_workers = ncallers }
  local hf = {}
  for i = 1, ncallers do
    hf[i] = helper:submit(function(dname, name)
      local W = require "workerpool"
      local dd = W.shared(dname)
      local p = W.get(name)
      if not p then return "no handle" end
      dd:incr("ready", 1, 0)
      local deadline = W.now() + 30
      while dd:get("go") == nil do
        if W.now() > deadline then error("never released") end
        W.sleep(0.0005)
      end
      return p:stop()
    end, dn, tname)
  end
  wait_count(d, "ready", ncallers, "stop callers ready")
  d:set("go", true)
  local total = target:stop()
  for i = 1, ncallers do
    local ok, r = hf[i]:wait(10)
    T.eq(ok, true, "stop caller " .. i .. " returned")
    T.eq(math.type(r), "integer", "stop caller " .. i)
    total = total + r
  end
  T.eq(total, 10, "each queued task was discarded exactly once")
  T.eq(target:stopped(), true)
  T.eq(target:workers(), 0)
  T.eq(count(d, "finished"), 20)
  T.eq(helper:stop_wait(), 0)
end)

case("WaitingQueueSizeRace: concurrent submitters see consistent counts", function()
  local nsub, ntasks = 8, 25
  local d, dn = newdict("wqsr")
  local target = newpool { max_workers = 5 }
  local helper = newpool { max_workers = nsub }
  local hf = {}
  for i = 1, nsub do
    hf[i] = helper:submit(function(dname, name, tasks)
      local W = require "workerpool"
      local dd = W.shared(dname)
      local p = assert(W.get(name))
      dd:incr("ready", 1, 0)
      local deadline = W.now() + 30
      while dd:get("go") == nil do
        if W.now() > deadline then error("never released") end
        W.sleep(0.0005)
      end
      local max, submitted = 0, 0
      for k = 1, tasks do
        -- Halfway, wait for the target to start something: without it, on
        -- a loaded machine every task could still be queued at the end.
        while k == tasks // 2 + 1 and (dd:get("started") or 0) == 0 do
          if W.now() > deadline then error("target never started") end
          W.sleep(0.0005)
        end
        local f = p:submit(function(dn2)
          local W2 = require "workerpool"
          local d2 = W2.shared(dn2)
          d2:incr("started", 1, 0)
          W2.sleep(0.005)
          d2:incr("done", 1, 0)
        end, dname)
        if f then submitted = submitted + 1 end
        local w = p:waiting()
        if w > max then max = w end
      end
      return max, submitted
    end, dn, target:name(), ntasks)
  end
  wait_count(d, "ready", nsub, "submitters ready")
  d:set("go", true)
  local maxmax, total = 0, 0
  for i = 1, nsub do
    local ok, max, submitted = hf[i]:wait(10)
    T.eq(ok, true, "submitter " .. i)
    T.eq(submitted, ntasks, "submitter " .. i)
    if max > maxmax then maxmax = max end
    total = total + submitted
  end
  T.eq(target:stop_wait(), 0)
  T.eq(count(d, "done"), total, "every submitted task completed")
  T.ok(maxmax > 0, "expected to see waiting() > 0")
  T.ok(maxmax < total, "should not have seen all tasks waiting")
  T.eq(helper:stop_wait(), 0)
end)

case("Pause: waits for earlier tasks; later ones wait for resume", function()
  local d, dn = newdict("pause")
  local pool = newpool { max_workers = 2 }
  for _ = 1, 6 do pool:submit(counter, dn, "ran1", 0.02) end
  pool:pause()
  T.eq(count(d, "ran1"), 6, "pause waited for every earlier task")
  T.eq(pool:running(), 0)
  T.eq(pool:waiting(), 0)
  local f = pool:submit(counter, dn, "ran2")
  T.ok(f, "submit is accepted while paused")
  stays(function()
    return d:get("ran2") == nil and pool:waiting() == 1 and not f:done()
  end, 0.1, "a task submitted while paused does not start")
  pool:resume()
  T.eq(f:wait(10), true, "resume releases the task")
  T.eq(count(d, "ran2"), 1)
  T.eq(pool:waiting(), 0)
  -- A new pause can be started after resume.
  pool:pause()
  local futs = {}
  for i = 1, 3 do futs[i] = pool:submit(counter, dn, "ran3") end
  T.eq(pool:waiting(), 3)
  stays(function() return d:get("ran3") == nil end, 0.05,
    "paused again: nothing starts")
  pool:resume()
  for i = 1, 3 do T.eq(futs[i]:wait(10), true) end
  T.eq(count(d, "ran3"), 3)
  pool:resume() -- resuming a running pool is a no-op
  T.eq(pool:submit_wait(function() return "still works" end), "still works")
  T.eq(pool:stop_wait(), 0)
end)

case("Pause: two pauses in a row do not deadlock", function()
  local d, dn = newdict("pause2")
  local pool = newpool { max_workers = 3 }
  local helper = newpool { max_workers = 1 }
  pool:pause()
  local f = pool:submit(counter, dn, "ran")
  -- The second pause waits for what the first waited for, not for f,
  -- which cannot start while paused.  Run it where a hang is harmless.
  local h = helper:submit(remote, pool:name(), "pause")
  T.eq(h:wait(10), true, "second pause returned")
  pool:pause()
  T.eq(d:get("ran"), nil)
  T.eq(pool:waiting(), 1)
  pool:resume()
  T.eq(f:wait(10), true)
  T.eq(count(d, "ran"), 1)
  -- pause, resume, pause again with work in between.
  pool:submit(counter, dn, "ran", 0.01)
  pool:pause()
  T.eq(count(d, "ran"), 2)
  pool:resume()
  pool:submit(counter, dn, "ran", 0.01)
  h = helper:submit(remote, pool:name(), "pause")
  T.eq(h:wait(10), true, "pause after resume returned")
  T.eq(count(d, "ran"), 3)
  pool:resume()
  T.eq(pool:stop_wait(), 0)
  T.eq(helper:stop_wait(), 0)
end)

case("Pause: on a stopped pool returns at once", function()
  local pool = newpool { max_workers = 2 }
  T.eq(pool:submit_wait(function() return 1 end), 1)
  T.eq(pool:stop(), 0)
  local t0 = workerpool.now()
  pool:pause()
  pool:pause()
  pool:resume()
  T.ok(workerpool.now() - t0 < 5, "pause of a stopped pool returns")
  T.eq(pool:stopped(), true)
  T.eq(pool:workers(), 0)
end)

case("Pause: stop while paused discards what waits", function()
  local d, dn = newdict("pausestop")
  local pool = newpool { max_workers = 2 }
  pool:pause()
  local futs = {}
  for i = 1, 3 do futs[i] = pool:submit(counter, dn, "ran") end
  T.eq(pool:waiting(), 3)
  T.eq(pool:stop(), 3)
  for i = 1, 3 do
    local ok, err = futs[i]:wait(10)
    T.eq(ok, false)
    T.eq(err, "discarded")
  end
  T.eq(d:get("ran"), nil, "nothing ran")
  T.eq(pool:workers(), 0)
end)

case("Pause: stop releases a pause that is still waiting", function()
  local d, dn = newdict("pausestop2")
  local pool = newpool { max_workers = 2 }
  local helper = newpool { max_workers = 1 }
  local b = pool:submit(blocker, dn, true)
  wait_count(d, "started", 1)
  -- The helper's pause waits for the blocker, which waits for stop.
  local h = helper:submit(remote, pool:name(), "pause")
  workerpool.sleep(0.02) -- let it block (harmless if it has not yet)
  T.eq(pool:stop(), 0)
  T.eq(h:wait(10), true, "the waiting pause returned")
  T.eq(b:wait(10), true)
  T.eq(helper:stop_wait(), 0)
end)

case("Pause: stop_wait while paused runs the queued work", function()
  local d, dn = newdict("pausestopwait")
  local pool = newpool { max_workers = 2 }
  pool:pause()
  local futs = {}
  for i = 1, 3 do futs[i] = pool:submit(counter, dn, "ran") end
  T.eq(pool:waiting(), 3)
  stays(function() return pool:workers() == 0 end, 0.05,
    "no worker is started while paused")
  T.eq(pool:stop_wait(), 0)
  T.eq(count(d, "ran"), 3, "queued tasks ran")
  for i = 1, 3 do T.eq(futs[i]:wait(0), true) end
  T.eq(pool:workers(), 0)
end)

case("WorkerLeak: stopped pools leave no threads behind", function()
  -- A joined thread can stay in /proc's count for a moment while the kernel
  -- finishes its exit, hence "eventually".
  local base = threads()
  local function back_to_base(what)
    if not base then return end
    T.eventually(function() return threads() <= base end, 10,
      string.format("%s: threads back to the baseline %d", what, base))
  end
  local pool = newpool { max_workers = 50 }
  for _ = 1, 50 do
    pool:submit(function() require("workerpool").sleep(0.001) end)
  end
  pool:pause()
  pool:resume()
  T.eq(pool:stop_wait(), 0)
  T.eq(pool:workers(), 0)
  back_to_base("50 workers")
  for i = 1, 50 do
    local p = workerpool.new { max_workers = 4 }
    for _ = 1, 8 do p:submit(function() return 1 end) end
    T.eq(p:stop_wait(), 0)
    T.eq(p:workers(), 0, "pool " .. i)
    back_to_base("pool " .. i)
  end
end)

-- ---- submitting, ordering, futures ---------------------------------------

case("submit after stop returns nil, 'stopped' and runs nothing", function()
  local d, dn = newdict("afterstop")
  local pool = newpool { max_workers = 2, init = "function h() end" }
  T.eq(pool:stop(), 0)
  local f, err, name = pool:submit(counter, dn)
  T.eq(f, nil)
  T.eq(err, "stopped")
  T.eq(name, "ESTOPPED")
  local r, err2 = pool:submit_wait(counter, dn)
  T.eq(r, nil)
  T.eq(err2, "stopped")
  T.eq(select(2, pool:submit("h")), "stopped")
  -- The stopped check comes before encoding the arguments.
  T.eq(select(2, pool:submit(counter, coroutine.create(print))), "stopped")
  local p2 = newpool { max_workers = 1 }
  T.eq(p2:stop_wait(), 0)
  T.eq(select(2, p2:submit(counter, dn)), "stopped")
  T.eq(select(2, p2:submit_wait(counter, dn)), "stopped")
  workerpool.sleep(0.02)
  T.eq(d:get("ran"), nil, "nothing ran")
  T.eq(pool:workers(), 0)
  T.eq(p2:workers(), 0)
end)

case("tasks start in FIFO order", function()
  local d, dn = newdict("fifo")
  local pool = newpool { max_workers = 1 }
  pool:submit(blocker, dn)
  for i = 1, 20 do
    pool:submit(function(dname, k)
      local W = require "workerpool"
      local dd = W.shared(dname)
      dd:set("order" .. dd:incr("seq", 1, 0), k)
    end, dn, i)
  end
  wait_count(d, "started", 1)
  d:set("release", true)
  T.eq(pool:stop_wait(), 0)
  T.eq(d:get("seq"), 20)
  for i = 1, 20 do T.eq(d:get("order" .. i), i, "position " .. i) end
end)

case("cancel: a queued task never runs; a running one is interrupted", function()
  local d, dn = newdict("cancel")
  local pool = newpool { max_workers = 1 }
  local f1 = pool:submit(blocker, dn)
  local f2 = pool:submit(counter, dn, "ran2")
  local f3 = pool:submit(counter, dn, "ran3")
  wait_count(d, "started", 1)
  T.eq(pool:waiting(), 2)
  T.eq(f2:cancel(), true, "cancel of a queued task")
  T.eq(f2:done(), true)
  T.eq(f2:status(), "cancelled")
  local ok, err = f2:wait()
  T.eq(ok, false)
  T.eq(err, "cancelled")
  T.eq(f2:cancel(), false, "a second cancel")
  T.eq(pool:waiting(), 1)
  T.eq(f1:cancel(), true, "cancel of a running task")
  d:set("release", true)
  local ok1, err1 = f1:wait(10)
  T.eq(ok1, false)
  T.eq(err1, "cancelled")
  T.eq(f3:wait(10), true)
  T.eq(f1:cancel(), false, "cancel of a finished task")
  T.eq(f3:cancel(), false)
  T.eq(f3:status(), "ok")
  T.eq(pool:stop_wait(), 0)
  T.eq(d:get("ran2"), nil, "the cancelled task never ran")
  T.eq(count(d, "ran3"), 1)
end)

case("f:wait(timeout) times out while the task goes on", function()
  local d, dn = newdict("waittimeout")
  local pool = newpool { max_workers = 1 }
  local f = pool:submit(blocker, dn)
  wait_count(d, "started", 1)
  local r, err = f:wait(0.05)
  T.eq(r, nil)
  T.eq(err, "timeout")
  T.eq(select(2, f:wait(0)), "timeout")
  T.eq(f:done(), false)
  T.eq(f:status(), "pending")
  T.raises(function() f:wait(-1) end, "bad argument #1 to 'wait'")
  d:set("release", true)
  local ok, id = f:wait(10)
  T.eq(ok, true, "the task completed later")
  T.eq(id, 1)
  T.eq(f:wait(0), true)
  T.eq(f:status(), "ok")
  T.eq(pool:stop_wait(), 0)
end)

case("stop wakes a thread waiting on a queued task", function()
  local d, dn = newdict("stopwake")
  local pool = newpool { max_workers = 1 }
  local helper = newpool { max_workers = 1 }
  local f1 = pool:submit(blocker, dn, true)
  local f2 = pool:submit(counter, dn, "ran2")
  wait_count(d, "started", 1)
  -- The helper stops the pool while the host waits on f2.
  local h = helper:submit(function(name)
    local W = require "workerpool"
    local p = assert(W.get(name))
    W.sleep(0.05) -- let the host block in f2:wait (harmless if not yet)
    return p:stop()
  end, pool:name())
  local t0 = workerpool.now()
  local ok, err = f2:wait(10)
  T.eq(ok, false, "the waiter was woken")
  T.eq(err, "discarded")
  T.ok(workerpool.now() - t0 < 9, "woken by stop, not by the timeout")
  local hok, n = h:wait(10)
  T.eq(hok, true)
  T.eq(n, 1)
  T.eq(f1:wait(10), true)
  T.eq(d:get("ran2"), nil)
  -- The one-thread form: stop, then wait.
  local p2 = newpool { max_workers = 1 }
  local d2, dn2 = newdict("stopwake2")
  p2:submit(blocker, dn2, true)
  local q = p2:submit(counter, dn2)
  wait_count(d2, "started", 1)
  T.eq(p2:stop(), 1)
  T.eq(select(2, q:wait(1)), "discarded")
  T.eq(helper:stop_wait(), 0)
end)

case("submit_wait raises when stop discards its task", function()
  local d, dn = newdict("swdiscard")
  local pool = newpool { name = "test_pool.swdiscard", max_workers = 1 }
  local helper = newpool { max_workers = 1 }
  pool:submit(blocker, dn, true)
  wait_count(d, "started", 1)
  local h = helper:submit(function(name)
    local W = require "workerpool"
    local p = assert(W.get(name))
    return pcall(p.submit_wait, p, function() return "ran" end)
  end, pool:name())
  T.eventually(function() return pool:waiting() == 1 end, 10,
    "the helper's task is queued")
  T.eq(pool:stop(), 1)
  local ok, pok, err = h:wait(10)
  T.eq(ok, true)
  T.eq(pok, false, "submit_wait raised")
  T.ok(tostring(err):find("task discarded: pool 'test_pool.swdiscard' was stopped",
    1, true), tostring(err))
  T.eq(helper:stop_wait(), 0)
end)

-- ---- names and handles ------------------------------------------------------

case("get: a usable handle from the host; nil when unknown or stopped", function()
  local pool = newpool { name = "test_pool.get", max_workers = 3 }
  local h = workerpool.get("test_pool.get")
  T.ok(h, "get finds the pool")
  T.eq(h:name(), "test_pool.get")
  T.eq(tostring(h), "workerpool.pool (test_pool.get)")
  T.eq(h:size(), 3)
  T.eq(h:submit_wait(function(a) return a * 2 end, 21), 42)
  T.eq(workerpool.get("test_pool.no-such-pool"), nil)
  T.raises(function() workerpool.get() end, "bad argument #1 to 'get'")
  -- Dropping a borrowed handle does not stop the pool.
  h = nil -- luacheck: ignore 311
  collectgarbage()
  collectgarbage()
  T.eq(pool:stopped(), false)
  T.eq(pool:submit_wait(function() return "ok" end), "ok")
  T.eq(pool:stop(), 0)
  T.eq(workerpool.get("test_pool.get"), nil, "get after stop")
  local p2 = newpool { max_workers = 1 }
  local n2 = p2:name()
  T.ok(workerpool.get(n2), "found before stop_wait")
  T.eq(p2:stop_wait(), 0)
  T.eq(workerpool.get(n2), nil, "get after stop_wait")
end)

case("get from a worker: one pool's task submits to another", function()
  local d, dn = newdict("pipeline")
  local stage2 = newpool { name = "test_pool.stage2", max_workers = 2 }
  local stage1 = newpool { name = "test_pool.stage1", max_workers = 2 }
  T.eq(workerpool.pool_name(), nil, "host: pool_name")
  T.eq(workerpool.worker_id(), nil, "host: worker_id")
  -- A task that waits for the next stage's result.
  local r, name, id = stage1:submit_wait(function(x)
    local W = require "workerpool"
    local s2 = assert(W.get("test_pool.stage2"))
    local ok, y = s2:submit(function(v) return v + 1 end, x * 10):wait()
    assert(ok, y)
    return y, W.pool_name(), W.worker_id()
  end, 4)
  T.eq(r, 41)
  T.eq(name, "test_pool.stage1")
  T.eq(math.type(id), "integer")
  -- Fire and forget: stage 1 hands items to stage 2, which records them.
  for i = 1, 10 do
    stage1:submit(function(dname, v)
      local W = require "workerpool"
      local s2 = assert(W.get("test_pool.stage2"))
      assert(s2:submit(function(dn2, v2)
        local W2 = require "workerpool"
        local dd = W2.shared(dn2)
        dd:set("item" .. v2, W2.pool_name())
        dd:incr("items", 1, 0)
      end, dname, v * v))
    end, dn, i)
  end
  T.eq(stage1:stop_wait(), 0)
  wait_count(d, "items", 10)
  T.eq(stage2:stop_wait(), 0)
  for i = 1, 10 do T.eq(d:get("item" .. i * i), "test_pool.stage2") end
end)

case("names: duplicates raise, generated names are unique", function()
  local p = newpool { name = "test_pool.dup", max_workers = 1 }
  T.eq(p:name(), "test_pool.dup")
  T.raises(function()
    workerpool.new { name = "test_pool.dup", max_workers = 1 }
  end, "a pool named 'test_pool.dup' already exists")
  T.eq(p:stopped(), false, "the first pool is untouched")
  T.eq(p:stop(), 0)
  local p2 = newpool { name = "test_pool.dup", max_workers = 1 }
  T.eq(p2:name(), "test_pool.dup", "a stopped pool's name can be reused")
  T.raises(function() workerpool.new { name = "", max_workers = 1 } end,
    "name must not be empty")
  local seen, last = {}, 0
  for i = 1, 10 do
    local q = newpool { max_workers = 1 }
    local n = q:name()
    local num = tonumber(n:match("^pool%-(%d+)$"))
    T.ok(num, "generated name " .. n)
    T.ok(num > last, "generated names follow creation order")
    last = num
    T.eq(seen[n], nil, "unique name " .. i)
    seen[n] = true
    T.eq(workerpool.get(n):name(), n)
  end
end)

case("<close> performs stop_wait", function()
  local d, dn = newdict("close")
  local ref
  do
    local p <close> = workerpool.new { max_workers = 1 }
    ref = p
    for _ = 1, 5 do p:submit(counter, dn, "ran", 0.01) end
  end
  T.eq(count(d, "ran"), 5, "tasks queued before close all ran")
  T.eq(ref:stopped(), true)
  T.eq(ref:workers(), 0)
end)

case("<close> on a borrowed handle performs stop_wait too", function()
  local d, dn = newdict("closeborrowed")
  local pool = newpool { max_workers = 1 }
  do
    local h <close> = workerpool.get(pool:name())
    for _ = 1, 3 do h:submit(counter, dn, "ran", 0.01) end
  end
  T.eq(count(d, "ran"), 3)
  T.eq(pool:stopped(), true)
  T.eq(pool:workers(), 0)
end)

case("collecting an unreferenced pool performs stop_wait", function()
  local d, dn = newdict("gc")
  local name
  local futs
  -- Made in a function of its own so that no stack slot keeps the handle.
  local function start()
    local p = workerpool.new { max_workers = 1 }
    name = p:name()
    local fs = {}
    for i = 1, 5 do fs[i] = p:submit(counter, dn, "ran", 0.01) end
    return fs
  end
  futs = start()
  collectgarbage()
  collectgarbage()
  T.eq(count(d, "ran"), 5, "queued tasks ran")
  for i = 1, 5 do T.eq(futs[i]:wait(0), true, "future " .. i) end
  T.eq(workerpool.get(name), nil, "the pool is gone")
end)

-- ---- options --------------------------------------------------------------

case("new: max_workers must be a positive integer", function()
  local msg = "max_workers must be a positive integer"
  T.raises(function() workerpool.new {} end, msg, "missing")
  T.raises(function() workerpool.new { max_workers = 0 } end, msg, "0")
  T.raises(function() workerpool.new { max_workers = -1 } end, msg, "-1")
  T.raises(function() workerpool.new { max_workers = 1.5 } end, msg, "1.5")
  T.raises(function() workerpool.new { max_workers = "4" } end, msg, '"4"')
  T.raises(function() workerpool.new { max_workers = true } end, msg, "true")
  T.raises(function() workerpool.new { max_workers = 0 / 0 } end, msg, "nan")
  T.raises(function() workerpool.new { max_workers = 10001 } end, msg,
    "too many")
  T.raises(function() workerpool.new() end, "bad argument #1 to 'new'")
  local p = newpool { max_workers = 2.0 }
  T.eq(p:size(), 2, "an integral float is accepted")
end)

case("new: other options are checked", function()
  T.raises(function() workerpool.new { max_workers = 1, bogus = 1 } end,
    "unknown option 'bogus'")
  T.raises(function() workerpool.new { max_workers = 1, [1] = 1 } end,
    "unknown option")
  T.raises(function()
    workerpool.new { max_workers = 2, min_workers = 3 }
  end, "min_workers must be an integer from 0 to max_workers")
  T.raises(function()
    workerpool.new { max_workers = 2, min_workers = -1 }
  end, "min_workers must be an integer from 0 to max_workers")
  T.raises(function()
    workerpool.new { max_workers = 1, idle_timeout = "1" }
  end, "idle_timeout must be a number")
  T.raises(function()
    workerpool.new { max_workers = 1, idle_timeout = 0 / 0 }
  end, "idle_timeout must be a number")
  T.raises(function() workerpool.new { max_workers = 1, name = 5 } end,
    "name must be a string")
  T.raises(function() workerpool.new { max_workers = 1, init = 5 } end,
    "init must be a string")
  T.raises(function()
    workerpool.new { max_workers = 1, init = "", init_file = "x" }
  end, "mutually exclusive")
end)

case("new: a broken init makes new raise", function()
  local err = T.raises(function()
    workerpool.new { name = "test_pool.badinit", max_workers = 1,
      init = "x = = 1" }
  end, "init failed")
  T.ok(err:find("init:1:", 1, true), "syntax error names the chunk: " .. err)
  err = T.raises(function()
    workerpool.new { name = "test_pool.badinit", max_workers = 1,
      init = "local function f() error('boom in init') end\nf()" }
  end, "boom in init")
  T.ok(err:find("init failed", 1, true), err)
  T.ok(err:find("stack traceback", 1, true), "a traceback: " .. err)
  T.eq(workerpool.get("test_pool.badinit"), nil, "no pool was registered")
  local p = newpool { name = "test_pool.badinit", max_workers = 1,
    init = "function add(a, b) return a + b end" }
  T.eq(p:submit_wait("add", 2, 3), 5, "the name is free after a failed init")
  local ok, e = p:submit("nope"):wait(10)
  T.eq(ok, false)
  T.ok(e:find("no handler 'nope'", 1, true), e)
end)

case("new: init_file", function()
  local path = os.tmpname()
  local fh = assert(io.open(path, "w"))
  fh:write("function triple(x) return 3 * x end\nloaded_from = ...\n")
  fh:close()
  local p = newpool { max_workers = 2, init_file = path }
  T.eq(p:submit_wait("triple", 14), 42)
  os.remove(path)
  T.raises(function()
    workerpool.new { max_workers = 1, init_file = path }
  end, "cannot read init_file '" .. path .. "'")
  fh = assert(io.open(path, "w"))
  fh:write("\n\nerror('bad file')\n")
  fh:close()
  local err = T.raises(function()
    workerpool.new { max_workers = 1, init_file = path }
  end, "bad file")
  T.ok(err:find(path .. ":3:", 1, true), "names the file and line: " .. err)
  os.remove(path)
end)

case("workers inherit package.path and package.cpath", function()
  local old_path, old_cpath = package.path, package.cpath
  package.path = "/nonexistent/test_pool/?.lua;" .. old_path
  local ok, p = pcall(workerpool.new, { max_workers = 1 })
  package.path = old_path
  T.ok(ok, tostring(p))
  S.track(p)
  local path, cpath = p:submit_wait(function()
    return package.path, package.cpath
  end)
  T.eq(path, "/nonexistent/test_pool/?.lua;" .. old_path)
  T.eq(cpath, old_cpath)
  T.eq(p:stop_wait(), 0)
end)

-- ---- calls a pool's own worker must not make ------------------------------

case("post: queues the task without a future and answers true", function()
  local d, dn = newdict("post")
  local p = newpool { max_workers = 2, init = "function bump(dn) "
    .. "return require('workerpool').shared(dn):incr('ran', 1, 0) end" }
  for _ = 1, 50 do T.eq(p:post(counter, dn), true) end
  for _ = 1, 50 do T.eq(p:post("bump", dn), true) end
  T.eq(p:post({ handler = "bump", name = "named" }, dn), true, "descriptor")
  wait_count(d, "ran", 101)
  T.eq(p:stats().submitted, 101)
  -- A task that fails has nobody to tell but the log; the pool goes on.
  T.eq(p:post(function() error("nobody waits") end), true)
  T.eq(p:submit_wait(function() return "still here" end), "still here")
  T.eq(p:stop_wait(), 0)
  local f, err, code = p:post(counter, dn)
  T.eq(f, nil)
  T.eq(err, "stopped")
  T.eq(code, "ESTOPPED")
end)

case("post: bad tasks and arguments raise as they do for submit", function()
  local p = newpool { max_workers = 1 }
  T.raises(function() p:post() end, "bad argument")
  T.raises(function() p:post(12) end,
    "bad argument #1 to 'post' (handler name or Lua function expected")
  T.raises(function() p:post(print) end, "Lua function expected")
  T.raises(function() p:post({ fn = 1 }) end, "fn must be a Lua function")
  T.raises(function() p:post(function() end, coroutine.create(print)) end,
    "cannot send a thread")
  T.raises(function() p.post({}, "x") end, "workerpool.pool expected")
  T.raises(function() p.post(io.stdout, "x") end, "workerpool.pool expected")
  T.eq(p:stats().submitted, 0, "nothing was queued")
end)

case("post: a full queue answers nil, \"full\"", function()
  local d, dn = newdict("postfull")
  local p = newpool { max_workers = 1, queue_cap = 1 }
  T.eq(p:post(blocker, dn), true)
  wait_count(d, "started", 1)
  T.eq(p:post(blocker, dn), true, "fits in the queue")
  local ok, err, code = p:post(blocker, dn)
  T.eq(ok, nil)
  T.eq(err, "full")
  T.eq(code, "EFULL")
  d:set("release", true)
  wait_count(d, "finished", 2)
end)

case("map: results in list order, in ceil(n / chunk) tasks", function()
  local p = newpool { max_workers = 2, init = "function sq(x) return x * x end" }
  local list = {}
  for i = 1, 1000 do list[i] = i end
  local r = p:map("sq", list)
  T.eq(#r, 1000)
  for i = 1, 1000 do T.eq(r[i], i * i, "item " .. i) end
  local before = p:stats().submitted
  r = p:map(function(x) return -x end, list, { chunk = 7 })
  for i = 1, 1000 do T.eq(r[i], -i) end
  T.eq(p:stats().submitted - before, 143, "ceil(1000 / 7) tasks")
  before = p:stats().submitted
  r = p:map(function(x) return x .. "!" end, { "a", "b" }, { chunk = 50 })
  T.eq(r[1], "a!")
  T.eq(r[2], "b!")
  T.eq(p:stats().submitted - before, 1, "one task for a short list")
  -- Default chunks: 4 per worker, at most 1024 items each.
  before = p:stats().submitted
  p:map("sq", list)
  T.eq(p:stats().submitted - before, 8)
  local big = {}
  for i = 1, 20000 do big[i] = i end
  before = p:stats().submitted
  T.eq(p:map("sq", big)[20000], 400000000)
  T.eq(p:stats().submitted - before, 20, "1024 items a task")
  -- An empty list submits nothing; nil results leave holes.
  before = p:stats().submitted
  T.eq(next(p:map("sq", {})), nil)
  T.eq(p:stats().submitted, before)
  r = p:map(function(x) if x % 2 == 0 then return x end end, { 1, 2, 3, 4 }, { chunk = 3 })
  T.eq(r[1], nil)
  T.eq(r[2], 2)
  T.eq(r[3], nil)
  T.eq(r[4], 4)
  -- Registered C functions and tables cross like any argument.
  T.eq(p:map(math.sqrt, { 4, 9 })[2], 3.0)
  T.eq(p:map(function(t) return t.a + t.b end, { { a = 1, b = 2 } })[1], 3)
end)

case("map: the first failing item raises, named; later chunks are cancelled", function()
  local d, dn = newdict("map")
  local p = newpool { max_workers = 1 }
  local list = {}
  for i = 1, 40 do list[i] = i end
  local ok, err = pcall(p.map, p, function(x)
    if x == 7 or x == 30 then error("bad " .. x) end
    return x
  end, list, { chunk = 5 })
  T.eq(ok, false)
  T.ok(err:find("^item #7: .*bad 7"), err)
  T.ok(err:find("stack traceback", 1, true), "with the worker's traceback")
  -- A non-string error value is raised by its tostring (issue 14).
  ok, err = pcall(p.map, p, function(x)
    local mt = { __tostring = function(e) return "code " .. e.code end }
    if x == 3 then error(setmetatable({ code = x }, mt)) end
  end, list, { chunk = 2 })
  T.eq(ok, false)
  T.ok(err:find("^item #3: code 3"), err)
  -- Chunks after the failing one are cancelled: the one running is
  -- interrupted or ends, the queued ones never start.
  local gate = T.gate
  ok, err = pcall(p.map, p, function(x)
    if x == 1 then error("first") end
    gate(dn, "go") -- gate and dn: upvalues, copied
    require("workerpool").shared(dn):incr("ran", 1, 0)
  end, list, { chunk = 1 })
  T.eq(ok, false)
  T.ok(err:find("^item #1: "), err)
  d:set("go", true)
  T.eq(p:submit_wait(function() return "idle" end), "idle")
  local ran = d:get("ran") or 0
  T.ok(ran <= 1, "at most the chunk running then ran (" .. ran .. " did)")
  -- A missing handler fails its chunks.
  ok, err = pcall(p.map, p, "nope", { 1, 2 }, { chunk = 2 })
  T.eq(ok, false)
  T.ok(err:find("items #1-#2: no handler 'nope'", 1, true), err)
end)

case("map: bad arguments raise; a stopped or full pool answers nil, err", function()
  local d, dn = newdict("mapfull")
  local p = newpool { max_workers = 1, queue_cap = 2 }
  T.raises(function() p:map(1, {}) end,
    "bad argument #1 to 'map' (handler name or function expected, got number)")
  T.raises(function() p:map("f", "list") end, "bad argument #2 to 'map' (table expected")
  T.raises(function() p:map("f", {}, 5) end, "bad argument #3 to 'map'")
  T.raises(function() p:map("f", {}, { chunk = 0 }) end, "chunk must be a positive integer")
  T.raises(function() p:map("f", {}, { chunk = 1.5 }) end, "chunk must be a positive integer")
  T.raises(function() p:map("f", {}, { size = 1 }) end, "unknown option 'size'")
  T.raises(function() p:map(function() end, { 1, 2, coroutine.create(print) }, { chunk = 2 }) end,
    "bad argument #2 to 'map' (items #3-#3: cannot send a thread")
  T.raises(function() p:map(function() return coroutine.create(print) end, { 1 }) end,
    "items #1-#1: task result #1 cannot be returned")
  T.raises(function() p.map({}, "f", {}) end, "workerpool.pool expected")
  T.eq(p:stats().queued, 0, "nothing was left queued")
  -- Full: the chunks queued before the refusal are cancelled.
  T.eq(p:post(blocker, dn), true)
  wait_count(d, "started", 1)
  local r, err, code = p:map(function(x) return x end, { 1, 2, 3, 4 }, { chunk = 1 })
  T.eq(r, nil)
  T.eq(err, "full")
  T.eq(code, "EFULL")
  T.eq(p:waiting(), 0, "the two that fitted were cancelled")
  d:set("release", true)
  wait_count(d, "finished", 1)
  T.eq(p:stop_wait(), 0)
  r, err, code = p:map("f", { 1 })
  T.eq(r, nil)
  T.eq(err, "stopped")
  T.eq(code, "ESTOPPED")
end)

case("methods check the class of self: other userdata and tables raise", function()
  local p = newpool { max_workers = 1 }
  local f = p:submit(function() return 1 end)
  T.eq(f:wait(10), true)
  -- A pool and a future are full userdata of the same size; io.stdout is
  -- smaller; a light userdata (debug.upvalueid makes one) has a pointer
  -- that must never be read as a handle.
  local light = debug.upvalueid(function() return T end, 1)
  T.eq(type(light), "userdata")
  for _, bad in ipairs { io.stdout, f, {}, 1, "x", light } do
    T.raises(function() p.submit(bad, "x") end, "workerpool.pool expected")
    T.raises(function() p.stats(bad) end, "workerpool.pool expected")
  end
  for _, bad in ipairs { io.stdout, p, {}, 1, light, string.rep("x", 24) } do
    T.raises(function() f.wait(bad) end, "workerpool.future expected")
    T.raises(function() f.status(bad) end, "workerpool.future expected")
  end
  local live = p:submit(function() return {} end) -- a table: never detached
  T.eq(live:wait(10), true)
  T.raises(function() getmetatable(live).__gc(io.stdout) end, "workerpool.future expected")
  T.raises(function() getmetatable(p).__gc(io.stdout) end, "workerpool.pool expected")
  T.eq(f:status(), "ok", "f unharmed")
  T.eq(p:submit_wait(function() return 2 end), 2, "p unharmed")
end)

case("a waited future keeps a small result itself; every method still works", function()
  local p = newpool { max_workers = 1 }
  local kinds = {
    { function() return 7 end, 7 }, { function() return 2.5 end, 2.5 },
    { function() return true end, true }, { function() return false end, false },
    { function() return nil end, nil }, { function() end },
  }
  for i, k in ipairs(kinds) do
    local f = p:submit(k[1])
    local r = table.pack(f:wait(10))
    local n = k[1] == kinds[6][1] and 1 or 2
    T.eq(r.n, n, "case " .. i)
    T.eq(r[1], true)
    T.eq(r[2], k[2])
    T.eq(getmetatable(f).__gc, nil, "detached: no finalizer")
    T.eq(getmetatable(f).__name, "workerpool.future")
    T.ok(tostring(f):find("^workerpool.future: "), tostring(f))
    -- Again, and with a timeout: the same values, the same types.
    for _, again in ipairs { table.pack(f:wait()), table.pack(f:wait(0)) } do
      T.eq(again.n, n)
      T.eq(again[1], true)
      T.eq(again[2], k[2])
      T.eq(math.type(again[2]), math.type(k[2]))
    end
    T.eq(f:status(), "ok")
    T.eq(f:done(), true)
    T.eq(f:cancel(), false)
    T.eq(f:degraded(), false)
    T.raises(function() f:on_done(function() end) end, "on_done")
    T.raises(function() f:wait(-1) end, "non-negative")
  end
  -- What does not fit stays with the core future, finalizer and all.
  for _, task in ipairs {
    function() return 1, 2 end, function() return "s" end,
    function() return {} end, function() error("boom") end,
  } do
    local f = p:submit(task)
    f:wait(10)
    T.ok(getmetatable(f).__gc, "kept live")
    local a = table.pack(f:wait())
    local b = table.pack(f:wait())
    T.eq(a.n, b.n)
    T.eq(a[1], b[1])
  end
  -- submit_wait detaches its own future; its values are the task's.
  local a, b = p:submit_wait(function() return 9 end)
  T.eq(a, 9)
  T.eq(b, nil)
  T.eq(select("#", p:submit_wait(function() end)), 0)
  T.eq(select("#", p:submit_wait(function() return nil end)), 1)
  -- Many detached futures, kept and then dropped: all of them collected.
  local futs = {}
  for i = 1, 2000 do futs[i] = p:submit(function(x) return x end, i) end
  local sum = 0
  for i = 1, 2000 do sum = sum + select(2, futs[i]:wait()) end
  T.eq(sum, 2000 * 2001 // 2)
  local weak = setmetatable({ futs[1] }, { __mode = "v" })
  futs = nil -- luacheck: ignore
  collectgarbage()
  collectgarbage()
  T.eq(weak[1], nil, "a detached future is collected")
  T.eq(p:stop_wait(), 0)
end)

case("own worker: submit_wait, stop, stop_wait, pause and map raise", function()
  local d, dn = newdict("own")
  local pool = newpool { max_workers = 2 }
  local res = { pool:submit_wait(function(dname)
    local W = require "workerpool"
    local p = assert(W.get(W.pool_name()))
    local out = {}
    for _, m in ipairs { "submit_wait", "stop", "stop_wait", "pause", "map" } do
      local ok, err
      if m == "submit_wait" then
        ok, err = pcall(p.submit_wait, p, function() end)
      elseif m == "map" then
        ok, err = pcall(p.map, p, function(x) return x end, { 1 })
      else
        ok, err = pcall(p[m], p)
      end
      out[#out + 1] = ok and (m .. " returned") or tostring(err)
    end
    -- resume is allowed (a no-op here); submit is fine: it only queues.
    out[#out + 1] = pcall(p.resume, p) and "resumed" or "resume raised"
    out[#out + 1] = p:submit(function(dn2)
      require("workerpool").shared(dn2):set("self-submitted", true)
    end, dname) and "submitted" or "submit failed"
    return table.unpack(out)
  end, dn) }
  local methods = { "submit_wait", "stop", "stop_wait", "pause", "map" }
  for i, m in ipairs(methods) do
    T.ok(res[i]:find("deadlock", 1, true), m .. ": " .. res[i])
    T.ok(res[i]:find(m, 1, true), m .. " named: " .. res[i])
  end
  T.eq(res[6], "resumed")
  T.eq(res[7], "submitted")
  T.eq(pool:stopped(), false, "the pool still runs")
  T.eq(pool:submit_wait(function() return 1 end), 1)
  T.eq(pool:stop_wait(), 0)
  T.eq(d:get("self-submitted"), true)
end)

T.run()
