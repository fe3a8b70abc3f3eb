-- workerpool.retry: submit a task and submit it again when it fails, with
-- exponential backoff and full jitter (the AWS "Exponential Backoff And
-- Jitter" scheme).
--
--   local retry = require "workerpool.retry"
--   local r = retry.submit(pool, {attempts = 4, base = 0.1}, fetch, url)
--   local ok, body = r:wait()               -- the final outcome, once
--
-- Every attempt is an ordinary pool:submit, so the pool's policies see each
-- one. Under a host loop (`wpool run`) a host coroutine waits for each
-- attempt and sleeps through the backoff without blocking the loop; in
-- plain Lua or a worker state the retries happen inside r:wait() (and
-- r:done() moves things along without blocking). See docs/policies.md.
local workerpool = require "workerpool"
local util = require "workerpool.util"

local retry = {}

local KNOWN = { attempts = true, base = true, max_delay = true, retry_on = true,
  jitter = true, random = true, sleep = true, clock = true }
local OUTCOMES = { ok = true, error = true, timeout = true, cancelled = true, discarded = true }
local JITTER = { full = true, equal = true, none = true }

local function check_opts(opts)
  local ck = util.checker(retry.submit, "retry.submit: %s")
  opts = ck:options(opts == nil and {} or opts, KNOWN)
  local o = {}
  o.attempts = ck:integer("attempts", opts.attempts, { default = 3 })
  o.base = ck:number("base", opts.base, { unit = "seconds", default = 0.1 })
  o.max_delay = ck:number("max_delay", opts.max_delay, { inf = true, unit = "seconds",
    default = 30.0 })
  o.retry_on = opts.retry_on or { error = true, timeout = true }
  if type(o.retry_on) ~= "table" then ck:fail("retry_on must be a table of outcomes") end
  for k in pairs(o.retry_on) do
    if not OUTCOMES[k] or k == "ok" then
      ck:fail("retry_on: '%s' is not a failed outcome (error, timeout, cancelled or discarded)",
        tostring(k))
    end
  end
  o.jitter = opts.jitter or "full"
  if not JITTER[o.jitter] then ck:fail('jitter must be "full", "equal" or "none"') end
  o.random = ck:func("random", opts.random) or math.random
  o.sleep = ck:func("sleep", opts.sleep) or workerpool.sleep
  o.now = ck:clock(opts.clock)
  return o
end

-- The delay before retry number k (k = 1 after the first failure):
-- cap = min(max_delay, base * 2^(k-1)); full jitter draws from [0, cap),
-- equal jitter from [cap/2, cap), none waits cap.
function retry.delay(o, k)
  local cap = math.min(o.max_delay, o.base * 2.0 ^ (k - 1))
  if o.jitter == "none" then return cap end
  local u = o.random()
  if o.jitter == "equal" then return cap / 2 + u * cap / 2 end
  return u * cap
end

local R = {}
R.__index = R

local function pack(...) return { n = select("#", ...), ... } end

-- Submits attempt number self.tries + 1; false, the reason and its NAME
-- when the pool refused it.
function R:launch()
  local f, err, ename = self.pool:submit(self.task, table.unpack(self.args, 1, self.args.n))
  if not f then return false, err, ename end
  self.tries = self.tries + 1
  self.f = f
  self.phase = "running"
  return true
end

function R:finish(why)
  self.phase = "done"
  self.why = why
  self.f = nil
end

-- Takes the outcome of the current attempt (the values of f:wait()):
-- ends, or schedules the next attempt at self.next_at.
function R:settle(res)
  local outcome = self.f:status()
  self.result, self.outcome = res, outcome
  if outcome == "ok" then return self:finish("succeeded") end
  if self.cancelled then return self:finish("cancelled") end
  if not self.o.retry_on[outcome] then return self:finish("not_retryable") end
  if self.tries >= self.o.attempts then return self:finish("exhausted") end
  if self.pool:stopped() then return self:finish("stopped") end
  self.delay = retry.delay(self.o, self.tries)
  self.delays[#self.delays + 1] = self.delay
  self.next_at = self.o.now() + self.delay
  self.phase = "backoff"
  self.f = nil
end

-- The backoff ended: submit again, unless the pool stopped meanwhile.
function R:relaunch()
  if self.cancelled then return self:finish("cancelled") end
  if self.pool:stopped() then return self:finish("stopped") end
  local ok, err, ename = self:launch()
  if not ok then
    self:finish(ename == "ESTOPPED" and "stopped" or ("refused: " .. tostring(err)))
  end
end

-- The host coroutine that drives a retry under `wpool run`.
local function drive(self)
  while self.phase ~= "done" do
    if self.phase == "running" then
      self:settle(pack(self.f:wait()))
    else
      self.o.sleep(self.delay)
      self:relaunch()
    end
  end
end

-- Plain Lua: moves the retry on until it is done (true) or the deadline
-- passed (false). Sleeps through a backoff with o.sleep, which need not
-- move o.now (tests pass a recorder).
function R:step(deadline)
  local now = self.o.now
  while self.phase ~= "done" do
    if self.phase == "running" then
      local res
      if deadline then
        res = pack(self.f:wait(math.max(0, deadline - now())))
        if res[1] == nil and res[3] == "ETIMEDOUT" and self.f:status() == "pending" then
          return false
        end
      else
        res = pack(self.f:wait())
      end
      self:settle(res)
    else
      local left = self.next_at - now()
      if deadline and self.next_at > deadline then
        if deadline > now() then self.o.sleep(deadline - now()) end
        return false
      end
      if left > 0 then self.o.sleep(left) end
      self:relaunch()
    end
  end
  return true
end

-- r:wait([timeout]) -> true, results... | false, err; nil, "timeout",
-- "ETIMEDOUT" when timeout seconds passed first (the retry goes on; wait
-- again).
function R:wait(timeout)
  if timeout ~= nil and (type(timeout) ~= "number" or timeout ~= timeout or timeout < 0) then
    error("bad argument #1 to 'wait' (timeout must be a non-negative number)", 2)
  end
  if self.phase ~= "done" then
    if self.host then
      -- a host coroutine drives the retry: join it, or poll it until the
      -- deadline (h:join has no timeout)
      local deadline = timeout and workerpool.now() + timeout
      while self.phase ~= "done" and self.co:status() == "running" do
        if not deadline then
          self.co:join()
        else
          local left = deadline - workerpool.now()
          if left <= 0 then return nil, "timeout", "ETIMEDOUT" end
          workerpool.sleep(math.min(left, 0.005))
        end
      end
      if self.phase ~= "done" then error(select(2, self.co:join()), 2) end
    elseif not self:step(timeout and self.o.now() + timeout) then
      return nil, "timeout", "ETIMEDOUT"
    end
  end
  return table.unpack(self.result, 1, self.result.n)
end

-- r:done() -> boolean. In plain Lua it also starts a due attempt (without
-- blocking).
function R:done()
  if self.phase ~= "done" and not self.host then
    if self.phase == "running" and self.f:done() then
      self:settle(pack(self.f:wait()))
    end
    if self.phase == "backoff" and self.o.now() >= self.next_at then self:relaunch() end
  end
  return self.phase == "done"
end

-- r:status() -> "pending" or the final outcome ("ok", "error", "timeout",
-- "cancelled", "discarded").
function R:status()
  if not self:done() then return "pending" end
  return self.outcome
end

-- r:cancel(): no further attempts; a queued attempt is cancelled, a
-- running one finishes and its outcome is final. Returns true unless the
-- retry had already ended.
function R:cancel()
  if self.phase == "done" then return false end
  self.cancelled = true
  if self.phase == "running" then
    self.f:cancel()
  elseif self.phase == "backoff" and not self.host then
    self:finish("cancelled")
  end
  return true
end

-- r:info() -> {tries =, delays = {...}, why = "succeeded" | "exhausted" |
--   "not_retryable" | "stopped" | "cancelled" | "refused: <reason>" | nil}
function R:info()
  return { tries = self.tries, delays = { table.unpack(self.delays) }, why = self.why }
end

-- retry.submit(pool, opts, task, ...) -> handle | nil, err (the first
-- submit failed: stopped, full, or refused by a policy)
function retry.submit(pool, opts, task, ...)
  if type(pool) ~= "userdata" or type(pool.submit) ~= "function" then
    util.raise(retry.submit, "retry.submit: bad argument #1 (pool expected)")
  end
  local o = check_opts(opts)
  local self = setmetatable({ pool = pool, o = o, task = task, args = pack(...),
    tries = 0, delays = {}, phase = "new" }, R)
  local f, err, ename = pool:submit(task, ...)
  if not f then return nil, err, ename end
  self.tries, self.f, self.phase = 1, f, "running"
  -- Under a host loop a coroutine drives the retries.
  if workerpool.in_host() then
    self.host, self.co = true, workerpool.spawn(drive, self)
  end
  return self
end

return retry
