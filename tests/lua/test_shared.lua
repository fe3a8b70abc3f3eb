-- test_shared.lua: tests of workerpool.shared, the process-wide shared
-- dictionaries, through the Lua module: every method's results and error
-- strings, argument checking, capacity, expiry, and increments racing from
-- several worker states at once.
--
-- Each test uses dictionary names of its own: dictionaries live as long as
-- the process, so names would otherwise leak state between tests.

local T = require "harness"
local workerpool = require "workerpool"

local shared = workerpool.shared

T.test("shared returns a dict; same name, same dict", function()
  local a = shared("t1")
  local b = shared("t1")
  T.ok(type(a) == "userdata", "a dict is a userdata")
  T.ok(tostring(a):find("workerpool.shared: t1", 1, true), "tostring")
  T.ok(a == b, "two objects of one dict compare equal")
  T.ok(a ~= shared("t1-other"), "different names differ")
  T.eq(a:set("k", 1), true)
  T.eq(b:get("k"), 1)
  T.eq(shared("t1-other"):get("k"), nil)
end)

T.test("get and set every type", function()
  local d = shared("types")
  T.eq(d:get("missing"), nil)
  T.eq(d:set("t", true), true)
  T.eq(d:set("f", false), true)
  T.eq(d:set("i", 42), true)
  T.eq(d:set("n", 2.5), true)
  T.eq(d:set("one", 1.0), true)
  T.eq(d:set("max", math.maxinteger), true)
  T.eq(d:set("s", "hello"), true)
  T.eq(d:set("bin", "a\0b\0"), true)
  T.eq(d:set("empty", ""), true)
  T.eq(d:get("t"), true)
  T.eq(d:get("f"), false)
  T.eq(d:get("i"), 42)            -- T.eq checks math.type too
  T.eq(d:get("n"), 2.5)
  T.eq(d:get("one"), 1.0)         -- a float stays a float
  T.eq(d:get("max"), math.maxinteger)
  T.eq(d:get("s"), "hello")
  T.eq(d:get("bin"), "a\0b\0")
  T.eq(d:get("empty"), "")
  T.eq(d:set("x\0y", 1), true)
  T.eq(d:get("x\0y"), 1)
  T.eq(d:get("x"), nil, "keys are binary-safe")
  -- nil deletes.
  T.eq(d:set("s", nil), true)
  T.eq(d:get("s"), nil)
  T.eq(d:set("s"), true)
  -- Numbers are accepted as keys (converted to strings).
  T.eq(d:set(7, "seven"), true)
  T.eq(d:get("7"), "seven")
end)

T.test("set rejects values that cannot be shared", function()
  local d = shared("badset")
  T.raises(function() d:set("k", {}) end,
    "bad argument #2 to 'set' (nil, boolean, number or string expected, " ..
    "got table)")
  T.raises(function() d:set("k", print) end, "bad argument #2 to 'set'")
  T.raises(function() d:set("k", d) end, "bad argument #2 to 'set'")
  T.raises(function() d:set({}, 1) end, "bad argument #1 to 'set'")
  T.raises(function() d:set("k", 1, -1) end, "bad argument #3 to 'set'")
  T.raises(function() d:set("k", 1, "x") end, "bad argument #3 to 'set'")
  T.raises(function() d.set(nil, "k", 1) end, "workerpool.shared expected")
  T.raises(function() d:get() end, "bad argument #1 to 'get'")
  T.eq(d:get("k"), nil, "nothing stored by a failed call")
end)

T.test("add", function()
  local d = shared("add")
  T.eq(d:add("k", "v"), true)
  local ok, msg, name = d:add("k", "w")
  T.eq(ok, nil)
  T.eq(msg, "exists")
  T.eq(name, "EEXISTS")
  T.eq(d:get("k"), "v")
  T.raises(function() d:add("k2", {}) end, "bad argument #2 to 'add'")
  T.raises(function() d:add("k2", 1, -0.5) end, "bad argument #3 to 'add'")
  T.eq(d:delete("k"), true)
  T.eq(d:add("k", "w"), true)
  T.eq(d:get("k"), "w")
end)

