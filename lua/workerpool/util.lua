-- workerpool.util: what the Lua modules of lua/workerpool share: checking
-- a constructor's options, raising at the line that called a public
-- function, the spec that lets pool:use rebuild a policy in another state,
-- and escaping Prometheus label values.
--
--   local util = require "workerpool.util"
--   function mod.new(opts)
--     local ck = util.checker(mod.new, "mod.new: %s")
--     ck:options(opts, { size = true, clock = true })
--     local size = ck:integer("size", opts.size, { min = 1, default = 8 })
--     ...
--
-- Every check returns the value it accepted and raises misuse as
-- "mod.new: size must be a positive integer (got 0)", positioned at the
-- line that called mod.new however deep the check runs (util.raise).
local util = {}

local getinfo = debug and debug.getinfo

-- util.raise(fn, msg): raises msg at the line that called fn, the public
-- function (Lua or C) whose frame is nearest on the stack, so that no
-- helper has to count its depth. Raises without a position when fn is not
-- on the stack or the debug library is gone.
function util.raise(fn, msg)
  local level = 2
  while getinfo do
    local info = getinfo(level, "f")
    if info == nil then break end
    -- Frame `level` of getinfo is frame `level` of error: both count
    -- this function as 1.
    if info.func == fn then error(msg, level + 1) end
    level = level + 1
  end
  error(msg, 0)
end

-- util.label(s) -> s escaped for a Prometheus label value: backslash,
-- double quote and newline.
function util.label(s)
  return (s:gsub('[\\"\n]', { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }))
end

-- util.spec(module, fn, opts) -> {module =, fn =, opts =}, the recipe
-- pool:use records so that every submitting state can rebuild the policy
-- (docs/policies.md); nil when opts.clock exists only in this state.
function util.spec(module, fn, opts)
  local clock = require "workerpool.clock"
  local c = clock.portable(opts.clock)
  if c == false then return nil end
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.clock = c
  return { module = module, fn = fn, opts = o }
end

-- ---- option checks ------------------------------------------------------

local Checker = {}
Checker.__index = Checker

-- util.checker(fn, format) -> a checker for the options of the public
-- function fn; a failure raises string.format(format, message) at the
-- line that called fn ("tenant.bucket: %s", "bad argument #3 to 'map'
-- (%s)").
function util.checker(fn, format)
  return setmetatable({ fn = fn, format = format }, Checker)
end

-- ck:fail(fmt, ...): raises the formatted message.
function Checker:fail(fmt, ...)
  util.raise(self.fn, string.format(self.format, string.format(fmt, ...)))
end

-- ck:options(opts, known [, field]) -> opts: a table whose keys are all
-- in the set `known`. field names a nested table ("overrides.a") in the
-- messages.
function Checker:options(opts, known, field)
  if type(opts) ~= "table" then
    self:fail("%s must be a table", field or "options")
  end
  for k in pairs(opts) do
    if not known[k] then
      if field then self:fail("%s: unknown field '%s'", field, tostring(k)) end
      self:fail("unknown option '%s'", tostring(k))
    end
  end
  return opts
end

-- A nil value is spec.default when the spec has one, else missing:
-- nil (an absent option) unless spec.required.
local function absent(self, name, spec, words)
  if spec.default ~= nil or not spec.required then return spec.default end
  self:fail("%s must be %s (got nil)", name, words)
end

-- ck:integer(name, v, {min =, max =, default =, required =}) -> v: an
-- integer-valued number in [min, max] (min defaults to 1).
function Checker:integer(name, v, spec)
  local lo, hi = spec.min or 1, spec.max
  local words = (lo == 1 and not hi) and "a positive integer"
    or string.format("an integer from %d%s", lo, hi and (" to " .. hi) or " up")
  if v == nil then return absent(self, name, spec, words) end
  local n = type(v) == "number" and math.tointeger(v)
  if not n or n < lo or (hi and n > hi) then
    self:fail("%s must be %s (got %s)", name, words, tostring(v))
  end
  return n
end

-- ck:number(name, v, {min = | above =, max =, inf =, unit =, default =,
-- required =}) -> v: a number >= min (or > above, default >= 0), at most
-- max, finite unless inf; unit ("seconds") is only for the message.
function Checker:number(name, v, spec)
  local lo, open = spec.above or spec.min or 0, spec.above ~= nil
  local words
  if spec.max then
    words = string.format("a number %s %s and <= %s", open and ">" or ">=", lo, spec.max)
  elseif lo == 0 then
    words = (open and "a positive " or "a non-negative ")
      .. (spec.inf and "number" or "finite number")
  else
    words = string.format("a %snumber %s %s", spec.inf and "" or "finite ",
      open and ">" or ">=", lo)
  end
  if spec.unit then words = words .. " of " .. spec.unit end
  if v == nil then return absent(self, name, spec, words) end
  if type(v) ~= "number" or v ~= v or v < lo or (open and v == lo)
      or (spec.max and v > spec.max) or (not spec.inf and v == math.huge) then
    self:fail("%s must be %s (got %s)", name, words, tostring(v))
  end
  return v
end

-- ck:func(name, v) -> v: nil or a function.
function Checker:func(name, v)
  if v ~= nil and type(v) ~= "function" then self:fail("%s must be a function", name) end
  return v
end

-- ck:string(name, v) -> v: a non-empty string.
function Checker:string(name, v)
  if type(v) ~= "string" or v == "" then self:fail("%s must be a non-empty string", name) end
  return v
end

-- ck:clock(c) -> now: the now() function the `clock` option names
-- (workerpool.clock.resolve).
function Checker:clock(c)
  return require("workerpool.clock").resolve(c)
    or self:fail("clock must be a function or a table with a now() function")
end

-- ck:dict(name, capacity) -> the workerpool.shared dictionary `name`,
-- opened with `capacity` bytes (nil: the default).
function Checker:dict(name, capacity)
  self:string("dict", name)
  capacity = self:integer("capacity", capacity, {})
  local d, err = require("workerpool").shared(name, capacity and { capacity = capacity } or nil)
  if not d then self:fail("cannot open dict '%s': %s", name, tostring(err)) end
  return d
end

return util
