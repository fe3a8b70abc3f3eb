-- workerpool.clock: the time source of the policies.
--
-- Policies read time through clock.now(); by default it is the engine's
-- monotonic clock (workerpool.now(), the same in every state of the
-- process). Tests replace it with one they move by hand, and a replacement
-- can be shared between states by keeping the time in a shared dictionary:
-- see clock.shared(name).
local workerpool = require "workerpool"

local clock = {}

-- The monotonic clock, in seconds.
function clock.monotonic()
  return workerpool.now()
end

-- The now() function a policy's `clock` option names: the monotonic
-- clock when c is nil, c itself when it is a function, c.now when c is a
-- table with a now() function, the shared clock `name` for {shared =
-- name}; nil for anything else.
function clock.resolve(c)
  if c == nil then return clock.monotonic end
  if type(c) == "function" then return c end
  if type(c) == "table" and type(c.now) == "function" then return c.now end
  if type(c) == "table" and type(c.shared) == "string" then return clock.shared(c.shared).now end
  return nil
end

-- The form of a `clock` option that another state can rebuild: nil for
-- the monotonic clock, {shared = name} for a shared clock; false when the
-- clock exists only in this state (a function of its own).
function clock.portable(c)
  if c == nil or c == clock.monotonic then return nil end
  if type(c) == "table" and type(c.shared) == "string" then return { shared = c.shared } end
  return false
end

-- A clock read from shared dictionary `name` (key "now"), so every state
-- that makes one sees the same time; set it with :set(t) or :advance(dt).
function clock.shared(name)
  local dict = workerpool.shared(name)
  if dict:get("now") == nil then dict:add("now", 0.0) end
  local c = { shared = name }
  function c.now() return dict:get("now") end
  function c.set(t) dict:set("now", t + 0.0) end
  function c.advance(dt) dict:incr("now", dt + 0.0, 0.0) end
  return c
end

return clock
