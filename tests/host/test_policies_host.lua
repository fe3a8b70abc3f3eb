-- test_policies_host.lua: the Lua policies under `wpool run`, where the
-- host loop runs the done hooks and retry backoffs sleep in a host
-- coroutine instead of blocking the loop.

local T = require "harness"
local wp = require "workerpool"
local tenant = require "workerpool.tenant"
local breaker = require "workerpool.breaker"
local retry = require "workerpool.retry"
local clock = require "workerpool.clock"

local fresh, newpool = T.policy_helpers("host.policies")


local function flaky(dn, ok_at)
  local W = require "workerpool"
  local k = W.shared(dn):incr("tries", 1, 0)
  if ok_at and k >= ok_at then return "ok on " .. k end
  error("attempt " .. k .. " failed")
end

T.test("the loop runs done hooks: slots come back with no workerpool call", function()
  local cap = tenant.concurrency { limit = 2, dict = fresh("c") }
  local p = newpool()
  p:use(cap)
  local seen = {}
  p:use { admit = function() return true end,
    done = function(_, task, outcome)
      seen[#seen + 1] = { task.tenant, outcome, wp.worker_id(), coroutine.isyieldable() }
    end }
  local f = p:submit({ fn = function() return 1 end, tenant = "t" })
  T.ok(f)
  -- a plain Lua busy wait would not do: the loop must run, so sleep
  T.eventually(function() return cap:in_flight("t") == 0 end, 10, "released by the loop")
  T.eq(#seen, 1)
  T.eq(seen[1][1], "t")
  T.eq(seen[1][2], "ok")
  T.eq(seen[1][3], nil, "in the host state, not a worker")
  -- f:wait() parked on a pending future resumes after the hook ran (for
  -- a future that already ended, see test_policy_hooks_host.lua)
  local gd = fresh("gate")
  local g = p:submit({ fn = function(dn)
    local W = require "workerpool"
    while not W.shared(dn):get("open") do W.sleep(0.001) end
    error("x")
  end, tenant = "t" }, gd)
  wp.after(0.02, function() wp.shared(gd):set("open", true) end)
  T.eq(g:status(), "pending")
  T.eq(g:wait(), false)
  T.eq(cap:in_flight("t"), 0, "done ran before wait resumed")
  T.eq(seen[2][2], "error")
  T.eq(p:stop_wait(), 0)
end)

T.test("bucket and breaker through several host coroutines", function()
  local c = clock.shared(fresh("clock"))
  local b = tenant.bucket { rate = 1, burst = 4, dict = fresh("b"), clock = c }
  local br = breaker.new { name = fresh("br"), consecutive_failures = 3, open_timeout = 5,
    clock = c }
  local p = newpool { max_workers = 4 }
  p:use(b):use(br)
  local hs, admitted, refused = {}, 0, {}
  local gate = fresh("gate")
  for i = 1, 8 do
    hs[i] = wp.spawn(function()
      -- every task fails only once all 8 were submitted: no done hook (and
      -- so no breaker trip) can come between two admissions
      local f, why = p:submit({ fn = function(g)
        local X = require "workerpool"
        while not X.shared(g):get("go") do X.sleep(0.001) end
        error("down")
      end, tenant = "t" }, gate)
      if not f then
        refused[#refused + 1] = why
        return
      end
      admitted = admitted + 1
      f:wait()
    end)
  end
  wp.shared(gate):set("go", true)
  for i = 1, 8 do T.eq(hs[i]:join(), true) end
  T.eq(admitted, 4, "burst 4")
  T.eq(#refused, 4)
  T.eq(refused[1], "rate_limited")
  T.eventually(function() return br:state() == "open" end, 10,
    "the failures tripped it (done hooks run by the loop)")
  T.eq(br:stats().transitions.open, 1)
  c.advance(5)
  local f = p:submit({ fn = function() return "up" end, tenant = "t" })
  T.ok(f, "the half-open trial")
  T.eq(select(2, f:wait()), "up")
  T.eventually(function() return br:state() == "closed" end, 10, "the trial closed it")
  T.eq(p:stop_wait(), 0)
end)

T.test("retry: the backoff sleeps in a host coroutine, the loop keeps running", function()
  local dn = fresh("d")
  local p = newpool()
  local ticks = 0
  local t = wp.every(0.01, function() ticks = ticks + 1 end)
  local t0 = wp.now()
  local r = retry.submit(p, { attempts = 3, base = 0.1, jitter = "none" }, flaky, dn, 3)
  T.eq(r:done(), false)
  local ok, v = r:wait()
  t:cancel()
  T.eq(ok, true)
  T.eq(v, "ok on 3")
  local took = wp.now() - t0
  T.ok(took >= 0.25, "slept 0.1 + 0.2 (libuv timers may fire a ms early), took " .. took)
  T.ok(ticks >= 10, "the loop ran timers meanwhile: " .. ticks)
  T.eq(r:info().tries, 3)
  T.eq(r:info().why, "succeeded")
  T.eq(p:stop_wait(), 0)
end)

T.test("retry: a spawn that fails raises instead of retrying without the loop", function()
  -- retry used to try pcall(spawn) to find the host, so a real failure
  -- went unseen and the retries blocked the loop in r:wait().
  local p = newpool()
  local spawn = wp.spawn
  wp.spawn = function() error("spawn failed") end
  local ok, err = pcall(retry.submit, p, { attempts = 2 }, flaky, fresh("d"), 1)
  wp.spawn = spawn
  T.eq(ok, false)
  T.ok(tostring(err):find("spawn failed", 1, true), tostring(err))
  T.eq(p:stop_wait(), 0)
end)

T.test("retry: several at once, waited with and without timeout", function()
  local p = newpool { max_workers = 4 }
  local rs = {}
  for i = 1, 5 do
    rs[i] = retry.submit(p, { attempts = 4, base = 0.02 }, flaky, fresh("d"), i % 3 + 1)
  end
  T.eq(select(2, rs[1]:wait(0)), "timeout", "not done yet")
  for i = 1, 5 do
    local ok, v = rs[i]:wait(i % 2 == 0 and 10 or nil)
    T.eq(ok, true)
    T.eq(v, "ok on " .. (i % 3 + 1))
  end
  T.eq(p:stop_wait(), 0)
end)

T.test("retry: stops for good when the pool stops during the backoff", function()
  local dn = fresh("d")
  local p = newpool()
  -- (a backoff of 1 s: seeing the first attempt may take a while on a
  -- loaded machine, and the stop must still come during the backoff)
  local r = retry.submit(p, { attempts = 5, base = 1, jitter = "none" }, flaky, dn)
  T.eventually(function() return wp.shared(dn):get("tries") == 1 end, 10, "first attempt")
  wp.sleep(0.05) -- in the backoff now
  p:stop()
  local ok, err = r:wait()
  T.eq(ok, false)
  T.ok(tostring(err):find("attempt 1 failed", 1, true))
  T.eq(r:info().why, "stopped")
  T.eq(wp.shared(dn):get("tries"), 1)
end)

T.test("retry: cancel during the backoff", function()
  local dn = fresh("d")
  local p = newpool()
  local r = retry.submit(p, { attempts = 5, base = 2, jitter = "none" }, flaky, dn)
  T.eventually(function() return wp.shared(dn):get("tries") == 1 end, 10, "first attempt")
  wp.sleep(0.02) -- in the backoff (2 s, for a loaded machine)
  T.eq(r:cancel(), true)
  T.eq(r:wait(), false)
  T.eq(r:info().why, "cancelled")
  T.eq(wp.shared(dn):get("tries"), 1)
  T.eq(p:stop_wait(), 0)
end)

T.run_host()
