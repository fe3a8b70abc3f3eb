-- test_policy_pool.lua: policies belong to the pool (every submitting state
-- passes them), degraded mode on plain submit, the policy series of
-- workerpool.metrics() and Lua metric collectors (docs/policies.md).
--
-- Time is a shared fake clock moved by the test, so refills are exact.

local T = require "harness"
local wp = require "workerpool"
local tenant = require "workerpool.tenant"
local breaker = require "workerpool.breaker"
local clock = require "workerpool.clock"

local fresh, newpool = T.policy_helpers("ppool")

local function noop() end

-- The acceptance property: a bucket attached in the host only limits the
-- sum of host and worker-task submissions to burst + rate * t, with 4
-- worker states submitting at once and no policy attached in them.
T.test("a host's bucket limits host + 4 worker states to burst + rate*t", function()
  local RATE, BURST, STEP, STEPS = 64, 8, 1 / 64, 100
  local cname = fresh("clock")
  local c = clock.shared(cname)
  local ctlname = fresh("ctl")
  local ctl = wp.shared(ctlname)
  local target = newpool { max_workers = 2, name = fresh("target") }
  local b = tenant.bucket { rate = RATE, burst = BURST, dict = fresh("b"), clock = c }
  target:use(b)
  T.eq(target:policies()[1]["local"], false, "a shipped policy on a shared clock travels")
  local submitters = newpool { max_workers = 4, min_workers = 4 }
  local hammer = function(ctln, tname)
    local W = require "workerpool"
    local pool = W.get(tname) -- nothing attached in this state
    local d = W.shared(ctln)
    d:incr("ready", 1, 0)
    local admitted, tries = 0, 0
    while not d:get("stop") do
      tries = tries + 1
      local f, why = pool:submit { fn = function() end, tenant = "acme" }
      if f then
        admitted = admitted + 1
      else
        assert(why == "rate_limited", why)
        W.sleep(0.0001)
      end
    end
    return admitted, tries
  end
  local fs = {}
  for i = 1, 4 do fs[i] = submitters:submit(hammer, ctlname, target:name()) end
  T.eventually(function() return ctl:get("ready") == 4 end, 30, "4 submitters running")
  local admitted, tries = 0, 0
  local function host_submit()
    tries = tries + 1
    if target:submit { fn = noop, tenant = "acme" } then admitted = admitted + 1 end
  end
  -- The bucket's record starts at t = 0: should the first take come after
  -- the clock moved (4 fresh states are slow to submit under a sanitizer),
  -- a never-used bucket is full then, and what accrued before is capped.
  host_submit()
  for _ = 1, STEPS do
    c.advance(STEP)
    host_submit()
    local deadline = wp.now() + 10
    while b:remaining("acme") >= 1 and wp.now() < deadline do
      host_submit()
      wp.sleep(0.0002)
    end
  end
  ctl:set("stop", true)
  local workers = 0
  for i = 1, 4 do
    local ok, a, n = fs[i]:wait()
    T.ok(ok, tostring(a))
    T.ok(n > 0, "worker " .. i .. " submitted")
    workers = workers + a
    tries = tries + n
  end
  local total = admitted + workers
  local bound = BURST + RATE * c.now()
  T.ok(total <= bound, string.format("admitted %d > bound %g", total, bound))
  -- Tokens are conserved: each was admitted or is still in the bucket
  -- (a step's loop gives up after 10 s on a starved machine, leaving its
  -- token there). A token lost by the bucket fails this.
  local left = math.floor(b:remaining("acme"))
  T.eq(total + left, math.floor(bound),
    string.format("every token admitted or left in the bucket (%d left)", left))
  T.ok(left <= 1, string.format("%d tokens were never taken", left))
  T.ok(workers > 0, "worker states were admitted too")
  T.eq(target:stats().dropped.rate_limited, tries - total, "every refusal counted")
  T.eq(submitters:stop_wait(), 0)
  T.eq(target:stop_wait(), 0)
end)

-- A policy module on package.path, used by name. (Files next to a
-- tmpname, not in a new directory: os.execute cannot run under TSan.)
local modbase = os.tmpname()
local modfiles = { modbase .. "_ppool_deny.lua", modbase .. "_ppool_deny_new.lua" }
do
  local fh = assert(io.open(modfiles[1], "w"))
  fh:write([[
return function(opts)
  return { admit = function(_, task)
    if opts.deny[task.tenant or "-"] then return nil, "denied" end
    return true
  end }
end
]])
  fh:close()
  fh = assert(io.open(modfiles[2], "w"))
  fh:write([[
return { new = function(opts)
  return { admit = function(_, task)
    if task.tenant == opts.deny then return nil, "denied_new" end
    return true
  end }
end }
]])
  fh:close()
end
package.path = modbase .. "_?.lua;" .. package.path

