-- policies.lua: run with `wpool run scripts/examples/policies.lua`.
--
-- Policies written in Lua (docs/policies.md), in two short scenes:
--
-- 1. Three tenants share one pool. "noisy" submits 10x more than the
--    others; a per-tenant token bucket and concurrency cap throttle it,
--    while "acme" and "globex" keep all of their throughput.
-- 2. A downstream service fails for a while. A circuit breaker trips after
--    three failures, answers from a fallback while open, probes with
--    half-open trials and closes once the service is back. A retry wrapper
--    rides out single flaky calls.
local workerpool = require "workerpool"
local tenant = require "workerpool.tenant"
local breaker = require "workerpool.breaker"
local retry = require "workerpool.retry"

-- The breaker also logs each transition as a warn line; this script prints
-- its own story instead, so keep the engine's log quiet.
workerpool.set_log_level("off")

local t0 = workerpool.now()
local function say(fmt, ...)
  print(string.format("[%5.2fs] " .. fmt, workerpool.now() - t0, ...))
end

-- ---- 1. per-tenant fairness ----------------------------------------------

local api = workerpool.new { name = "api", max_workers = 4 }
local bucket = tenant.bucket { rate = 20, burst = 5, dict = "example.bucket" }
local cap = tenant.concurrency { limit = 2, dict = "example.cap" }
api:use(bucket):use(cap)

local function handle_request(ms)
  require("workerpool").sleep(ms / 1000) -- the work of one request
  return true
end

say("scene 1: tenants noisy (100 req/s), acme and globex (10 req/s) for 1.5 s;")
say("         each tenant may use 20 req/s (burst 5) and 2 workers at once")
local counts = {}
local function producer(name, per_second, seconds)
  local c = { sent = 0, admitted = 0, rate_limited = 0, concurrency_limited = 0, done = 0 }
  counts[name] = c
  local stop = workerpool.now() + seconds
  while workerpool.now() < stop do
    c.sent = c.sent + 1
    local f, why = api:submit({ fn = handle_request, tenant = name }, 20)
    if f then
      c.admitted = c.admitted + 1
      f:on_done(function(ok) if ok then c.done = c.done + 1 end end)
    else
      c[why] = c[why] + 1
    end
    workerpool.sleep(1 / per_second)
  end
end
local producers = {
  workerpool.spawn(producer, "noisy", 100, 1.5),
  workerpool.spawn(producer, "acme", 10, 1.5),
  workerpool.spawn(producer, "globex", 10, 1.5),
}
for _, h in ipairs(producers) do assert(h:join()) end
api:stop_wait()
workerpool.sleep(0.01) -- let the last on_done callbacks run
for _, name in ipairs { "noisy", "acme", "globex" } do
  local c = counts[name]
  say("  %-7s sent %3d  ran %3d (%3.0f%%)  rate_limited %3d  concurrency_limited %2d",
    name, c.sent, c.done, 100 * c.done / c.sent, c.rate_limited, c.concurrency_limited)
end
say("  the pool dropped %d tasks by policy; the quiet tenants lost none",
  api:stats().dropped.policy)

-- ---- 2. a failing downstream -------------------------------------------------

local health = workerpool.shared("example.downstream")
health:set("up", true)

local payments = workerpool.new { name = "payments", max_workers = 2 }
local transitions = {}
local b = breaker.new {
  name = "payments-api",
  consecutive_failures = 3,
  open_timeout = 0.4,
  max_open_timeout = 1.6,
  half_open_max = 2,
  on_state_change = function(name, from, to)
    transitions[#transitions + 1] = to
    say("  breaker %s: %s -> %s", name, from, to)
  end,
  -- While open, answer from a cache instead of calling the service.
  fallback = function(reason)
    return breaker.resolved("cached answer (" .. reason .. ")")
  end,
}
payments:use(b)

local function charge(i)
  local W = require "workerpool"
  W.sleep(0.005)
  if not W.shared("example.downstream"):get("up") then
    error("payments service unavailable", 0)
  end
  return "charged #" .. i
end

say("scene 2: a request every 50 ms; the service is down from 0.3 s to 1.2 s")
local tally = { live = 0, failed = 0, fallback = 0 }
workerpool.after(0.3, function()
  health:set("up", false)
  say("  -- the payments service goes down")
end)
workerpool.after(1.2, function()
  health:set("up", true)
  say("  -- the payments service is back")
end)
local scene_start = workerpool.now()
local i = 0
while workerpool.now() - scene_start < 2.4 do
  i = i + 1
  local f = b:submit(payments, charge, i)
  local ok, res = f:wait()
  if ok and tostring(res):find("^cached") then
    tally.fallback = tally.fallback + 1
  elseif ok then
    tally.live = tally.live + 1
  else
    tally.failed = tally.failed + 1
  end
  workerpool.sleep(0.05)
end
say("  %d requests: %d served live, %d failed (before the trip, and one probe),"
  .. " %d answered by the fallback", i, tally.live, tally.failed, tally.fallback)
say("  breaker now %s after %s", b:state(), table.concat(transitions, ", "))

-- A retry rides out a single flaky call: the first two attempts fail.
local flaky = workerpool.shared("example.flaky")
local r = retry.submit(payments, { attempts = 4, base = 0.05 }, function()
  local W = require "workerpool"
  local k = W.shared("example.flaky"):incr("calls", 1, 0)
  if k < 3 then error("timeout talking to the service", 0) end
  return "charged on attempt " .. k
end)
local ok, res = r:wait()
say("  retry: %s %s after %d attempts (backoffs %s)", tostring(ok), res, r:info().tries,
  table.concat((function()
    local out = {}
    for k, d in ipairs(r:info().delays) do out[k] = string.format("%.3fs", d) end
    return out
  end)(), ", "))
assert(flaky:get("calls") == 3)
payments:stop_wait()
print((breaker.metrics():gsub("# [^\n]*\n", "")))
