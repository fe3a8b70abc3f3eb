-- test_breaker.lua: workerpool.breaker, the circuit breaker policy
-- (docs/policies.md).
--
-- Time is a shared fake clock the test sets by hand, so open timeouts end
-- exactly when the test says. Each case uses a breaker name of its own.
-- Tasks that must end later block on a gate (a shared dictionary key).

local T = require "harness"
local wp = require "workerpool"
local breaker = require "workerpool.breaker"
local clock = require "workerpool.clock"

local fresh, newpool = T.policy_helpers("breaker")


-- A task whose outcome is its argument: "fail" raises, anything else is
-- returned.
local function work(kind)
  if kind == "fail" then error("downstream failed") end
  return kind
end

-- Like work, after key `k` of dict `dn` was set.
local function gated(dn, k, kind)
  local W = require "workerpool"
  local d = W.shared(dn)
  local deadline = W.now() + 30
  while not d:get(k) do
    if W.now() > deadline then error("gate never opened") end
    W.sleep(0.001)
  end
  if kind == "fail" then error("downstream failed") end
  return kind
end

-- A task that loops until its deadline interrupts it. The loop calls
-- workerpool.now(): under TSan a signal reaches a thread only when it calls
-- an intercepted function, and the deadline's interrupt is signal-driven,
-- so a bare `while true do end` would only end by being declared stuck.
local function spin()
  local W = require "workerpool"
  while true do W.now() end
end

-- Submits work(kind) and waits: true/false plus result, or nil, reason.
local function run(p, kind)
  local f, why = p:submit(work, kind)
  if not f then return nil, why end
  return f:wait()
end