T.test("incr", function()
  local d = shared("incr")
  local v, msg = d:incr("k", 1)
  T.eq(v, nil)
  T.eq(msg, "not found")
  T.eq(d:incr("k", 1, 10), 11)
  T.eq(d:incr("k", 1, 10), 12, "init is ignored once the key exists")
  T.eq(d:incr("k", -2), 10)
  T.eq(d:incr("k", 0.5), 10.5)
  T.eq(d:incr("k", 1), 11.5, "a float stays a float")
  T.eq(d:get("k"), 11.5)
  T.eq(d:incr("f", 1, 0.0), 1.0)
  T.eq(d:incr("wrap", 1, math.maxinteger), math.mininteger)
  d:set("s", "12")
  v, msg = d:incr("s", 1)
  T.eq(v, nil)
  T.eq(msg, "not a number")
  T.eq(d:get("s"), "12")
  T.raises(function() d:incr("k", "1") end, "bad argument #2 to 'incr'")
  T.raises(function() d:incr("k") end, "bad argument #2 to 'incr'")
  T.raises(function() d:incr("k", 1, "0") end, "bad argument #3 to 'incr'")
  T.raises(function() d:incr("k", 1, 0, -1) end, "bad argument #4 to 'incr'")
  -- ttl applies when init creates the key, and incr keeps it afterwards.
  T.eq(d:incr("e", 1, 0, 100), 1)
  local ttl = d:ttl("e")
  T.ok(ttl > 90 and ttl <= 100, "ttl set by init")
  T.eq(d:incr("e", 1, 0, 0), 2)
  ttl = d:ttl("e")
  T.ok(ttl > 90 and ttl <= 100, "ttl kept by incr")
end)

T.test("cas", function()
  local d = shared("cas")
  T.eq(d:cas("k", nil, 1), true, "nil old: must be absent")
  T.eq(d:cas("k", nil, 2), false)
  T.eq(d:cas("k", 1.0, 2), false, "integer 1 is not float 1.0")
  T.eq(d:get("k"), 1)
  T.eq(d:cas("k", 1, "a"), true)
  T.eq(d:cas("k", "a\0", "b"), false)
  T.eq(d:cas("k", "a", true), true)
  T.eq(d:cas("k", true, false), true)
  T.eq(d:get("k"), false)
  T.eq(d:cas("k", false, nil), true, "nil new deletes")
  T.eq(d:get("k"), nil)
  T.eq(d:cas("k", 1, 2), false)
  T.raises(function() d:cas("k", {}, 1) end, "bad argument #2 to 'cas'")
  T.raises(function() d:cas("k", 1, {}) end, "bad argument #3 to 'cas'")
  -- A swap keeps the expiry.
  d:set("e", 1, 100)
  T.eq(d:cas("e", 1, 2), true)
  local ttl = d:ttl("e")
  T.ok(ttl > 90 and ttl <= 100, "cas keeps the ttl")
end)

