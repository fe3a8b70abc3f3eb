-- test_retry.lua: workerpool.retry in plain Lua, where the retries happen
-- inside r:wait() (docs/policies.md). The host variant is
-- tests/host/test_policies_host.lua.
--
-- Backoff sleeps go to a recorder that moves a fake clock, and jitter
-- draws come from a function the test controls, so delays are exact. Tasks count
-- their attempts in a shared dictionary.

local T = require "harness"
local wp = require "workerpool"
local retry = require "workerpool.retry"
local breaker = require "workerpool.breaker"
local tenant = require "workerpool.tenant"

local fresh, newpool = T.policy_helpers("retry")


-- Counts its attempt in dict dn; fails until attempt number `ok_at`
-- (never when ok_at is nil), then returns "ok on <attempt>".
local function flaky(dn, ok_at)
  local W = require "workerpool"
  local k = W.shared(dn):incr("tries", 1, 0)
  if ok_at and k >= ok_at then return "ok on " .. k, k end
  error("attempt " .. k .. " failed")
end

-- The options every case starts from: a fake clock that only the backoff
-- sleeps move (and record), and maximal jitter.
local function opts(extra)
  local now, slept = 0, {}
  local o = {
    clock = function() return now end,
    sleep = function(s)
      slept[#slept + 1] = s
      now = now + s
    end,
    random = function() return 1 end,
  }
  for k, v in pairs(extra or {}) do o[k] = v end
  return o, slept
end

T.test("stops at attempts; delays double from base; final outcome is the last failure",
  function()
    local dn = fresh("d")
    local p = newpool()
    local o, slept = opts { attempts = 4, base = 0.5, max_delay = 100 }
    local r = retry.submit(p, o, flaky, dn)
    local ok, err = r:wait()
    T.eq(ok, false)
    T.ok(tostring(err):find("attempt 4 failed", 1, true), tostring(err))
    T.eq(wp.shared(dn):get("tries"), 4, "4 attempts in all, the first included")
    T.eq(#slept, 3)
    T.eq(slept[1], 0.5)
    T.eq(slept[2], 1.0)
    T.eq(slept[3], 2.0)
    local info = r:info()
    T.eq(info.tries, 4)
    T.eq(info.why, "exhausted")
    T.eq(r:status(), "error")
    T.eq(r:done(), true)
    -- waiting again gives the same outcome, and retries nothing
    T.eq(r:wait(), false)
    T.eq(wp.shared(dn):get("tries"), 4)
    T.eq(p:stop_wait(), 0)
  end)

T.test("succeeds on a later attempt with the task's results", function()
  local dn = fresh("d")
  local p = newpool()
  local o, slept = opts { attempts = 5, base = 1 }
  local r = retry.submit(p, o, flaky, dn, 3)
  local ok, msg, k = r:wait()
  T.eq(ok, true)
  T.eq(msg, "ok on 3")
  T.eq(k, 3)
  T.eq(#slept, 2)
  T.eq(r:info().why, "succeeded")
  T.eq(r:status(), "ok")
  T.eq(p:stop_wait(), 0)
end)

T.test("attempts = 1 never retries", function()
  local dn = fresh("d")
  local p = newpool()
  local o, slept = opts { attempts = 1 }
  T.eq(retry.submit(p, o, flaky, dn):wait(), false)
  T.eq(wp.shared(dn):get("tries"), 1)
  T.eq(#slept, 0)
  T.eq(p:stop_wait(), 0)
end)

T.test("backoff: capped at max_delay; full, equal and no jitter", function()
  local base = { base = 1, max_delay = 5, attempts = 10 }
  local function delays(jitter, u)
    local o = {}
    for k, v in pairs(base) do o[k] = v end
    o.jitter, o.random = jitter, function() return u end
    local out = {}
    for k = 1, 5 do out[k] = retry.delay(o, k) end
    return table.concat(out, " ")
  end
  T.eq(delays("none", 0.3), "1.0 2.0 4.0 5 5", "cap = min(max_delay, base * 2^(k-1))")
  T.eq(delays("full", 0.5), "0.5 1.0 2.0 2.5 2.5", "full: u * cap")
  T.eq(delays("full", 0), "0.0 0.0 0.0 0 0")
  T.eq(delays("equal", 0.5), "0.75 1.5 3.0 3.75 3.75", "equal: cap/2 + u * cap/2")
  -- the default draw stays within [0, cap)
  local dn = fresh("d")
  local p = newpool()
  local slept = {}
  local r = retry.submit(p, { attempts = 6, base = 0.25, max_delay = 1,
    sleep = function(s) slept[#slept + 1] = s end }, flaky, dn)
  T.eq(r:wait(), false)
  T.eq(#slept, 5)
  local caps = { 0.25, 0.5, 1, 1, 1 }
  for i, s in ipairs(slept) do T.ok(s >= 0 and s < caps[i], "delay " .. i .. " = " .. s) end
  T.eq(p:stop_wait(), 0)
end)

T.test("only the listed outcomes are retried", function()
  local dn = fresh("d")
  local p = newpool()
  -- timeouts are retried by default
  local spin_once = function(dname)
    local W = require "workerpool"
    -- loops until the deadline (calling now(): see test_tenant.lua's spin)
    if W.shared(dname):incr("tries", 1, 0) == 1 then while true do W.now() end end
    return "second try"
  end
  local o = opts { attempts = 3 }
  local r = retry.submit(p, o, { fn = spin_once, timeout = 0.1 }, dn)
  local ok, v = r:wait()
  T.eq(ok, true)
  T.eq(v, "second try")
  T.eq(r:info().tries, 2)
  -- with retry_on = {error = true}, a timeout is final
  dn = fresh("d")
  o = opts { attempts = 3, retry_on = { error = true } }
  r = retry.submit(p, o, { fn = spin_once, timeout = 0.1 }, dn)
  ok, v = r:wait()
  T.eq(ok, false)
  T.eq(v, "timeout")
  T.eq(r:status(), "timeout")
  T.eq(r:info().why, "not_retryable")
  T.eq(wp.shared(dn):get("tries"), 1)
  -- with retry_on = {timeout = true}, an error is final
  dn = fresh("d")
  o = opts { attempts = 3, retry_on = { timeout = true } }
  r = retry.submit(p, o, flaky, dn)
  T.eq(r:wait(), false)
  T.eq(wp.shared(dn):get("tries"), 1)
  T.eq(r:info().why, "not_retryable")
  T.eq(p:stop_wait(), 0)
end)

T.test("never after the pool stopped", function()
  local dn = fresh("d")
  local p = newpool()
  -- the pool stops during the backoff
  local o = opts { attempts = 5, sleep = function() p:stop() end }
  local r = retry.submit(p, o, flaky, dn)
  local ok, err = r:wait()
  T.eq(ok, false)
  T.ok(tostring(err):find("attempt 1 failed", 1, true), "the last real outcome")
  T.eq(wp.shared(dn):get("tries"), 1)
  T.eq(r:info().why, "stopped")
  -- the pool stopped after the attempt failed, before anyone waited
  local dn2 = fresh("d")
  local p2 = newpool()
  local slept
  o, slept = opts { attempts = 5 }
  r = retry.submit(p2, o, flaky, dn2)
  T.eventually(function() return wp.shared(dn2):get("tries") == 1 end, 10, "first attempt ran")
  T.eq(p2:stop_wait(), 0)
  T.eq(r:wait(), false)
  T.eq(r:info().why, "stopped")
  T.eq(#slept, 0, "no backoff either")
  T.eq(wp.shared(dn2):get("tries"), 1)
  -- a stopped pool refuses the first submit: nil, "stopped" as submit
  local f, why, ename = retry.submit(p2, opts(), flaky, dn2)
  T.eq(f, nil)
  T.eq(why, "stopped")
  T.eq(ename, "ESTOPPED")
end)

T.test("a discarded attempt is final (the pool stopped)", function()
  local dn, gd = fresh("d"), fresh("gate")
  local p = newpool { max_workers = 1 }
  local blocker = p:submit(function(g)
    local W = require "workerpool"
    while not W.shared(g):get("open") do W.sleep(0.001) end
  end, gd)
  T.eventually(function() return p:running() == 1 and p:waiting() == 0 end, 10,
    "blocker started")
  local r = retry.submit(p, opts { attempts = 5, retry_on = { error = true, discarded = true } },
    flaky, dn)
  local helper = newpool { max_workers = 1 }
  helper:submit(function(g)
    local W = require "workerpool"
    W.sleep(0.05)
    W.shared(g):set("open", true)
  end, gd)
  T.eq(p:stop(), 1)
  local ok, err = r:wait()
  T.eq(ok, false)
  T.eq(err, "discarded")
  T.eq(r:info().why, "stopped", "even when discarded is listed")
  T.eq(blocker:wait(), true)
  T.eq(helper:stop_wait(), 0)
end)

T.test("every attempt passes the pool's policies; a refused retry ends it", function()
  local dn = fresh("d")
  local p = newpool()
  local b = breaker.new { name = fresh("b"), consecutive_failures = 2, open_timeout = 60 }
  local cap = tenant.concurrency { limit = 1, dict = fresh("c") }
  p:use(cap):use(b)
  local r = retry.submit(p, opts { attempts = 5 }, { fn = flaky, tenant = "t" }, dn)
  local ok, err = r:wait()
  T.eq(ok, false)
  T.ok(tostring(err):find("attempt 2 failed", 1, true), "the last attempt that ran")
  T.eq(r:info().why, "refused: open")
  T.eq(r:info().tries, 2)
  T.eq(b:state(), "open")
  T.eq(cap:in_flight("t"), 0, "each attempt's slot came back")
  T.eq(p:stats().dropped.breaker_open, 1)
  -- a first submit refused by a policy: nil, reason
  local f, why = retry.submit(p, opts(), flaky, dn)
  T.eq(f, nil)
  T.eq(why, "open")
  T.eq(p:stop_wait(), 0)
end)

T.test("wait(timeout) returns nil, 'timeout' and the retry goes on", function()
  local dn, gd = fresh("d"), fresh("gate")
  local p = newpool()
  local gate_then_fail = function(d, g)
    local W = require "workerpool"
    local k = W.shared(d):incr("tries", 1, 0)
    while not W.shared(g):get("open") do W.sleep(0.001) end
    if k < 2 then error("first fails") end
    return "done after " .. k
  end
  local r = retry.submit(p, opts { attempts = 3 }, gate_then_fail, dn, gd)
  local a, b = r:wait(0.05)
  T.eq(a, nil)
  T.eq(b, "timeout")
  T.eq(r:done(), false)
  T.eq(r:status(), "pending")
  wp.shared(gd):set("open", true)
  local ok, v = r:wait(10)
  T.eq(ok, true)
  T.eq(v, "done after 2")
  T.eq(p:stop_wait(), 0)
end)

T.test("wait(timeout) during the backoff: a real clock and sleep", function()
  local dn = fresh("d")
  local p = newpool()
  local r = retry.submit(p, { attempts = 2, base = 0.3, jitter = "none" }, flaky, dn, 2)
  local t0 = wp.now()
  local a, b = r:wait(0.1)
  T.eq(a, nil)
  T.eq(b, "timeout")
  T.ok(wp.now() - t0 >= 0.09, "waited its timeout")
  T.eq(wp.shared(dn):get("tries"), 1, "not resubmitted before the backoff ended")
  local ok, v = r:wait()
  T.eq(ok, true)
  T.eq(v, "ok on 2")
  T.ok(wp.now() - t0 >= 0.29, "the backoff was slept")
  T.eq(p:stop_wait(), 0)
end)

T.test("done() moves a retry along without blocking", function()
  local dn = fresh("d")
  local p = newpool()
  local r = retry.submit(p, { attempts = 3, base = 0, jitter = "none" }, flaky, dn, 3)
  T.eventually(function() return r:done() end, 10, "done() retried to the end")
  T.eq(r:status(), "ok")
  T.eq(r:info().tries, 3)
  T.eq(select(2, r:wait()), "ok on 3")
  T.eq(p:stop_wait(), 0)
end)

T.test("cancel: no further attempts", function()
  local dn, gd = fresh("d"), fresh("gate")
  local p = newpool { max_workers = 1 }
  local blocker = p:submit(function(g)
    local W = require "workerpool"
    while not W.shared(g):get("open") do W.sleep(0.001) end
  end, gd)
  T.eventually(function() return p:running() == 1 and p:waiting() == 0 end, 10,
    "blocker started")
  local r = retry.submit(p, opts { attempts = 5, retry_on = { error = true, cancelled = true } },
    flaky, dn)
  T.eq(r:cancel(), true, "cancels the queued attempt")
  local ok, err = r:wait()
  T.eq(ok, false)
  T.eq(err, "cancelled")
  T.eq(r:info().why, "cancelled", "not retried though cancelled is listed")
  T.eq(wp.shared(dn):get("tries"), nil, "it never ran")
  T.eq(r:cancel(), false, "already over")
  wp.shared(gd):set("open", true)
  T.eq(blocker:wait(), true)
  -- cancel during the backoff
  local r2
  local o = opts { attempts = 5, sleep = function() r2:cancel() end }
  r2 = retry.submit(p, o, flaky, dn)
  T.eq(r2:wait(), false)
  T.eq(r2:info().why, "cancelled")
  T.eq(r2:info().tries, 1)
  T.eq(p:stop_wait(), 0)
end)

T.test("argument errors", function()
  local p = newpool()
  local function bad(o, msg)
    T.raises(function() retry.submit(p, o, flaky, "x") end, msg, msg)
  end
  T.raises(function() retry.submit(nil, {}, flaky) end, "retry.submit: bad argument #1 (pool")
  bad(5, "retry.submit: options must be a table")
  bad({ attempts = 0 }, "attempts must be a positive integer")
  bad({ attempts = 1.5 }, "attempts must be a positive integer")
  bad({ base = -1 }, "base must be a non-negative finite number of seconds (got -1)")
  bad({ max_delay = "1" }, "max_delay must be a non-negative number of seconds (got 1)")
  bad({ retry_on = { ok = true } }, "retry_on: 'ok' is not a failed outcome")
  bad({ retry_on = { oops = true } }, "retry_on: 'oops' is not a failed outcome")
  bad({ jitter = "half" }, "jitter must be \"full\", \"equal\" or \"none\"")
  bad({ sleep = 1 }, "sleep must be a function")
  bad({ random = 1 }, "random must be a function")
  bad({ clock = 1 }, "clock must be a function or a table with a now() function")
  bad({ tries = 3 }, "unknown option 'tries'")
  local r = retry.submit(p, nil, flaky, fresh("d"), 1)
  T.raises(function() r:wait(-1) end, "timeout must be a non-negative number")
  T.eq(r:wait(), true, "nil options: the defaults")
  T.eq(p:stop_wait(), 0)
end)

T.test("module: reachable as workerpool.retry in every state", function()
  T.eq(wp.retry, retry)
  local p = newpool { max_workers = 1 }
  local q = newpool { max_workers = 1, name = fresh("q") }
  -- a worker state retries on another pool, inside wait()
  T.eq(p:submit_wait(function(qname, dn, fn)
    local W = require "workerpool"
    local r = W.retry.submit(W.get(qname), { attempts = 3, base = 0.001 }, fn, dn, 2)
    return r:wait()
  end, q:name(), fresh("d"), flaky), true)
  T.eq(p:stop_wait(), 0)
  T.eq(q:stop_wait(), 0)
end)

T.run()