-- A breaker on a fresh name and fake clock that records its transitions.
local function setup(opts)
  local cname = fresh("clock")
  local c = clock.shared(cname)
  opts.name = opts.name or fresh("b")
  opts.clock = c
  local changes = {}
  opts.on_state_change = opts.on_state_change or function(name, from, to)
    changes[#changes + 1] = from .. ">" .. to
    assert(name == opts.name)
  end
  return breaker.new(opts), c, changes, cname
end

local function joined(t) return table.concat(t, " ") end

-- Captures workerpool.log calls while fn runs.
local function capture_logs(fn)
  local lines, saved = {}, wp.log
  wp.log = function(level, msg, fields) lines[#lines + 1] = { level, msg, fields } end
  local ok, err = pcall(fn)
  wp.log = saved
  if not ok then error(err, 0) end
  return lines
end

T.test("consecutive failures open it; open rejects with 'open'; log and metric", function()
  local b, _, changes = setup { consecutive_failures = 3, open_timeout = 10 }
  local p = newpool()
  p:use(b)
  local logs = capture_logs(function()
    T.eq(run(p, "fail"), false)
    T.eq(run(p, "fail"), false)
    T.eq(run(p, "ok"), true, "a success resets the consecutive count")
    T.eq(run(p, "fail"), false)
    T.eq(run(p, "fail"), false)
    T.eq(b:state(), "closed", "2 consecutive, not 3")
    T.eq(run(p, "fail"), false)
  end)
  T.eq(b:state(), "open")
  T.eq(joined(changes), "closed>open")
  T.eq(#logs, 1, "one log line per transition")
  T.eq(logs[1][1], "warn")
  T.eq(logs[1][2], "breaker state change")
  T.eq(logs[1][3].breaker, b.name)
  T.eq(logs[1][3].from, "closed")
  T.eq(logs[1][3].to, "open")
  local f, why = p:submit(work, "ok")
  T.eq(f, nil)
  T.eq(why, "open")
  T.eq(select(2, pcall(p.submit_wait, p, work, "ok")), "open",
    "submit_wait raises 'open'")
  T.eq(p:stats().dropped.breaker_open, 2)
  local s = b:stats()
  T.eq(s.transitions.open, 1)
  T.eq(s.transitions.closed, 0)
  T.eq(s.rejected.open, 2)
  T.eq(s.generation, 2)
  T.eq(s.open_until, 10.0)
  local text = breaker.metrics()
  T.ok(text:find('workerpool_breaker_state{breaker="' .. b.name .. '",state="open"} 1', 1, true),
    text)
  T.ok(text:find('workerpool_breaker_transitions_total{breaker="' .. b.name .. '",to="open"} 1',
    1, true), text)
  T.ok(text:find('workerpool_breaker_rejected_total{breaker="' .. b.name .. '",reason="open"} 2',
    1, true), text)
  T.eq(p:stop_wait(), 0)
end)

T.test("open for open_timeout, then half_open_max trials; that many successes close it",
  function()
    local gd = fresh("gate")
    local b, c, changes = setup { consecutive_failures = 1, open_timeout = 10, half_open_max = 2 }
    local p = newpool { max_workers = 4 }
    p:use(b)
    c.set(100)
    T.eq(run(p, "fail"), false)
    T.eq(b:state(), "open")
    c.set(109.75)
    T.eq(select(2, p:submit(work, "ok")), "open", "still open just before the timeout")
    c.set(110)
    local t1 = p:submit(gated, gd, "t1", "ok")
    T.ok(t1, "the first task after the timeout is a trial")
    T.eq(b:state(), "half-open")
    local t2 = p:submit(gated, gd, "t2", "ok")
    T.ok(t2, "second trial")
    local f, why = p:submit(work, "ok")
    T.eq(f, nil)
    T.eq(why, "half_open", "more than half_open_max trials are refused")
    wp.shared(gd):set("t1", true)
    T.eq(t1:wait(), true)
    T.eq(b:state(), "half-open", "one success of two")
    T.eq(select(2, p:submit(work, "ok")), "half_open", "the finished trial's slot is not reused")
    wp.shared(gd):set("t2", true)
    T.eq(t2:wait(), true)
    T.eq(b:state(), "closed")
    T.eq(joined(changes), "closed>open open>half-open half-open>closed")
    T.eq(run(p, "ok"), true)
    local s = b:stats()
    T.eq(s.rejected.half_open, 2)
    T.eq(s.transitions["half-open"], 1)
    T.eq(s.transitions.closed, 1)
    T.eq(s.generation, 4)
    T.eq(p:stop_wait(), 0)
  end)

T.test("half-open reopens on any failure; open_timeout doubles up to max, resets on close",
  function()
    local b, c, changes = setup { consecutive_failures = 1, open_timeout = 10,
      max_open_timeout = 25, half_open_max = 1 }
    local p = newpool()
    p:use(b)
    T.eq(run(p, "fail"), false)
    T.eq(b:stats().open_until - c.now(), 10.0, "first trip: open_timeout")
    local expect = { 20.0, 25.0, 25.0 }
    for i = 1, 3 do
      c.set(b:stats().open_until)
      T.eq(run(p, "fail"), false, "a failed trial")
      T.eq(b:state(), "open")
      T.eq(b:stats().open_until - c.now(), expect[i], "repeated trip " .. i)
      T.eq(b:stats().trips, i + 1)
    end
    c.set(b:stats().open_until)
    T.eq(run(p, "ok"), true, "a successful trial closes it")
    T.eq(b:state(), "closed")
    T.eq(run(p, "fail"), false)
    T.eq(b:stats().open_until - c.now(), 10.0, "back to open_timeout after a close")
    T.eq(joined(changes), "closed>open open>half-open half-open>open open>half-open "
      .. "half-open>open open>half-open half-open>open open>half-open half-open>closed "
      .. "closed>open")
    T.eq(p:stop_wait(), 0)
  end)

T.test("results of tasks admitted in an older generation are ignored", function()
  local gd = fresh("gate")
  local g = wp.shared(gd)
  local b, c, changes = setup { consecutive_failures = 2, open_timeout = 5, half_open_max = 2 }
  local p = newpool { max_workers = 8 }
  p:use(b)
  -- admitted while closed (generation 1), ending much later
  local old_ok = p:submit(gated, gd, "old_ok", "ok")
  local old_fail = p:submit(gated, gd, "old_fail", "fail")
  T.eq(old_ok and old_fail and true, true)
  T.eq(run(p, "fail"), false)
  T.eq(run(p, "fail"), false)
  T.eq(b:state(), "open")
  c.advance(5)
  local trial = p:submit(gated, gd, "trial", "ok")
  T.ok(trial)
  T.eq(b:state(), "half-open")
  -- the old failure must not reopen, the old success must not count
  g:set("old_fail", true)
  T.eq(old_fail:wait(), false)
  T.eq(b:state(), "half-open", "late failure from generation 1 ignored")
  g:set("old_ok", true)
  T.eq(old_ok:wait(), true)
  T.eq(b:stats().successes, 0, "late success from generation 1 ignored")
  g:set("trial", true)
  T.eq(trial:wait(), true)
  T.eq(b:stats().successes, 1)
  T.eq(b:state(), "half-open")
  -- a trial of this half-open generation, outlived by a reopen
  local late_trial = p:submit(gated, gd, "late_trial", "ok")
  T.ok(late_trial)
  b:trip()
  T.eq(b:state(), "open")
  c.advance(5)
  T.eq(b:state(), "half-open")
  g:set("late_trial", true)
  T.eq(late_trial:wait(), true)
  T.eq(b:stats().successes, 0, "its success belongs to an older half-open")
  T.eq(b:stats().trials, 0)
  T.eq(joined(changes), "closed>open open>half-open half-open>open open>half-open")
  T.eq(p:stop_wait(), 0)
end)

T.test("failure rate over a sliding window, once min_calls were seen", function()
  local b = setup { failure_rate = 0.5, window = 10, min_calls = 5 }
  T.eq(b.consecutive_failures, nil, "no consecutive rule unless asked")
  local p = newpool()
  p:use(b)
  for _, k in ipairs { "fail", "fail", "fail", "fail" } do run(p, k) end
  T.eq(b:state(), "closed", "4 of 4 failed, but fewer than min_calls")
  run(p, "ok")
  T.eq(b:state(), "open", "4 of 5 >= 0.5")
  T.eq(p:stop_wait(), 0)

  local b2 = setup { failure_rate = 0.5, window = 4 }
  T.eq(b2.min_calls, 4, "min_calls defaults to window")
  local p2 = newpool()
  p2:use(b2)
  for _, k in ipairs { "fail", "ok", "ok", "ok", "ok", "fail" } do run(p2, k) end
  T.eq(b2:stats().calls, 4)
  T.eq(b2:stats().failures, 1, "the first failure left the window")
  T.eq(b2:state(), "closed", "2 of 6 overall, 1 of the last 4")
  run(p2, "fail")
  T.eq(b2:state(), "open", "2 of the last 4")
  T.eq(p2:stop_wait(), 0)
end)

T.test("slow-call rate, with durations fed to the hooks directly", function()
  local b = setup { slow_call_s = 1, slow_call_rate = 0.5, window = 4 }
  local function call(outcome, duration)
    local task = { pool = "direct" }
    T.eq(b:admit(task), true)
    b:done(task, outcome, duration)
  end
  call("ok", 2)
  call("ok", 0.1)
  call("ok", 0.1)
  T.eq(b:stats().slow_calls, 1)
  call("ok", 1.0)
  T.eq(b:state(), "open", "2 slow of 4 (slow means duration >= slow_call_s)")
  local b2 = setup { slow_call_s = 1, window = 2 }
  T.eq(b2.slow_call_rate, 1.0, "slow_call_rate defaults to 1")
  local task = {}
  b2:admit(task)
  b2:done(task, "ok", 5)
  task = {}
  b2:admit(task)
  b2:done(task, "ok", 0.5)
  T.eq(b2:state(), "closed")
end)

T.test("timeouts count as failures; cancelled and discarded are not counted", function()
  local gd = fresh("gate")
  local b = setup { consecutive_failures = 2, open_timeout = 5 }
  local p = newpool { max_workers = 1 }
  p:use(b)
  local f = p:submit { fn = spin, timeout = 0.1 }
  T.eq(select(2, f:wait()), "timeout")
  T.eq(b:stats().consecutive_failures, 1, "a timeout is a failure")
  local blocker = p:submit(gated, gd, "open", "ok")
  T.eventually(function() return p:running() == 1 and p:waiting() == 0 end, 10,
    "blocker started")
  local q = p:submit(work, "fail")
  T.eq(q:cancel(), true)
  T.eq(select(2, q:wait()), "cancelled")
  T.eq(b:stats().consecutive_failures, 1, "cancelled: not counted either way")
  local d = p:submit(work, "fail")
  local helper = newpool { max_workers = 1 }
  helper:submit(function(dn)
    local W = require "workerpool"
    W.sleep(0.05)
    W.shared(dn):set("open", true)
  end, gd)
  T.eq(p:stop(), 1, "the queued task is discarded")
  T.eq(select(2, d:wait()), "discarded")
  T.eq(blocker:wait(), true)
  T.eq(b:stats().consecutive_failures, 0, "the blocker's success counted, the discard not")
  T.eq(b:stats().calls, 0, "no window without a rate rule")
  T.eq(b:state(), "closed")
  T.eq(helper:stop_wait(), 0)
end)

T.test("a half-open trial cancelled while queued frees its slot", function()
  local gd = fresh("gate")
  local b, c = setup { consecutive_failures = 1, open_timeout = 1, half_open_max = 1 }
  local p = newpool { max_workers = 1 }
  local first = p:submit(gated, gd, "open", "ok") -- before use: not guarded
  T.eventually(function() return p:running() == 1 and p:waiting() == 0 end, 10,
    "blocker started")
  p:use(b)
  b:trip()
  c.advance(1)
  local t = p:submit(work, "ok")
  T.ok(t, "a queued trial")
  T.eq(select(2, p:submit(work, "ok")), "half_open")
  T.eq(t:cancel(), true)
  wp.poll()
  T.eq(b:stats().trials, 0, "the cancelled trial's slot is free")
  T.eq(b:state(), "half-open")
  local t2 = p:submit(work, "ok")
  T.ok(t2, "a new trial")
  wp.shared(gd):set("open", true)
  T.eq(first:wait(), true)
  T.eq(t2:wait(), true)
  T.eq(b:state(), "closed")
  T.eq(p:stop_wait(), 0)
end)

T.test("is_failure decides what counts", function()
  local seen = {}
  local b = setup { consecutive_failures = 2, is_failure = function(outcome, duration)
    seen[#seen + 1] = outcome
    T.eq(type(duration), "number")
    if outcome == "error" then return "ignore" end
    return outcome ~= "ok"
  end }
  local p = newpool { max_workers = 1 }
  p:use(b)
  for _ = 1, 5 do run(p, "fail") end
  T.eq(b:state(), "closed", "errors are ignored by this is_failure")
  T.eq(b:stats().calls, 0)
  p:submit({ fn = spin, timeout = 0.05 }):wait()
  p:submit({ fn = spin, timeout = 0.05 }):wait()
  T.eq(b:state(), "open")
  T.eq(seen[1], "error")
  T.eq(seen[7], "timeout")
  T.eq(p:stop_wait(), 0)
end)

T.test("a refusal by a later policy gives the half-open trial back", function()
  local b, c = setup { consecutive_failures = 1, open_timeout = 1, half_open_max = 1 }
  local p = newpool { max_workers = 1 }
  local refuse = true
  p:use(b):use { admit = function()
    if refuse then return nil, "nope" end
    return true
  end }
  refuse = false
  T.eq(run(p, "fail"), false)
  refuse = true
  c.advance(1)
  T.eq(select(2, p:submit(work, "ok")), "nope")
  T.eq(b:state(), "half-open")
  T.eq(b:stats().trials, 0, "undo freed the trial slot")
  refuse = false
  T.eq(run(p, "ok"), true)
  T.eq(b:state(), "closed")
  T.eq(p:stop_wait(), 0)
end)

T.test("one breaker guards several pools", function()
  local b = setup { consecutive_failures = 2, open_timeout = 30 }
  local p1, p2 = newpool(), newpool()
  p1:use(b)
  p2:use(b)
  T.eq(run(p1, "fail"), false)
  T.eq(run(p2, "fail"), false)
  T.eq(b:state(), "open", "failures of both pools count")
  T.eq(select(2, p1:submit(work, "ok")), "open")
  T.eq(select(2, p2:submit(work, "ok")), "open")
  T.eq(p1:stop_wait(), 0)
  T.eq(p2:stop_wait(), 0)
end)

T.test("its state is shared by every state that builds it with the same name", function()
  local b, c, changes, cname = setup { consecutive_failures = 1, open_timeout = 10 }
  local target = newpool { name = fresh("target") }
  local other = newpool()
  target:use(b)
  T.eq(run(target, "fail"), false)
  T.eq(b:state(), "open")
  local worker_side = function(bname, cn, tname, phase)
    local W = require "workerpool"
    -- worker states outlive tasks: attach once per state, not per task
    local key = "breaker test " .. bname
    local st = _G[key]
    if not st then
      st = { seen = {} }
      st.bk = W.breaker.new { name = bname, consecutive_failures = 1, open_timeout = 10,
        clock = require("workerpool.clock").shared(cn),
        on_state_change = function(_, from, to) st.seen[#st.seen + 1] = from .. ">" .. to end }
      st.pool = W.get(tname):use(st.bk)
      _G[key] = st
    end
    local seen, bk, pool = {}, st.bk, st.pool
    st.seen = seen
    local state = bk:state()
    local f, why = pool:submit(function() return "worker ok" end)
    if not f then return phase, state, why end
    local ok, r = f:wait()
    return phase, state, ok, r, bk:state(), table.concat(seen, " ")
  end
  local r = table.pack(other:submit_wait(worker_side, b.name, cname, target:name(), 1))
  T.eq(r[2], "open", "the worker sees the host's trip")
  T.eq(r[3], "open", "and is refused")
  c.advance(10)
  r = table.pack(other:submit_wait(worker_side, b.name, cname, target:name(), 2))
  T.eq(r[2], "half-open", "the worker moves it to half-open")
  T.eq(r[3], true)
  T.eq(r[4], "worker ok")
  T.eq(r[5], "closed", "the worker's trial closed it")
  T.eq(r[6], "open>half-open half-open>closed", "callbacks run where the change happened")
  T.eq(b:state(), "closed", "the host sees it closed")
  T.eq(joined(changes), "closed>open", "the host's callback saw only its own change")
  T.eq(other:stop_wait(), 0)
  T.eq(target:stop_wait(), 0)
end)

-- Half-open under contention: 4 worker states race for the trials of one
-- half-open breaker; exactly half_open_max get in.
T.test("half-open admits exactly half_open_max trials across racing states", function()
  local MAX = 3
  local gd = fresh("gate")
  -- no closures over this state: the racers rebuild the host's breaker
  local b, c = setup { consecutive_failures = 1, open_timeout = 1, half_open_max = MAX,
    on_state_change = function() end }
  local target = newpool { name = fresh("target"), max_workers = 8 }
  local racers = newpool { max_workers = 4, min_workers = 4 }
  target:use(b)
  T.eq(run(target, "fail"), false)
  c.advance(1)
  local race = function(tname, dn, ctl)
    local W = require "workerpool"
    local pool = W.get(tname) -- the host's breaker guards it here too
    local d = W.shared(ctl)
    d:incr("ready", 1, 0)
    while (d:get("ready") or 0) < 4 do end
    local admitted, refused = {}, 0
    for _ = 1, 50 do
      local f = pool:submit(function(gn)
        local X = require "workerpool"
        while not X.shared(gn):get("open") do X.sleep(0.001) end
        return true
      end, dn)
      if f then admitted[#admitted + 1] = f else refused = refused + 1 end
    end
    for _, f in ipairs(admitted) do assert(f:wait()) end
    return #admitted, refused
  end
  local ctl = fresh("ctl")
  local fs = {}
  for i = 1, 4 do fs[i] = racers:submit(race, target:name(), gd, ctl) end
  -- release the trials only once every racer made all its attempts
  T.eventually(function() return b:stats().rejected.half_open >= 200 - MAX end, 30,
    "all attempts made")
  wp.shared(gd):set("open", true)
  local total = 0
  for i = 1, 4 do
    local ok, a, r = fs[i]:wait()
    T.ok(ok, tostring(a))
    T.eq(a + r, 50)
    total = total + a
  end
  T.eq(total, MAX, "exactly half_open_max trials")
  T.eq(b:state(), "closed", "their successes closed it")
  T.eq(racers:stop_wait(), 0)
  T.eq(target:stop_wait(), 0)
end)

T.test("fallback: breaker:submit sends refused tasks to a degraded handler", function()
  local degraded = newpool { max_workers = 1 }
  local calls = {}
  local b = setup { consecutive_failures = 1, open_timeout = 60,
    fallback = function(reason, task, ...)
      calls[#calls + 1] = reason
      T.eq(task, work)
      if select(1, ...) == "cached" then return breaker.resolved("from cache", ...) end
      return degraded:submit(function(x) return "degraded " .. x end, ...)
    end }
  local p = newpool()
  p:use(b)
  local f = b:submit(p, work, "live")
  T.eq(select(2, f:wait()), "live", "closed: the real pool")
  T.eq(b:submit(p, work, "fail"):wait(), false)
  T.eq(b:state(), "open")
  f = b:submit(p, work, "x")
  T.eq(select(2, f:wait()), "degraded x", "open: the degraded handler")
  local r = b:submit(p, work, "cached")
  T.eq(r:done(), true)
  T.eq(r:status(), "ok")
  local ok, a, bb = r:wait()
  T.eq(ok, true)
  T.eq(a, "from cache")
  T.eq(bb, "cached")
  T.eq(joined(calls), "open open")
  T.eq(select(2, p:submit(work, "x")), "open", "plain submit is still refused")
  T.eq(p:stats().dropped.breaker_open, 3, "the fallback does not hide the drops")
  -- a refusal by another policy is not the breaker's: no fallback
  local p2 = newpool()
  local b2 = setup { consecutive_failures = 1, fallback = function() error("not me") end }
  p2:use(b2):use { admit = function() return nil, "other" end }
  local g, why = b2:submit(p2, work, "x")
  T.eq(g, nil)
  T.eq(why, "other")
  T.eq(p:stop_wait(), 0)
  T.eq(p2:stop_wait(), 0)
  T.eq(degraded:stop_wait(), 0)
end)

T.test("reset and trip force a state; on_state_change errors are logged", function()
  local b, _, changes = setup { consecutive_failures = 3, open_timeout = 10 }
  b:trip()
  T.eq(b:state(), "open")
  b:reset()
  T.eq(b:state(), "closed")
  b:reset()
  T.eq(joined(changes), "closed>open open>closed", "no transition, no callback")
  local b2 = setup { on_state_change = function() error("callback bug") end }
  local logs = capture_logs(function() b2:trip() end)
  T.eq(b2:state(), "open", "the transition happened")
  T.eq(#logs, 2)
  T.eq(logs[2][1], "error")
  T.ok(tostring(logs[2][3].error):find("callback bug", 1, true))
end)

T.test("argument errors", function()
  local function bad(opts, msg)
    T.raises(function() breaker.new(opts) end, msg, msg)
  end
  T.raises(function() breaker.new() end, "breaker.new: options must be a table")
  bad({}, "breaker.new: name must be a non-empty string")
  bad({ name = "" }, "name must be a non-empty string")
  bad({ name = "x", consecutive_failures = 0 },
    "consecutive_failures must be a positive integer (got 0)")
  bad({ name = "x", consecutive_failures = 1.5 },
    "consecutive_failures must be a positive integer (got 1.5)")
  bad({ name = "x", failure_rate = 0 }, "failure_rate must be a number > 0 and <= 1")
  bad({ name = "x", failure_rate = 1.5 }, "failure_rate must be a number > 0 and <= 1")
  bad({ name = "x", failure_rate = 0.5, window = 0 }, "window must be an integer from 1 to 10000")
  bad({ name = "x", failure_rate = 0.5, window = 10, min_calls = 11 },
    "min_calls must be an integer from 1 to 10")
  bad({ name = "x", window = 10 }, "window and min_calls need failure_rate or slow_call_s")
  bad({ name = "x", slow_call_rate = 0.5 }, "slow_call_rate needs slow_call_s")
  bad({ name = "x", slow_call_s = -1 }, "slow_call_s must be a positive finite number (got -1)")
  bad({ name = "x", open_timeout = -1 },
    "open_timeout must be a non-negative finite number (got -1)")
  bad({ name = "x", open_timeout = 10, max_open_timeout = 5 },
    "max_open_timeout must not be below open_timeout")
  bad({ name = "x", half_open_max = 0 }, "half_open_max must be a positive integer (got 0)")
  bad({ name = "x", is_failure = true }, "is_failure must be a function")
  bad({ name = "x", on_state_change = 1 }, "on_state_change must be a function")
  bad({ name = "x", fallback = 5 }, "fallback must be a function")
  bad({ name = "x", fallback = "" }, "fallback must be a function or a handler name")
  bad({ name = "x", clock = 3 }, "clock must be a function or a table with a now() function")
  bad({ name = "x", dict = "" }, "dict must be a non-empty string")
  bad({ name = "x", timeout = 1 }, "unknown option 'timeout'")
  local b = breaker.new { name = fresh("defaults") }
  T.eq(b.consecutive_failures, 5)
  T.eq(b.open_timeout, 60.0)
  T.eq(b.half_open_max, 1)
  T.eq(b.window, 0)
  T.eq(b:state(), "closed")
end)

T.test("module: reachable as workerpool.breaker in every state", function()
  T.eq(wp.breaker, breaker)
  local p = newpool { max_workers = 1 }
  T.eq(p:submit_wait(function()
    local W = require "workerpool"
    return W.breaker == require("workerpool.breaker") and W.breaker.new ~= nil
  end), true)
  T.eq(p:stop_wait(), 0)
end)

T.run()
