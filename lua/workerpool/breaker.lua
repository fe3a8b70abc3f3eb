-- workerpool.breaker: a circuit breaker policy for pool:use(), after
-- sony/gobreaker (states, half-open trials, generations) and resilience4j
-- (failure and slow-call rates over a sliding window of calls).
--
--   local breaker = require "workerpool.breaker"
--   local b = breaker.new{name = "payments", consecutive_failures = 5,
--                         open_timeout = 10}
--   pool:use(b)
--   pool:submit(call_downstream, ...)        -- nil, "open" while open
--
-- The breaker's state lives in a workerpool.shared dictionary under its
-- name, and every change is a cas on one packed record, so every state
-- that builds a breaker with the same name (the host, worker states, any
-- pool it guards) sees and moves the same breaker. See docs/policies.md.
local workerpool = require "workerpool"
local util = require "workerpool.util"

local breaker = {}

local CLOSED, OPEN, HALF = 0, 1, 2
local STATE_NAMES = { [CLOSED] = "closed", [OPEN] = "open", [HALF] = "half-open" }
breaker.STATES = { closed = CLOSED, open = OPEN, ["half-open"] = HALF }

-- The record: state, generation, consecutive failures, opened_at,
-- open_for (the current open timeout), trips (opens since the last close),
-- trials (admitted in half-open), successes (in half-open), failures and
-- slow calls in the window, and the window itself: one character per call,
-- oldest first, '0' + (1 if failure) + (2 if slow).
local PACK = "<Bjjddjjjjjs4"

local function fresh()
  return { state = CLOSED, gen = 1, consec = 0, opened_at = 0.0, open_for = 0.0,
           trips = 0, trials = 0, successes = 0, nfail = 0, nslow = 0, win = "" }
end

local function decode(raw)
  if raw == nil then return fresh() end
  local r = {}
  r.state, r.gen, r.consec, r.opened_at, r.open_for, r.trips, r.trials,
    r.successes, r.nfail, r.nslow, r.win = string.unpack(PACK, raw)
  return r
end

local function encode(r)
  return string.pack(PACK, r.state, r.gen, r.consec, r.opened_at, r.open_for,
    r.trips, r.trials, r.successes, r.nfail, r.nslow, r.win)
end

local function copy(r)
  local c = {}
  for k, v in pairs(r) do c[k] = v end
  return c
end

-- ---- options ------------------------------------------------------------

local RATE = { above = 0, max = 1 }

local KNOWN = {
  name = true, consecutive_failures = true, window = true, failure_rate = true,
  min_calls = true, slow_call_s = true, slow_call_rate = true, open_timeout = true,
  max_open_timeout = true, half_open_max = true, is_failure = true,
  on_state_change = true, fallback = true, dict = true, capacity = true, clock = true,
}

-- Timeouts and errors are failures, ok a success; a task that never ran
-- (cancelled while queued, discarded at stop) says nothing about the
-- downstream and is not counted.
function breaker.default_is_failure(outcome)
  if outcome == "ok" then return false end
  if outcome == "error" or outcome == "timeout" then return true end
  return "ignore"
end

local B = {}
B.__index = B

