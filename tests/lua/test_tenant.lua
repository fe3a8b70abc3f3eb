-- test_tenant.lua: workerpool.tenant, the per-tenant token bucket and
-- concurrency cap (docs/policies.md).
--
-- Time is a shared fake clock (workerpool.clock.shared) moved by the test,
-- so refills are exact: rates and steps are powers of two, whose sums are
-- exact in floating point. Each case uses dictionaries of its own.
-- Tasks block on a gate: they poll a shared dictionary key the test sets.

local T = require "harness"
local wp = require "workerpool"
local tenant = require "workerpool.tenant"
local clock = require "workerpool.clock"

local fresh = T.policy_helpers("tenant")

-- A fake clock shared by every state that opens `name`.
local function fake_clock()
  local name = fresh("clock")
  return clock.shared(name), name
end

local function newpool(opts)
  opts.idle_timeout = opts.idle_timeout or 60
  return wp.new(opts)
end

local function noop() end

-- Blocks until key `k` of dict `dname` is set.
local function gate(dname, k)
  local W = require "workerpool"
  local d = W.shared(dname)
  local deadline = W.now() + 30
  while not d:get(k) do
    if W.now() > deadline then error("gate never opened") end
    W.sleep(0.001)
  end
  return true
end

-- A task that loops until its deadline interrupts it. The loop calls
-- workerpool.now(): under TSan a signal reaches a thread only when it calls
-- an intercepted function, and the deadline's interrupt is signal-driven,
-- so a bare `while true do end` would only end by being declared stuck.
local function spin()
  local W = require "workerpool"
  while true do W.now() end
end

-- ---- token bucket ---------------------------------------------------------

T.test("bucket: starts full at burst, refuses with rate_limited, refills at rate", function()
  local c = fake_clock()
  local b = tenant.bucket { rate = 2, burst = 3, dict = fresh("b"), clock = c }
  local p = newpool { max_workers = 1 }
  p:use(b)
  T.eq(b:remaining("acme"), 3.0, "full at burst before any admission")
  for i = 1, 3 do T.ok(p:submit { fn = noop, tenant = "acme" }, "admission " .. i) end
  local f, why = p:submit { fn = noop, tenant = "acme" }
  T.eq(f, nil)
  T.eq(why, "rate_limited")
  T.eq(b:remaining("acme"), 0.0)
  c.advance(0.25) -- half a token: continuous refill, still not enough
  T.eq(b:remaining("acme"), 0.5)
  T.eq(select(2, p:submit { fn = noop, tenant = "acme" }), "rate_limited")
  c.advance(0.25)
  T.eq(b:remaining("acme"), 1.0)
  T.ok(p:submit { fn = noop, tenant = "acme" }, "one token, one admission")
  T.eq(b:remaining("acme"), 0.0)
  c.advance(100)
  T.eq(b:remaining("acme"), 3.0, "refill stops at burst")
  T.eq(p:stats().dropped.rate_limited, 2, "each refusal is a rate_limited drop")
  T.eq(p:stats().dropped.policy, 0)
  T.eq(p:stop_wait(), 0)
end)

T.test("bucket: submit_wait raises the reason; nothing runs", function()
  local c = fake_clock()
  local dn = fresh("ran")
  local p = newpool { max_workers = 1 }
  p:use(tenant.bucket { rate = 1, burst = 1, dict = fresh("b"), clock = c })
  local task = function(d) return require("workerpool").shared(d):incr("ran", 1, 0) end
  T.eq(p:submit_wait({ fn = task, tenant = "x" }, dn), 1)
  local ok, err = pcall(p.submit_wait, p, { fn = task, tenant = "x" }, dn)
  T.eq(ok, false)
  T.eq(err, "rate_limited")
  T.eq(p:stop_wait(), 0)
  T.eq(wp.shared(dn):get("ran"), 1, "the refused task never ran")
end)

