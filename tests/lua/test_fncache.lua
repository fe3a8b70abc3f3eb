-- test_fncache.lua: the submitting state's cache of the last function sent
-- (lsubmit.c, fncache): submitting the same function again copies its
-- message record instead of encoding it.  What must hold: the cached record
-- is used only for that very function, every argument still travels, a
-- function whose only upvalues are _ENV is cached while they stay the global
-- table, and a function with other upvalues is encoded afresh each time.

local T = require "harness"
local wp = require "workerpool"

local pool = wp.new { max_workers = 2 }

T.test("the same function with changing arguments", function()
  local f = function(a, b, c) return a, b, c end
  for i = 1, 50 do
    local a, b, c = pool:submit_wait(f, i, "s" .. i, i % 2 == 0)
    T.eq(a, i)
    T.eq(b, "s" .. i)
    T.eq(c, i % 2 == 0)
  end
  -- No arguments, nil arguments, and arguments the fast encoder refuses
  -- (tables: the full encoder runs instead).
  T.eq(select("#", pool:submit_wait(f)), 3)
  local a, b, c = pool:submit_wait(f, nil, { k = 1 }, nil)
  T.eq(a, nil)
  T.eq(b.k, 1)
  T.eq(c, nil)
  T.eq(pool:submit_wait(f, 2 ^ 60), 2 ^ 60)
end)

T.test("a new function at a collected one's address runs its own code",
  function()
    -- Compiled first, so that each closure made below is one small
    -- allocation, likely to reuse the last one's memory once collected.
    local makers = {}
    for i = 1, 200 do
      makers[i] = load("return function() return " .. i .. " end")
    end
    collectgarbage()
    for i = 1, 200 do
      local g = makers[i]() -- no upvalues: cacheable
      T.eq(pool:submit_wait(g), i)
      T.eq(pool:submit_wait(g), i)
      g = nil -- luacheck: ignore 311
      collectgarbage()
    end
  end)

T.test("functions with upvalues travel with their current values", function()
  local k = 1
  local f = function(x) return x + k end
  T.eq(pool:submit_wait(f, 1), 2)
  k = 10
  T.eq(pool:submit_wait(f, 1), 11)
  local h = function() return type(string) end -- _ENV as its upvalue
  T.eq(pool:submit_wait(h), "table")
  T.eq(pool:submit_wait(h), "table")
end)

T.test("a function whose _ENV is changed runs with the new one", function()
  -- Its own chunk, so that its _ENV is not this file's.
  local f = load("return function() return type(string) end")()
  for _ = 1, 3 do T.eq(pool:submit_wait(f), "table") end -- cached
  debug.setupvalue(f, 1, { string = 5, type = type })
  T.eq(pool:submit_wait(f), "number")
  T.eq(pool:submit_wait(f), "number")
  debug.setupvalue(f, 1, _G)
  T.eq(pool:submit_wait(f), "table")
  T.eq(pool:submit_wait(f), "table")
end)

T.test("post, descriptors, futures and the function as an argument",
  function()
    local f = function(x, y)
      if type(y) == "function" then return y(x) end
      return x
    end
    for i = 1, 3 do
      T.eq(pool:post(f, i), true)
    end
    T.eq(pool:submit_wait({ fn = f, name = "named" }, 7), 7)
    T.eq(pool:submit_wait(f, 5, f), 5)
    local futs = {}
    for i = 1, 100 do futs[i] = pool:submit(f, i) end
    for i = 1, 100 do
      local ok, v = futs[i]:wait()
      T.ok(ok)
      T.eq(v, i)
    end
  end)

T.test("two pools of one state share the cache", function()
  local other = wp.new { max_workers = 1 }
  local f = function(x) return x * 2 end
  for i = 1, 5 do
    T.eq(pool:submit_wait(f, i), 2 * i)
    T.eq(other:submit_wait(f, i), 2 * i)
  end
  other:stop_wait()
  T.eq(select(2, other:submit(f, 1)), "stopped")
end)

T.run()