-- breaker.new{name = ... [, consecutive_failures =] [, window =]
--   [, failure_rate =] [, min_calls =] [, slow_call_s =] [, slow_call_rate =]
--   [, open_timeout = 60] [, max_open_timeout =] [, half_open_max = 1]
--   [, is_failure = fn(outcome, duration)] [, on_state_change = fn(name, from, to)]
--   [, fallback = fn(reason, task, ...)] [, dict =] [, capacity =] [, clock =]}
function breaker.new(opts)
  local ck = util.checker(breaker.new, "breaker.new: %s")
  ck:options(opts, KNOWN)
  local self = setmetatable({ name = ck:string("name", opts.name) }, B)
  self.consecutive_failures = ck:integer("consecutive_failures", opts.consecutive_failures, {})
  self.failure_rate = ck:number("failure_rate", opts.failure_rate, RATE)
  self.slow_call_s = ck:number("slow_call_s", opts.slow_call_s, { above = 0 })
  self.slow_call_rate = ck:number("slow_call_rate", opts.slow_call_rate, RATE)
  if self.slow_call_rate and not self.slow_call_s then
    ck:fail("slow_call_rate needs slow_call_s")
  end
  if self.slow_call_s and not self.slow_call_rate then self.slow_call_rate = 1.0 end
  local windowed = self.failure_rate or self.slow_call_s
  if not windowed and not self.consecutive_failures then
    self.consecutive_failures = 5 -- gobreaker trips after 5 consecutive failures
  end
  if (opts.window ~= nil or opts.min_calls ~= nil) and not windowed then
    ck:fail("window and min_calls need failure_rate or slow_call_s")
  end
  self.window = ck:integer("window", opts.window,
    { max = 10000, default = windowed and 100 or 0 })
  self.min_calls = ck:integer("min_calls", opts.min_calls,
    { max = math.max(self.window, 1), default = self.window })
  self.open_timeout = ck:number("open_timeout", opts.open_timeout, { default = 60.0 })
  self.max_open_timeout = ck:number("max_open_timeout", opts.max_open_timeout, {})
  if self.max_open_timeout and self.max_open_timeout < self.open_timeout then
    ck:fail("max_open_timeout must not be below open_timeout")
  end
  self.half_open_max = ck:integer("half_open_max", opts.half_open_max, { default = 1 })
  self.is_failure = ck:func("is_failure", opts.is_failure) or breaker.default_is_failure
  self.on_state_change = ck:func("on_state_change", opts.on_state_change)
  if type(opts.fallback) == "string" then
    if opts.fallback == "" then ck:fail("fallback must be a function or a handler name") end
    self.fallback = opts.fallback
  else
    self.fallback = ck:func("fallback", opts.fallback)
  end
  self.now = ck:clock(opts.clock)
  local dname = opts.dict or "workerpool.breaker"
  self.dict, self.dict_name, self.key = ck:dict(dname, opts.capacity), dname, "b:" .. opts.name
  -- workerpool.metrics() reports the breakers of every dict named here.
  local md = workerpool.shared("workerpool.metrics", { capacity = 4 << 20 })
  if md then md:set("B\31" .. dname, true) end
  self.spec = util.spec("workerpool.breaker", "new", opts)
  return self
end

-- ---- transitions --------------------------------------------------------

-- A copy of r in `state`, one generation on, with the counts discarded.
function B:enter(r, state, now)
  local n = copy(r)
  n.state, n.gen = state, r.gen + 1
  n.consec, n.nfail, n.nslow, n.win, n.trials, n.successes = 0, 0, 0, "", 0, 0
  if state == OPEN then
    n.trips = r.state == HALF and r.trips + 1 or 1
    local t = self.open_timeout
    if self.max_open_timeout then
      t = math.min(self.max_open_timeout, t * 2.0 ^ (n.trips - 1))
    end
    n.opened_at, n.open_for = now, t
  elseif state == CLOSED then
    n.trips = 0
  end
  return n
end

-- Runs after a cas that moved the breaker from `from` to `to`: counts the
-- transition, logs it and calls on_state_change. Exactly one state runs it
-- per transition: the one whose cas won.
function B:changed(from, to)
  local f, t = STATE_NAMES[from], STATE_NAMES[to]
  self.dict:incr("x:" .. t .. ":" .. self.name, 1, 0)
  workerpool.log("warn", "breaker state change", { breaker = self.name, from = f, to = t })
  if self.on_state_change then
    local ok, err = pcall(self.on_state_change, self.name, f, t)
    if not ok then
      workerpool.log("error", "breaker on_state_change failed",
        { breaker = self.name, error = tostring(err) })
    end
  end
end

-- Replaces the record `raw` by `r`: true when no one changed it meanwhile,
-- false when someone did, nil and a message when the dictionary is full.
function B:put(raw, r)
  local ok, err = self.dict:cas(self.key, raw, encode(r))
  if ok == nil then return nil, "breaker '" .. self.name .. "': " .. tostring(err) end
  return ok
end

-- Moves the record by step(self, r, ...) until the cas holds: step
-- returns the record to write, or nil to leave r as it is. Runs changed()
-- when the state moved. Returns the record written, or r when step
-- returned nil; nil and a message when the dictionary is full.
function B:update(step, ...)
  while true do
    local raw = self.dict:get(self.key)
    local r = decode(raw)
    local n = step(self, r, ...)
    if n == nil then return r end
    local ok, err = self:put(raw, n)
    if ok then
      if n.state ~= r.state then self:changed(r.state, n.state) end
      return n
    elseif ok == nil then
      return nil, err
    end
  end
end

local function mark(task, name, gen)
  local g = task.breaker_gen
  if g == nil then
    g = {}
    task.breaker_gen = g
  end
  g[name] = gen
end

-- A refusal: with a fallback handler name, the third result asks submit
-- to run that handler instead (degraded mode).
function B:refuse(reason)
  self.dict:incr("r:" .. reason .. ":" .. self.name, 1, 0)
  self.refused = reason -- for breaker:submit, in this state only
  if type(self.fallback) == "string" then
    self.dict:incr("f:" .. self.name, 1, 0)
    return nil, reason, self.fallback
  end
  return nil, reason