T.test("bucket: tenants are separate; tasks without a tenant share '-'", function()
  local c = fake_clock()
  local b = tenant.bucket { rate = 1, burst = 2, dict = fresh("b"), clock = c }
  local p = newpool { max_workers = 1 }
  p:use(b)
  T.ok(p:submit { fn = noop, tenant = "a" })
  T.ok(p:submit { fn = noop, tenant = "a" })
  T.eq(select(2, p:submit { fn = noop, tenant = "a" }), "rate_limited")
  T.ok(p:submit { fn = noop, tenant = "b" }, "b has its own bucket")
  T.ok(p:submit(noop), "plain task")
  T.ok(p:submit { fn = noop, name = "named" }, "descriptor without tenant")
  T.eq(select(2, p:submit(noop)), "rate_limited", "both took from '-'")
  T.eq(b:remaining(nil), 0.0)
  T.eq(b:remaining("-"), 0.0, "the key of tasks without a tenant")
  T.eq(b:remaining("b"), 1.0)
  T.eq(b:remaining("never seen"), 2.0)
  T.eq(p:stop_wait(), 0)
end)

T.test("bucket: overrides per tenant, partial overrides, default table", function()
  local c = fake_clock()
  local b = tenant.bucket { rate = 1, burst = 1, dict = fresh("b"), clock = c,
    overrides = { big = { rate = 4, burst = 4 }, wide = { burst = 3 }, ["-"] = { burst = 2 } } }
  T.eq(b:remaining("big"), 4.0)
  T.eq(b:remaining("wide"), 3.0)
  T.eq(b:remaining(nil), 2.0, "an override for tasks without tenant")
  T.eq(b:remaining("other"), 1.0)
  local p = newpool { max_workers = 1 }
  p:use(b)
  for _ = 1, 4 do T.ok(p:submit { fn = noop, tenant = "big" }) end
  for _ = 1, 3 do T.ok(p:submit { fn = noop, tenant = "wide" }) end
  T.eq(select(2, p:submit { fn = noop, tenant = "big" }), "rate_limited")
  T.eq(select(2, p:submit { fn = noop, tenant = "wide" }), "rate_limited")
  c.advance(0.5)
  T.eq(b:remaining("big"), 2.0, "big refills at its own rate")
  T.eq(b:remaining("wide"), 0.5, "wide keeps the default rate")
  -- default = {...} instead of rate/burst
  local b2 = tenant.bucket { default = { rate = 8, burst = 2 }, dict = fresh("b"), clock = c,
    overrides = { vip = { burst = 16 } } }
  T.eq(b2:remaining("anyone"), 2.0)
  T.eq(b2:remaining("vip"), 16.0)
  T.eq(b2:config("vip").rate, 8, "partial override takes the default's rate")
  T.eq(p:stop_wait(), 0)
end)