T.test("pool:use(module, opts) rebuilds a user policy in every state", function()
  local target = newpool { name = fresh("target") }
  target:use("ppool_deny", { deny = { evil = true } })
  target:use("ppool_deny_new", { deny = "bad" })
  local pols = target:policies()
  T.eq(#pols, 2)
  T.eq(pols[1].module, "ppool_deny")
  T.eq(pols[1]["local"], false)
  T.eq(select(2, target:submit { fn = noop, tenant = "evil" }), "denied")
  T.eq(select(2, target:submit { fn = noop, tenant = "bad" }), "denied_new")
  local other = newpool { max_workers = 1 }
  local got = table.pack(other:submit_wait(function(tname)
    local W = require "workerpool"
    local p = W.get(tname)
    local _, a = p:submit { fn = function() end, tenant = "evil" }
    local _, b = p:submit { fn = function() end, tenant = "bad" }
    local f = p:submit { fn = function() return 7 end, tenant = "good" }
    return a, b, select(2, f:wait())
  end, target:name()))
  T.eq(got[1], "denied", "a worker state rebuilt the module policy")
  T.eq(got[2], "denied_new", "and the .new one")
  T.eq(got[3], 7)
  T.raises(function() target:use("ppool_no_such_module", {}) end, "ppool_no_such_module")
  T.eq(other:stop_wait(), 0)
  T.eq(target:stop_wait(), 0)
  for _, f in ipairs(modfiles) do os.remove(f) end
  os.remove(modbase)
end)

T.test("a closure policy stays local to the attaching state and is listed so", function()
  local target = newpool { name = fresh("target") }
  local seen = 0
  target:use { admit = function() seen = seen + 1; return nil, "closed_here" end }
  T.eq(target:policies()[1]["local"], true)
  T.eq(select(2, target:submit(noop)), "closed_here")
  local other = newpool { max_workers = 1 }
  T.eq(other:submit_wait(function(tname)
    local W = require "workerpool"
    local f = W.get(tname):submit(function() return "ran" end)
    return select(2, f:wait())
  end, target:name()), "ran", "another state does not apply it")
  T.eq(seen, 1)
  T.eq(other:stop_wait(), 0)
  T.eq(target:stop_wait(), 0)
end)

-- ---- degraded mode ---------------------------------------------------------

T.test("breaker fallback = handler: plain submit runs it while open, the task once closed",
  function()
    local bname = fresh("br")
    local p = newpool { init = [[
      function work(x) return "work", x end
      function degraded(x) return "degraded", x end
    ]] }
    local b = breaker.new { name = bname, consecutive_failures = 1, open_timeout = 60,
      fallback = "degraded", dict = fresh("bd") }
    p:use(b)
    local f = p:submit("work", 1)
    T.eq(table.pack(f:wait())[2], "work")
    T.eq(f:degraded(), false)
    b:trip()
    f = p:submit("work", 2)
    T.ok(f, "submit is not refused while open")
    local r = table.pack(f:wait())
    T.eq(r[1], true)
    T.eq(r[2], "degraded")
    T.eq(r[3], 2, "with the same arguments")
    T.eq(f:status(), "ok")
    T.eq(f:degraded(), "open")
    T.eq(select(2, p:submit_wait({ handler = "work", name = "n" }, 3)), 3)
    local m = wp.metrics()
    T.ok(m:find('workerpool_breaker_fallback_total{breaker="' .. bname .. '"} 2', 1, true),
      "fallback runs counted")
    b:reset()
    f = p:submit("work", 4)
    r = table.pack(f:wait())
    T.eq(r[2], "work", "the normal handler again once closed")
    T.eq(f:degraded(), false)
    T.eq(p:stats().dropped.breaker_open, 0, "a degraded run is not a drop")
    T.eq(p:stop_wait(), 0)
  end)

-- ---- metrics ----------------------------------------------------------------

T.test("metrics: breaker, tenant and drop reasons; tenant_label_limit; promtool", function()
  local pname = fresh("mp")
  local c = clock.shared(fresh("clock"))
  local p = newpool { name = pname, tenant_label_limit = 2 }
  local bname = fresh("br")
  local b = breaker.new { name = bname, consecutive_failures = 1, clock = c }
  p:use(tenant.bucket { rate = 1, burst = 2, dict = fresh("b"), clock = c })
  p:use(tenant.concurrency { limit = 100, dict = fresh("c") })
  p:use(b)
  for _ = 1, 4 do p:submit({ fn = noop, tenant = "acme" }) end -- 2 admitted, 2 refused
  for _, t in ipairs { "t2", "t3", "t4" } do p:submit({ fn = noop, tenant = t }) end
  b:trip()
  T.eq(select(2, p:submit { fn = noop, tenant = "t2" }), "open")
  local m = wp.metrics()
  local function has(s) T.ok(m:find(s, 1, true), "metrics has " .. s) end
  local pl = 'pool="' .. pname .. '"'
  has('workerpool_tenant_admitted_total{' .. pl .. ',tenant="acme"} 2')
  has('workerpool_tenant_rejected_total{' .. pl .. ',tenant="acme",reason="rate_limited"} 2')
  has('workerpool_tenant_admitted_total{' .. pl .. ',tenant="t2"} 1')
  has('workerpool_tenant_admitted_total{' .. pl .. ',tenant="other"} 2')
  has('workerpool_tenant_rejected_total{' .. pl .. ',tenant="t2",reason="breaker_open"} 1')
  has('workerpool_dropped_total{' .. pl .. ',reason="rate_limited"} 2')
  has('workerpool_dropped_total{' .. pl .. ',reason="breaker_open"} 1')
  has('workerpool_dropped_total{' .. pl .. ',reason="policy"} 0')
  has('workerpool_dropped_total{' .. pl .. ',reason="concurrency"} 0')
  has('workerpool_breaker_state{breaker="' .. bname .. '",state="open"} 1')
  has('workerpool_breaker_state{breaker="' .. bname .. '",state="closed"} 0')
  has('workerpool_breaker_transitions_total{breaker="' .. bname .. '",to="open"} 1')
  has('workerpool_breaker_rejected_total{breaker="' .. bname .. '",reason="open"} 1')
  has('workerpool_pool_stopped{' .. pl .. '} 0')
  T.ok(not m:find('tenant="t3"', 1, true), "past the limit, tenants are 'other'")
  if T.can_spawn then
    local ok, out = T.promtool(m)
    T.ok(ok, "promtool check metrics: " .. out)
  else
    T.skip("promtool check metrics")
  end
  T.eq(p:stop_wait(), 0)
  T.ok(wp.metrics():find('workerpool_pool_stopped{' .. pl .. '} 1', 1, true),
    "kept, as 1, once stopped")
end)

T.test("metrics_collector: valid text is appended, invalid text is dropped", function()
  wp.metrics_collector("ppool_ok", function()
    return "# HELP ppool_things Things.\n# TYPE ppool_things gauge\nppool_things{k=\"v\"} 3\n"
  end)
  wp.metrics_collector("ppool_dup", function()
    return "# TYPE workerpool_submitted_total counter\nworkerpool_submitted_total 1\n"
  end)
  wp.metrics_collector("ppool_bad", function() return "not a metric line at all!\n" end)
  wp.metrics_collector("ppool_raise", function() error("boom") end)
  local m = wp.metrics()
  T.ok(m:find('ppool_things{k="v"} 3\n', 1, true), "the valid collector's series")
  T.ok(not m:find("not a metric", 1, true), "malformed output dropped")
  local _, n = m:gsub("# TYPE workerpool_submitted_total", "")
  T.eq(n, 1, "a family the engine has is dropped")
  if T.can_spawn then
    local ok, out = T.promtool(m)
    T.ok(ok, "promtool check metrics: " .. out)
  end
  for _, n2 in ipairs { "ppool_ok", "ppool_dup", "ppool_bad", "ppool_raise" } do
    wp.metrics_collector(n2, nil)
  end
  T.ok(not wp.metrics():find("ppool_things", 1, true), "removed with nil")
  local ex = require "workerpool.exposition"
  T.eq(select(2, ex.check("a 1\na 2\n", {})), "line 2: duplicate series a{}")
  T.eq(select(2, ex.check("a{x=\"1\" 2\n", {})), "line 1: not a sample")
  T.ok(ex.check("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", {}))
  T.eq(select(2, ex.check("a 1", {})), "does not end with a newline")
end)

-- ---- the live view ------------------------------------------------------------

T.test("pool:inspect: what each worker runs now, the queue, the peak depth", function()
  local gd = fresh("gate")
  local p = newpool { max_workers = 1, name = fresh("insp") }
  local v = p:inspect()
  T.eq(#v.workers, 0, "workers start lazily")
  T.eq(v.queued, 0)
  T.eq(v.oldest_queued_s, 0.0)
  local f = p:submit({ name = "job", tenant = "acme", fn = T.gate }, gd, "open")
  T.eventually(function()
    local ws = p:inspect().workers
    return ws[1] and ws[1].state == "running"
  end, 10, "running")
  local g = p:submit(noop)
  v = p:inspect()
  local w = v.workers[1]
  T.eq(w.task, "job")
  T.eq(w.tenant, "acme")
  T.ok(w.running_s >= 0)
  T.ok(w.memory > 0, "memory of the state")
  T.eq(w.overdue, false)
  T.eq(v.queued, 1)
  T.ok(v.oldest_queued_s >= 0)
  T.eq(v.wedged, false)
  wp.sleep(0.05)
  T.ok(p:inspect().workers[1].running_s > w.running_s, "running_s grows")
  T.ok(p:inspect().oldest_queued_s > v.oldest_queued_s, "the queued task ages")
  wp.shared(gd):set("open", true)
  T.ok(f:wait())
  T.ok(g:wait())
  T.eventually(function() return p:inspect().workers[1].tasks_done == 2 end, 10, "2 done")
  T.eq(p:inspect().workers[1].state, "idle")
  T.eq(p:inspect().workers[1].task, nil)
  T.eq(p:stats().queued_peak, 1)
  T.ok(wp.metrics():find('workerpool_queue_depth_peak{pool="' .. p:name() .. '"} 1', 1, true))
  T.eq(p:stop_wait(), 0)
end)

T.run()