end

-- ---- the policy ----------------------------------------------------------

-- policy:admit(task) -> true | nil, "open" | nil, "half_open"
function B:admit(task)
  while true do
    local raw = self.dict:get(self.key)
    local r = decode(raw)
    if r.state == CLOSED then
      mark(task, self.name, r.gen)
      return true
    elseif r.state == OPEN then
      if self.now() < r.opened_at + r.open_for then return self:refuse("open") end
      local n = self:enter(r, HALF)
      n.trials = 1
      local ok, err = self:put(raw, n)
      if ok then
        mark(task, self.name, n.gen)
        self:changed(OPEN, HALF)
        return true
      elseif ok == nil then
        return nil, err -- a full dictionary: refuse rather than raise
      end
    else
      if r.trials >= self.half_open_max then return self:refuse("half_open") end
      local n = copy(r)
      n.trials = r.trials + 1
      local ok, err = self:put(raw, n)
      if ok then
        mark(task, self.name, n.gen)
        return true
      elseif ok == nil then
        return nil, err
      end
    end
  end
end

-- Takes the generation the task was admitted in, once.
local function take_gen(task, name)
  local g = task.breaker_gen
  local gen = g and g[name]
  if gen then g[name] = nil end
  return gen
end

-- Frees a half-open trial slot of generation gen (a refused or ignored
-- task).
local function free_step(_, r, gen)
  if r.gen ~= gen or r.state ~= HALF or r.trials == 0 then return nil end
  local n = copy(r)
  n.trials = r.trials - 1
  return n
end

function B:free_trial(gen)
  self:update(free_step, gen)
end

-- policy:undo(task): the task was not queued after all.
function B:undo(task)
  local gen = take_gen(task, self.name)
  if gen then self:free_trial(gen) end
end

-- Appends one call to the closed state's counts.
function B:record(n, failure, slow)
  n.consec = failure and n.consec + 1 or 0
  if self.window == 0 then return end
  n.win = n.win .. string.char(48 + (failure and 1 or 0) + (slow and 2 or 0))
  if failure then n.nfail = n.nfail + 1 end
  if slow then n.nslow = n.nslow + 1 end
  if #n.win > self.window then
    local old = n.win:byte(1) - 48
    n.win = n.win:sub(2)
    if old & 1 ~= 0 then n.nfail = n.nfail - 1 end
    if old & 2 ~= 0 then n.nslow = n.nslow - 1 end
  end
end

function B:should_trip(n)
  if self.consecutive_failures and n.consec >= self.consecutive_failures then return true end
  local calls = #n.win
  if self.window > 0 and calls >= self.min_calls then
    if self.failure_rate and n.nfail / calls >= self.failure_rate then return true end
    if self.slow_call_s and n.nslow / calls >= self.slow_call_rate then return true end
  end
  return false
end

-- The step of done: r with one call of generation gen counted.
local function count_step(self, r, gen, failure, slow)
  if r.gen ~= gen then return nil end -- a late result of an older generation
  if r.state == CLOSED then
    local n = copy(r)
    self:record(n, failure, slow)
    if self:should_trip(n) then return self:enter(r, OPEN, self.now()) end
    return n
  elseif r.state == HALF then
    if failure then return self:enter(r, OPEN, self.now()) end
    local n = copy(r)
    n.successes = r.successes + 1
    if n.successes >= self.half_open_max then return self:enter(r, CLOSED) end
    return n
  end
  return nil -- open admits nothing in its own generation
end

-- policy:done(task, outcome, duration_s): counts the call, unless it was
-- admitted in an earlier generation.
function B:done(task, outcome, duration)
  local gen = take_gen(task, self.name)
  if not gen then return end
  local verdict = self.is_failure(outcome, duration)
  if verdict == "ignore" then return self:free_trial(gen) end
  -- a full dictionary: the call is not counted
  self:update(count_step, gen, verdict and true or false,
    self.slow_call_s ~= nil and (duration or 0) >= self.slow_call_s)
end

-- ---- inspection and control ----------------------------------------------