T.test("bucket: cost as a number or a function of the task", function()
  local c = fake_clock()
  local b = tenant.bucket { rate = 1, burst = 4, cost = 2, dict = fresh("b"), clock = c }
  local p = newpool { max_workers = 1 }
  p:use(b)
  T.ok(p:submit { fn = noop, tenant = "a" })
  T.eq(b:remaining("a"), 2.0)
  T.ok(p:submit { fn = noop, tenant = "a" })
  T.eq(select(2, p:submit { fn = noop, tenant = "a" }), "rate_limited")
  c.advance(1)
  T.eq(select(2, p:submit { fn = noop, tenant = "a" }), "rate_limited", "1 token < cost 2")
  c.advance(1)
  T.ok(p:submit { fn = noop, tenant = "a" })
  T.eq(p:stop_wait(), 0)

  local seen
  local b2 = tenant.bucket { rate = 1, burst = 4, dict = fresh("b"), clock = c,
    cost = function(task)
      seen = task
      return task.name == "heavy" and 3 or (task.name == "free" and 0 or 1)
    end }
  local p2 = newpool { max_workers = 1, name = fresh("pool") }
  p2:use(b2)
  T.ok(p2:submit { fn = noop, tenant = "t", name = "heavy" })
  T.eq(seen.name, "heavy")
  T.eq(seen.tenant, "t")
  T.eq(seen.pool, p2:name(), "task carries the pool's name")
  T.eq(b2:remaining("t"), 1.0)
  T.eq(select(2, p2:submit { fn = noop, tenant = "t", name = "heavy" }), "rate_limited")
  T.ok(p2:submit { fn = noop, tenant = "t", name = "light" })
  for _ = 1, 5 do T.ok(p2:submit { fn = noop, tenant = "t", name = "free" }, "cost 0") end
  -- more than burst can never pass, however long one waits (as x/time/rate)
  c.advance(1000)
  local b3 = tenant.bucket { rate = 1, burst = 2, cost = 3, dict = fresh("b"), clock = c }
  local p3 = newpool { max_workers = 1 }
  p3:use(b3)
  T.eq(select(2, p3:submit(noop)), "rate_limited")
  T.eq(b3:remaining(nil), 2.0, "a refusal takes nothing")
  -- a cost function returning garbage raises from submit
  local p4 = newpool { max_workers = 1 }
  p4:use(tenant.bucket { rate = 1, burst = 2, dict = fresh("b"), cost = function() return -1 end })
  T.raises(function() p4:submit(noop) end, "cost function returned -1")
  for _, q in ipairs { p2, p3, p4 } do T.eq(q:stop_wait(), 0) end
end)

T.test("bucket: a clock read older than the record refills nothing", function()
  local c = fake_clock()
  c.set(10)
  local b = tenant.bucket { rate = 1, burst = 2, dict = fresh("b"), clock = c }
  local p = newpool { max_workers = 1 }
  p:use(b)
  T.ok(p:submit(noop))
  T.ok(p:submit(noop))
  c.set(5) -- another state's stale reading looks like this
  T.eq(b:remaining(nil), 0.0)
  T.eq(select(2, p:submit(noop)), "rate_limited")
  c.set(10.5)
  T.eq(b:remaining(nil), 0.5, "refill counts from the record's time, once")
  T.eq(p:stop_wait(), 0)
end)

T.test("bucket: rate = math.huge admits everything", function()
  local b = tenant.bucket { rate = math.huge, burst = 1, dict = fresh("b") }
  local p = newpool { max_workers = 1 }
  p:use(b)
  for _ = 1, 20 do T.ok(p:submit(noop)) end
  T.eq(b:remaining("x"), math.huge)
  T.eq(p:stop_wait(), 0)
end)

T.test("bucket: argument errors", function()
  T.raises(function() tenant.bucket() end, "tenant.bucket: options must be a table")
  T.raises(function() tenant.bucket { burst = 1 } end,
    "tenant.bucket: rate must be a positive number (got nil)")
  T.raises(function() tenant.bucket { rate = 0, burst = 1 } end, "rate must be a positive number")
  T.raises(function() tenant.bucket { rate = "1", burst = 1 } end, "rate must be a positive")
  T.raises(function() tenant.bucket { rate = 0 / 0, burst = 1 } end, "rate must be a positive")
  T.raises(function() tenant.bucket { rate = 1 } end,
    "tenant.bucket: burst must be a positive finite number (got nil)")
  T.raises(function() tenant.bucket { rate = 1, burst = -2 } end, "burst must be a positive finite")
  T.raises(function() tenant.bucket { rate = 1, burst = math.huge } end, "burst must be a positive")
  T.raises(function() tenant.bucket { rate = 1, burst = 1, brust = 2 } end,
    "tenant.bucket: unknown option 'brust'")
  T.raises(function() tenant.bucket { rate = 1, burst = 1, default = { rate = 1, burst = 1 } } end,
    "give either rate and burst or default, not both")
  T.raises(function() tenant.bucket { rate = 1, burst = 1, overrides = { a = { rate = -1 } } } end,
    "overrides.a.rate must be a positive number")
  T.raises(function() tenant.bucket { rate = 1, burst = 1, overrides = { a = { limit = 1 } } } end,
    "overrides.a: unknown field 'limit'")
  T.raises(function() tenant.bucket { rate = 1, burst = 1, overrides = { a = 5 } } end,
    "overrides.a must be a table")
  T.raises(function() tenant.bucket { rate = 1, burst = 1, cost = -1 } end,
    "cost must be a non-negative number or a function(task)")
  T.raises(function() tenant.bucket { rate = 1, burst = 1, dict = "" } end,
    "dict must be a non-empty string")
  T.raises(function() tenant.bucket { rate = 1, burst = 1, clock = 5 } end,
    "clock must be a function or a table with a now() function")
  T.raises(function() tenant.bucket { rate = 1, burst = 1, capacity = 1.5 } end,
    "capacity must be a positive integer")
end)