T.test("delete, flush, keys and usage", function()
  local d = shared("keys")
  T.eq(#d:keys(), 0)
  for i = 1, 10 do d:set("k" .. i, i) end
  local keys = d:keys()
  T.eq(#keys, 10)
  table.sort(keys, function(a, b) return #a < #b or #a == #b and a < b end)
  for i = 1, 10 do T.eq(keys[i], "k" .. i) end
  T.eq(#d:keys(3), 3)
  T.eq(#d:keys(0), 10)
  T.eq(#d:keys(100), 10)
  T.raises(function() d:keys(-1) end, "bad argument #1 to 'keys'")
  T.raises(function() d:keys("x") end, "bad argument #1 to 'keys'")
  T.eq(d:delete("k1"), true)
  T.eq(d:delete("k1"), true, "deleting an absent key is fine")
  T.eq(d:get("k1"), nil)
  T.eq(#d:keys(), 9)
  local used, cap = d:usage()
  T.eq(cap, 1024 * 1024, "default capacity")
  -- 64 bytes per entry + key; integers have no string bytes.
  T.eq(used, 9 * 64 + 8 * 2 + 3)
  T.eq(d:flush(), nil)
  T.eq(#d:keys(), 0)
  T.eq(d:get("k2"), nil)
  used = d:usage()
  T.eq(used, 0)
end)

T.test("ttl and expiry", function()
  local d = shared("ttl")
  d:set("forever", 1)
  T.eq(d:ttl("forever"), 0.0)
  local v, msg = d:ttl("missing")
  T.eq(v, nil)
  T.eq(msg, "not found")
  d:set("long", 1, 100)
  local ttl = d:ttl("long")
  T.ok(ttl > 90 and ttl <= 100, "ttl within bounds")
  T.raises(function() d:ttl() end, "bad argument #1 to 'ttl'")

  local t0 = workerpool.now()
  d:set("short", "x", 0.05)
  local got = d:get("short")
  if workerpool.now() - t0 < 0.05 then T.eq(got, "x") end
  T.eventually(function() return d:get("short") == nil end, 10,
    "expiry of 'short'")
  T.ok(workerpool.now() - t0 >= 0.05, "did not expire early")
  v, msg = d:ttl("short")
  T.eq(v, nil)
  T.eq(msg, "not found")
  v, msg = d:incr("short", 1)
  T.eq(v, nil)
  T.eq(msg, "not found")
  T.eq(d:add("short", "y"), true, "add succeeds on an expired key")

  d:set("gone", 1, 0.01)
  T.eventually(function()
    for _, k in ipairs(d:keys()) do if k == "gone" then return false end end
    return true
  end, 10, "expired key dropped from keys()")
end)

T.test("capacity: no memory, nothing evicted", function()
  local d = shared("small", { capacity = 2048 })
  local _, cap = d:usage()
  T.eq(cap, 2048)
  local val = string.rep("v", 100)
  local n = 0
  while true do
    local ok, msg, name = d:set("k" .. n, val)
    if not ok then
      T.eq(msg, "not enough memory") -- wp_strerror's words, as everywhere
      T.eq(name, "ENOMEM")
      break
    end
    n = n + 1
    T.ok(n < 1000, "capacity is enforced")
  end
  T.ok(n > 5, "several entries fit")
  for i = 0, n - 1 do T.eq(d:get("k" .. i), val) end
  T.eq(d:get("k" .. n), nil)
  T.eq(select(3, d:add("big", string.rep("x", 4096))), "ENOMEM")
  T.eq(select(3, d:set("k0", string.rep("x", 4096))), "ENOMEM")
  T.eq(d:get("k0"), val, "a failed replace keeps the old value")
  T.eq(select(3, d:cas("k0", val, string.rep("x", 4096))), "ENOMEM")
  local used = d:usage()
  T.ok(used <= 2048, "usage within capacity")
  -- Use up the last bytes, then incr with init has no room either.
  local i = 0
  while d:set("i" .. i, 1) do i = i + 1 end
  T.eq(select(3, d:incr("counter", 1, 0)), "ENOMEM")
  d:delete("k0")
  d:delete("k1")
  T.eq(d:set("again", val), true)
  T.eq(d:incr("counter", 1, 0), 1)
  -- A later open ignores opts.
  local _, cap2 = shared("small", { capacity = 99999 }):usage()
  T.eq(cap2, 2048)
end)

T.test("bad arguments to shared", function()
  T.raises(function() shared() end, "bad argument #1")
  T.raises(function() shared("") end, "bad argument #1")
  T.raises(function() shared({}) end, "bad argument #1")
  T.raises(function() shared("a\0b") end, "bad argument #1")
  T.raises(function() shared("x", 5) end, "bad argument #2")
  T.raises(function() shared("x", { capacity = 0 }) end, "bad argument #2")
  T.raises(function() shared("x", { capacity = -1 }) end, "bad argument #2")
  T.raises(function() shared("x", { capacity = 1.5 }) end, "bad argument #2")
  T.raises(function() shared("x", { capacity = "1024" }) end,
    "bad argument #2")
  T.eq(select(2, shared("x", { capacity = 4096.0 }):usage()), 4096)
  T.ok(shared("y", {}), "empty opts")
end)

T.test("increments from several worker states add up", function()
  local pool = workerpool.new { max_workers = 4 }
  local futs = {}
  for i = 1, 4 do
    futs[i] = pool:submit(function(n)
      local wp = require "workerpool"
      local d = wp.shared("contention")
      for _ = 1, n do d:incr("hits", 1, 0) end
      return true
    end, 5000)
  end
  -- The host increments too, while the workers run.
  for _ = 1, 5000 do workerpool.shared("contention"):incr("hits", 1, 0) end
  for i = 1, 4 do
    local ok, res = futs[i]:wait()
    T.eq(ok, true, "task " .. i)
    T.eq(res, true, "task " .. i)
  end
  T.eq(workerpool.shared("contention"):get("hits"), 25000)
  pool:stop_wait()
end)

T.run()