-- The record brought to now: an open breaker whose timeout passed becomes
-- half-open here (as gobreaker's State does).
local function due_step(self, r)
  if r.state ~= OPEN or self.now() < r.opened_at + r.open_for then return nil end
  return self:enter(r, HALF)
end

function B:current()
  local r, err = self:update(due_step)
  if r == nil then error(err, 3) end
  return r
end

-- breaker:state() -> "closed" | "open" | "half-open"
function B:state()
  return STATE_NAMES[self:current().state]
end

-- breaker:stats() -> {state, generation, consecutive_failures, calls,
--   failures, slow_calls, trials, successes, open_until, trips,
--   transitions = {closed, open, ["half-open"]}, rejected = {open, half_open}}
function B:stats()
  local r = self:current()
  local d = self.dict
  local s = {
    state = STATE_NAMES[r.state], generation = r.gen, consecutive_failures = r.consec,
    calls = #r.win, failures = r.nfail, slow_calls = r.nslow, trials = r.trials,
    successes = r.successes, trips = r.trips,
    open_until = r.state == OPEN and r.opened_at + r.open_for or nil,
    transitions = {}, rejected = {},
  }
  for _, t in pairs(STATE_NAMES) do s.transitions[t] = d:get("x:" .. t .. ":" .. self.name) or 0 end
  for _, why in ipairs { "open", "half_open" } do
    s.rejected[why] = d:get("r:" .. why .. ":" .. self.name) or 0
  end
  return s
end

-- Forces a state: breaker:reset() closes, breaker:trip() opens (for
-- open_timeout from now). Both start a new generation.
local function force_step(self, r, state)
  local n = self:enter(r, state, self.now())
  if state == OPEN then n.trips, n.open_for = 1, self.open_timeout end
  return n
end

function B:force(state)
  local r, err = self:update(force_step, state)
  if r == nil then error(err, 3) end
end

function B:reset() self:force(CLOSED) end
function B:trip() self:force(OPEN) end

-- ---- fallback --------------------------------------------------------------

-- breaker:submit(pool, task, ...): pool:submit(task, ...), except that when
-- this breaker refuses the task and the breaker has a fallback, the result
-- is fallback(reason, task, ...) instead. The breaker must be attached to
-- the pool (pool:use). A fallback returns what submit returns: usually a
-- future from another pool, or breaker.resolved(...).
function B:submit(pool, task, ...)
  self.refused = nil
  local f, err, ename = pool:submit(task, ...)
  local reason = self.refused
  self.refused = nil
  if f == nil and reason ~= nil and type(self.fallback) == "function" then
    return self.fallback(reason, task, ...)
  end
  return f, err, ename
end

-- A future-like object that has already ended with `true, ...`.
local Resolved = {}
Resolved.__index = Resolved
function Resolved:wait() return true, table.unpack(self, 1, self.n) end
function Resolved.done() return true end
function Resolved.status() return "ok" end
function Resolved.cancel() return false end

function breaker.resolved(...)
  return setmetatable(table.pack(...), Resolved)
end

-- ---- metrics ------------------------------------------------------------------

local label = util.label

-- The counters, one family each: the dictionary key "<key>:<value>:<breaker>"
-- holds the count of the series {breaker=, <label>=value}.
local COUNTERS = {
  { key = "x", name = "workerpool_breaker_transitions_total", label = "to",
    help = "State changes, by target state." },
  { key = "r", name = "workerpool_breaker_rejected_total", label = "reason",
    help = "Tasks refused, by reason." },
}

-- breaker.metrics([dict]) -> Prometheus text for every breaker of dict
-- (default "workerpool.breaker"): state, transitions, rejections. Append
-- it to workerpool.metrics() where the endpoint is served.
function breaker.metrics(dname)
  local d = workerpool.shared(dname or "workerpool.breaker")
  local keys = d:keys() or {}
  table.sort(keys)
  local out = {
    "# HELP workerpool_breaker_state Current state of each circuit breaker (1: current).",
    "# TYPE workerpool_breaker_state gauge",
  }
  for _, k in ipairs(keys) do
    local name = k:match("^b:(.*)$")
    local raw = name and d:get(k)
    if raw then
      local r = decode(raw)
      for _, s in ipairs { CLOSED, OPEN, HALF } do
        out[#out + 1] = string.format('workerpool_breaker_state{breaker="%s",state="%s"} %d',
          label(name), STATE_NAMES[s], r.state == s and 1 or 0)
      end
    end
  end
  for _, c in ipairs(COUNTERS) do
    out[#out + 1] = "# HELP " .. c.name .. " " .. c.help
    out[#out + 1] = "# TYPE " .. c.name .. " counter"
    for _, k in ipairs(keys) do
      local v, name = k:match("^" .. c.key .. ":([^:]+):(.*)$")
      if v then
        out[#out + 1] = string.format('%s{breaker="%s",%s="%s"} %d', c.name, label(name),
          c.label, v, d:get(k) or 0)
      end
    end
  end
  return table.concat(out, "\n") .. "\n"
end

return breaker