T.test("bucket: a worker state submitting to the pool passes the host's bucket", function()
  local c, cname = fake_clock()
  local dname = fresh("b")
  local b = tenant.bucket { rate = 1, burst = 4, dict = dname, clock = c }
  local target = newpool { max_workers = 1, name = fresh("target") }
  target:use(b)
  T.ok(target:submit { fn = noop, tenant = "t" })
  local other = newpool { max_workers = 1 }
  local got = table.pack(other:submit_wait(function(dn, cn, tname)
    local W = require "workerpool"
    local bk = W.tenant.bucket { rate = 1, burst = 4, dict = dn,
      clock = require("workerpool.clock").shared(cn) }
    local seen = bk:remaining("t")
    local pool = W.get(tname) -- no policy attached here: the pool's apply
    local admitted = 0
    while pool:submit { fn = function() end, tenant = "t" } do admitted = admitted + 1 end
    return seen, admitted, select(2, pool:submit { fn = function() end, tenant = "t" })
  end, dname, cname, target:name()))
  T.eq(got[1], 3.0, "the worker sees the host's admission")
  T.eq(got[2], 3, "and takes exactly what is left")
  T.eq(got[3], "rate_limited")
  T.eq(b:remaining("t"), 0.0, "the host sees the worker's admissions")
  T.eq(select(2, target:submit { fn = noop, tenant = "t" }), "rate_limited")
  T.eq(other:stop_wait(), 0)
  T.eq(target:stop_wait(), 0)
end)

