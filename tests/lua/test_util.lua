-- test_util.lua: workerpool.util (option checks, errors at the caller's
-- line, label escaping) and workerpool.in_host() outside a host; the
-- host side is in tests/host/test_coroutines.lua.

local T = require "harness"
local wp = require "workerpool"
local util = require "workerpool.util"

local THIS_FILE = debug.getinfo(1, "S").short_src

-- The message fn raises, which must start with this file and `line`.
local function raised_at(line, fn)
  local ok, err = pcall(fn)
  T.eq(ok, false, "raised")
  local want = THIS_FILE .. ":" .. line .. ": "
  T.ok(tostring(err):sub(1, #want) == want, "at " .. want .. " : " .. tostring(err))
  return err
end

local function here() return debug.getinfo(2, "l").currentline end

T.test("util.raise names the line that called the public function", function()
  local api
  local function deep(n) if n == 0 then util.raise(api, "boom") end deep(n - 1) end
  api = function(n) deep(n) end
  for _, depth in ipairs { 0, 1, 5 } do
    local line = here() + 1
    local err = raised_at(line, function() api(depth) end)
    T.ok(err:find(": boom$"), err)
  end
  -- A function that is not on the stack: no position.
  local ok, err = pcall(util.raise, function() end, "plain")
  T.eq(ok, false)
  T.eq(err, "plain")
end)

T.test("checker messages", function()
  local function new(opts)
    local ck = util.checker(new, "mod.new: %s")
    ck:options(opts, { n = true, x = true, f = true, s = true, sub = true })
    return {
      n = ck:integer("n", opts.n, { max = 9, default = 3 }),
      x = ck:number("x", opts.x, { above = 0, max = 1 }),
      f = ck:func("f", opts.f),
      sub = opts.sub and ck:options(opts.sub, { a = true }, "sub"),
    }
  end
  T.eq(new({}).n, 3)
  T.eq(new({ n = 9.0 }).n, 9)
  T.eq(math.type(new({ n = 9.0 }).n), "integer")
  T.raises(function() new(1) end, "mod.new: options must be a table")
  T.raises(function() new { y = 1 } end, "mod.new: unknown option 'y'")
  T.raises(function() new { n = 10 } end, "mod.new: n must be an integer from 1 to 9 (got 10)")
  T.raises(function() new { n = 0.5 } end, "n must be an integer from 1 to 9 (got 0.5)")
  T.raises(function() new { x = 0 } end, "x must be a number > 0 and <= 1 (got 0)")
  T.raises(function() new { x = 0 / 0 } end, "x must be a number > 0 and <= 1")
  T.raises(function() new { f = 1 } end, "mod.new: f must be a function")
  T.raises(function() new { sub = 1 } end, "mod.new: sub must be a table")
  T.raises(function() new { sub = { b = 1 } } end, "mod.new: sub: unknown field 'b'")
  local ck = util.checker(print, "%s")
  T.eq(ck:number("t", nil, {}), nil, "absent and optional")
  T.raises(function() ck:number("t", nil, { required = true }) end,
    "t must be a non-negative finite number (got nil)")
  T.raises(function() ck:number("t", math.huge, { above = 0 }) end,
    "t must be a positive finite number (got inf)")
  T.eq(ck:number("t", math.huge, { inf = true }), math.huge)
  T.raises(function() ck:number("t", -1, { unit = "seconds" }) end,
    "t must be a non-negative finite number of seconds (got -1)")
  T.raises(function() ck:integer("k", 0, {}) end, "k must be a positive integer (got 0)")
  T.raises(function() ck:integer("k", 2, { min = 3 }) end, "k must be an integer from 3 up")
  T.raises(function() ck:string("s", "") end, "s must be a non-empty string")
  T.raises(function() ck:clock(5) end, "clock must be a function or a table")
end)

T.test("the modules' option errors name the caller's line", function()
  local tenant, breaker, retry = wp.tenant, wp.breaker, wp.retry
  raised_at(here(), function() tenant.bucket { rate = 1, burst = 0 } end)
  raised_at(here() + 1, function()
    tenant.bucket { rate = 1, burst = 1, overrides = { a = { rate = -1 } } }
  end)
  raised_at(here(), function() tenant.concurrency { limit = 1, overrides = { a = 0 } } end)
  raised_at(here(), function() breaker.new { name = "x", window = 0, failure_rate = 1 } end)
  raised_at(here(), function() breaker.new { name = "x", dict = "" } end)
  local pool <close> = wp.new { max_workers = 1 }
  raised_at(here(), function() retry.submit(pool, { jitter = 1 }, print) end)
  raised_at(here(), function() retry.submit(nil, {}, print) end)
  -- pool:map is a C method over Lua: its errors still name the caller.
  raised_at(here(), function() pool:map(1, {}) end)
  raised_at(here(), function() pool:map(print, {}, { chunk = 0 }) end)
  raised_at(here(), function() pool:map(print, { coroutine.create(print) }) end)
end)

T.test("util.label escapes backslash, quote and newline", function()
  T.eq(util.label('a\\b"c\nd'), 'a\\\\b\\"c\\nd')
  T.eq(util.label("plain"), "plain")
end)

T.test("in_host() is false in plain Lua and in worker states", function()
  T.eq(wp.in_host(), false)
  T.eq(coroutine.wrap(function() return wp.in_host() end)(), false)
  local pool <close> = wp.new { max_workers = 1 }
  T.eq(select(2, pool:submit(function() return require("workerpool").in_host() end):wait()),
    false)
end)

T.run()