-- The property of the issue, measured: 4 worker states and the host submit
-- as fast as they can, each through its own bucket object on the same
-- dictionary, while the host moves the shared clock. Every admission's
-- clock reading is recorded (the bucket reads the clock once per attempt,
-- so the last reading before a successful submit is the one it used), and
-- over every interval [t_i, t_j] the count must stay within
-- burst + rate * (t_j - t_i).
T.test("bucket: never more than burst + rate*t over any interval, 4 workers + host",
  function()
    local RATE, BURST, STEP, STEPS = 256, 8, 1 / 256, 300
    local c, cname = fake_clock()
    local dname, ctlname = fresh("b"), fresh("ctl")
    local ctl = wp.shared(ctlname)
    local target = newpool { max_workers = 2, name = fresh("target") }
    local submitters = newpool { max_workers = 4, min_workers = 4 }

    local function make(cn)
      local shared = require("workerpool.clock").shared(cn)
      local rec = { last = nil }
      rec.now = function()
        rec.last = shared.now()
        return rec.last
      end
      return rec
    end

    local hammer = function(dn, cn, ctln, tname, rate, burst)
      local W = require "workerpool"
      local shared = require("workerpool.clock").shared(cn)
      local rec = {}
      rec.now = function()
        rec.last = shared.now()
        return rec.last
      end
      local bk = W.tenant.bucket { rate = rate, burst = burst, dict = dn, clock = rec }
      local pool = W.get(tname):use(bk)
      local d = W.shared(ctln)
      d:incr("ready", 1, 0)
      local times, tries = {}, 0
      while not d:get("stop") do
        tries = tries + 1
        if pool:submit { fn = function() end, tenant = "acme" } then
          times[#times + 1] = rec.last
        end
      end
      return times, tries
    end

    local fs = {}
    for i = 1, 4 do
      fs[i] = submitters:submit(hammer, dname, cname, ctlname, target:name(), RATE, BURST)
    end
    T.eventually(function() return ctl:get("ready") == 4 end, 30, "4 submitters running")
    local rec = make(cname)
    local b = tenant.bucket { rate = RATE, burst = BURST, dict = dname, clock = rec }
    target:use(b)
    local times, tries = {}, 0
    local function host_submit()
      tries = tries + 1
      if target:submit { fn = noop, tenant = "acme" } then times[#times + 1] = rec.last end
    end
    for _ = 1, STEPS do
      c.advance(STEP)
      host_submit()
      -- let the submitters drain what the step refilled
      local deadline = wp.now() + 10
      while b:remaining("acme") >= 1 and wp.now() < deadline do
        host_submit()
        wp.sleep(0.0002)
      end
    end
    ctl:set("stop", true)
    local per = { "host " .. #times .. "/" .. tries }
    for i = 1, 4 do
      local ok, ts, nt = fs[i]:wait()
      T.ok(ok, tostring(ts))
      T.ok(nt > 0, "worker " .. i .. " submitted")
      per[#per + 1] = string.format("worker%d %d/%d", i, #ts, nt)
      tries = tries + nt
      table.move(ts, 1, #ts, #times + 1, times)
    end
    per = table.concat(per, ", ") -- admitted/attempted per state, for messages
    table.sort(times)
    local elapsed = c.now()
    local bound = BURST + RATE * elapsed
    -- measured: every interval between two admissions
    local worst = -math.huge
    for i = 1, #times do
      for j = i, #times do
        local excess = (j - i + 1) - (BURST + RATE * (times[j] - times[i]))
        if excess > worst then worst = excess end
      end
    end
    T.ok(worst <= 1e-9, string.format("an interval admitted %g more than the bound (%s)",
      worst, per))
    T.eq(#times, math.floor(bound), "every refilled token was taken (" .. per .. ")")
    T.ok(tries > #times * 2, "most attempts were refused (" .. per .. ")")
    -- the pool counted what the states saw
    T.eq(target:stats().dropped.rate_limited, tries - #times, "dropped.rate_limited = refusals")
    T.eq(submitters:stop_wait(), 0)
    T.eq(target:stop_wait(), 0)
    T.eq(target:stats().completed.ok, #times, "every admitted task ran")
  end)

-- ---- concurrency cap ----------------------------------------------------------

T.test("concurrency: at most limit in flight per tenant; done frees the slot", function()
  local gd = fresh("gate")
  local cap = tenant.concurrency { limit = 2, dict = fresh("c") }
  local p = newpool { max_workers = 4 }
  p:use(cap)
  local a = p:submit({ fn = gate, tenant = "t" }, gd, "a")
  local b = p:submit({ fn = gate, tenant = "t" }, gd, "b")
  T.ok(a and b)
  T.eq(cap:remaining("t"), 0)
  T.eq(cap:in_flight("t"), 2)
  local f, why = p:submit({ fn = gate, tenant = "t" }, gd, "c")
  T.eq(f, nil)
  T.eq(why, "concurrency_limited")
  T.ok(p:submit({ fn = noop, tenant = "u" }), "another tenant is not limited")
  T.eq(cap:remaining("u") <= 2, true)
  wp.shared(gd):set("a", true)
  T.eq(a:wait(), true, "wait runs the done hook before returning")
  T.eq(cap:remaining("t"), 1)
  T.ok(p:submit({ fn = noop, tenant = "t" }), "the freed slot is usable")
  wp.shared(gd):set("b", true)
  T.eq(p:stop_wait(), 0)
  wp.poll()
  T.eq(cap:remaining("t"), 2)
  T.eq(cap:in_flight("t"), 0)
  T.eq(cap:remaining("u"), 2)
  T.eq(p:stats().dropped.concurrency, 1)
end)

T.test("concurrency: done runs at the state's next workerpool call or poll()", function()
  local cap = tenant.concurrency { limit = 1, dict = fresh("c") }
  local p = newpool { max_workers = 1 }
  p:use(cap)
  local f = p:submit(noop)
  T.eventually(function() return f:done() end, 10, "the task ended")
  T.eq(cap:remaining(nil), 0, "not released before this state looks (no workerpool call)")
  -- The completion reaches this state's mailbox just after the status is
  -- visible, so look until it is there.
  T.eventually(function()
    wp.poll()
    return cap:remaining(nil) == 1
  end, 10, "poll ran the done hook")
  local g = p:submit(noop)
  T.eventually(function() return g:done() end, 10, "the task ended")
  T.eventually(function()
    p:stats()
    return cap:remaining(nil) == 1
  end, 10, "stats also delivers")
  T.eq(p:stop_wait(), 0)
end)

T.test("concurrency: released on error, timeout and cancel", function()
  local gd = fresh("gate")
  local cap = tenant.concurrency { limit = 1, dict = fresh("c") }
  local p = newpool { max_workers = 1 }
  p:use(cap)
  -- error
  local f = p:submit { fn = function() error("boom") end, tenant = "t" }
  local ok, err = f:wait()
  T.eq(ok, false)
  T.ok(tostring(err):find("boom", 1, true))
  T.eq(cap:remaining("t"), 1, "released after an error")
  -- timeout: a looping task stopped by its descriptor's deadline
  f = p:submit { fn = spin, tenant = "t", timeout = 0.1 }
  T.eq(select(2, p:submit { fn = noop, tenant = "t" }), "concurrency_limited")
  ok, err = f:wait()
  T.eq(ok, false)
  T.eq(err, "timeout")
  T.eq(f:status(), "timeout")
  T.eq(cap:remaining("t"), 1, "released after a timeout")
  -- cancel: a queued task behind a blocked one (of another tenant)
  local blocker = p:submit({ fn = gate, tenant = "other" }, gd, "open")
  T.eventually(function() return p:running() == 1 and p:waiting() == 0 end, 10,
    "blocker started")
  f = p:submit { fn = noop, tenant = "t" }
  T.eq(cap:remaining("t"), 0)
  T.eq(f:cancel(), true)
  wp.poll()
  T.eq(cap:remaining("t"), 1, "released after cancel")
  T.eq(select(2, f:wait()), "cancelled")
  wp.shared(gd):set("open", true)
  T.eq(blocker:wait(), true)
  T.eq(cap:remaining("other"), 1)
  T.eq(p:stop_wait(), 0)
end)

T.test("concurrency: a discarded task frees its slot", function()
  local gd = fresh("gate")
  local cap = tenant.concurrency { limit = 3, dict = fresh("c") }
  local p = newpool { max_workers = 1 }
  p:use(cap)
  local blocker = p:submit(gate, gd, "open")
  T.eventually(function() return p:running() == 1 and p:waiting() == 0 end, 10,
    "blocker started")
  local q1 = p:submit { fn = noop, tenant = "t" }
  local q2 = p:submit { fn = noop, tenant = "t" }
  T.eq(cap:remaining("t"), 1)
  -- stop() waits for the running blocker: open its gate from a thread
  local helper = newpool { max_workers = 1 }
  helper:submit(function(dn)
    local W = require "workerpool"
    W.sleep(0.05)
    W.shared(dn):set("open", true)
  end, gd)
  T.eq(p:stop(), 2, "both queued tasks discarded")
  T.eq(select(2, q1:wait()), "discarded")
  T.eq(select(2, q2:wait()), "discarded")
  T.eq(cap:remaining("t"), 3, "slots of discarded tasks came back")
  T.eq(blocker:wait(), true)
  T.eq(helper:stop_wait(), 0)
end)

T.test("concurrency: overrides and argument errors", function()
  local cap = tenant.concurrency { limit = 2, dict = fresh("c"),
    overrides = { big = 5, small = { limit = 1 } } }
  T.eq(cap:remaining("big"), 5)
  T.eq(cap:remaining("small"), 1)
  T.eq(cap:remaining(nil), 2)
  T.eq(cap:remaining("any"), 2)
  T.raises(function() tenant.concurrency() end, "tenant.concurrency: options must be a table")
  T.raises(function() tenant.concurrency {} end,
    "tenant.concurrency: limit must be a positive integer (got nil)")
  T.raises(function() tenant.concurrency { limit = 0 } end, "limit must be a positive integer")
  T.raises(function() tenant.concurrency { limit = 1.5 } end, "limit must be a positive integer")
  T.raises(function() tenant.concurrency { limit = math.huge } end,
    "limit must be a positive integer")
  T.raises(function() tenant.concurrency { limit = 1, overrides = { a = 0 } } end,
    "overrides.a must be a positive integer")
  T.raises(function() tenant.concurrency { limit = 1, overrides = { a = { max = 2 } } } end,
    "overrides.a: unknown field 'max'")
  T.raises(function() tenant.concurrency { limit = 1, rate = 2 } end, "unknown option 'rate'")
  T.eq(tenant.concurrency { limit = 3.0, dict = fresh("c") }:remaining("x"), 3)
end)

-- Measured across states: 4 worker states and the host submit tasks of one
-- tenant; each task counts itself in while it runs, and the highest count
-- seen must not pass the limit.
T.test("concurrency: never more than limit running, 4 workers + host", function()
  local LIMIT = 3
  local dname, sname = fresh("c"), fresh("stats")
  local st = wp.shared(sname)
  local target = newpool { max_workers = 8, name = fresh("target") }
  local submitters = newpool { max_workers = 4, min_workers = 4 }
  local task = function(sn)
    local W = require "workerpool"
    local d = W.shared(sn)
    local now = d:incr("running", 1, 0)
    while true do
      local m = d:get("max") or 0
      if now <= m or d:cas("max", d:get("max"), now) then break end
    end
    W.sleep(0.001)
    d:incr("running", -1)
    d:incr("ran", 1, 0)
  end
  local submit_loop = function(dn, sn, tname, limit, count, fn)
    local W = require "workerpool"
    local cap = W.tenant.concurrency { limit = limit, dict = dn } -- to read the count
    local pool = W.get(tname) -- the host's cap applies here too
    local fs, admitted = {}, 0
    while admitted < count do
      local f = pool:submit({ fn = fn, tenant = "acme" }, sn)
      if f then
        admitted = admitted + 1
        fs[#fs + 1] = f
      else
        W.sleep(0.0005)
      end
    end
    for _, f in ipairs(fs) do assert(f:wait()) end
    return admitted, cap:in_flight("acme")
  end
  local cap = tenant.concurrency { limit = LIMIT, dict = dname }
  target:use(cap)
  local fs = {}
  for i = 1, 4 do fs[i] = submitters:submit(submit_loop, dname, sname, target:name(), LIMIT, 40,
      task) end
  local mine, admitted = {}, 0
  while admitted < 40 do
    local f = target:submit({ fn = task, tenant = "acme" }, sname)
    if f then
      admitted = admitted + 1
      mine[#mine + 1] = f
    else
      wp.sleep(0.0005)
    end
  end
  for _, f in ipairs(mine) do T.eq(f:wait(), true) end
  for i = 1, 4 do
    local ok, got = fs[i]:wait()
    T.ok(ok, tostring(got))
    T.eq(got, 40)
  end
  T.eq(st:get("ran"), 200)
  T.ok(st:get("max") <= LIMIT, "at most " .. LIMIT .. " ran at once, saw " .. st:get("max"))
  T.ok(st:get("max") >= 1)
  T.eq(cap:in_flight("acme"), 0, "every slot came back")
  T.eq(submitters:stop_wait(), 0)
  T.eq(target:stop_wait(), 0)
end)

-- ---- composition ------------------------------------------------------------------

T.test("compose: concurrency refuses -> the bucket's token is given back", function()
  local gd = fresh("gate")
  local c = fake_clock()
  local b = tenant.bucket { rate = 1, burst = 5, dict = fresh("b"), clock = c }
  local cap = tenant.concurrency { limit = 1, dict = fresh("c") }
  local p = newpool { max_workers = 2 }
  p:use(b):use(cap) -- use returns the pool
  local f = p:submit({ fn = gate, tenant = "t" }, gd, "open")
  T.ok(f)
  T.eq(b:remaining("t"), 4.0)
  local g, why = p:submit({ fn = noop, tenant = "t" })
  T.eq(g, nil)
  T.eq(why, "concurrency_limited")
  T.eq(b:remaining("t"), 4.0, "undo gave the token back")
  T.eq(p:stats().dropped.concurrency, 1)
  wp.shared(gd):set("open", true)
  T.eq(f:wait(), true)
  T.eq(p:stop_wait(), 0)
end)

T.test("compose: bucket refuses -> the concurrency slot is given back", function()
  local gd = fresh("gate")
  local c = fake_clock()
  local cap = tenant.concurrency { limit = 5, dict = fresh("c") }
  local b = tenant.bucket { rate = 1, burst = 1, dict = fresh("b"), clock = c }
  local p = newpool { max_workers = 1 }
  p:use(cap)
  p:use(b)
  local f = p:submit({ fn = gate, tenant = "t" }, gd, "open")
  T.ok(f)
  T.eq(select(2, p:submit { fn = noop, tenant = "t" }), "rate_limited")
  T.eq(cap:in_flight("t"), 1, "only the admitted task holds a slot")
  wp.shared(gd):set("open", true)
  f:wait()
  T.eq(cap:in_flight("t"), 0)
  T.eq(p:stop_wait(), 0)
end)

T.test("compose: a failed submit (stopped, full) gives back what every policy took", function()
  local gd = fresh("gate")
  local c = fake_clock()
  local b = tenant.bucket { rate = 1, burst = 5, dict = fresh("b"), clock = c }
  local cap = tenant.concurrency { limit = 5, dict = fresh("c") }
  local undone = 0
  local p = newpool { max_workers = 1, queue_cap = 1 }
  p:use(b):use(cap):use { admit = function() return true end,
    undo = function() undone = undone + 1 end }
  local blocker = p:submit({ fn = gate, tenant = "t" }, gd, "open")
  T.eventually(function() return p:running() == 1 and p:waiting() == 0 end, 10,
    "blocker started")
  T.ok(p:submit { fn = noop, tenant = "t" }, "fills the queue")
  T.eq(b:remaining("t"), 3.0)
  T.eq(cap:in_flight("t"), 2)
  local f, why = p:submit { fn = noop, tenant = "t" }
  T.eq(f, nil)
  T.eq(why, "full")
  T.eq(b:remaining("t"), 3.0, "token back after 'full'")
  T.eq(cap:in_flight("t"), 2, "slot back after 'full'")
  T.eq(undone, 1, "the last policy's undo ran too")
  wp.shared(gd):set("open", true)
  T.eq(blocker:wait(), true)
  T.eq(p:stop_wait(), 0)
  wp.poll()
  T.eq(cap:in_flight("t"), 0)
  f, why = p:submit { fn = noop, tenant = "t" }
  T.eq(f, nil)
  T.eq(why, "stopped")
  T.eq(b:remaining("t"), 3.0, "token back after 'stopped'")
  T.eq(cap:in_flight("t"), 0, "slot back after 'stopped'")
  T.eq(undone, 2)
end)

T.test("module: reachable as workerpool.tenant in every state", function()
  T.eq(wp.tenant, tenant)
  local p = newpool { max_workers = 1 }
  T.eq(p:submit_wait(function()
    local W = require "workerpool"
    return type(W.tenant.bucket) == "function" and W.tenant == require("workerpool.tenant")
  end), true)
  T.eq(p:stop_wait(), 0)
end)

T.run()
