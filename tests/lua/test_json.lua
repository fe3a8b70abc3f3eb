-- test_json.lua: workerpool.json: encode/decode of every JSON type, null
-- kept in arrays and objects and across states, integers and floats kept
-- apart, and the errors for bad input (syntax with LINE:COL, cycles,
-- non-string keys, NaN, deep nesting, invalid UTF-8).

local T = require "harness"
local workerpool = require "workerpool"
local json = workerpool.json
local null = json.null

local function deep_eq(a, b)
  if type(a) ~= type(b) then return false end
  if type(a) ~= "table" then
    return a == b and math.type(a) == math.type(b)
  end
  for k, v in pairs(a) do if not deep_eq(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

T.test("scalars", function()
  T.eq(json.encode(1), "1")
  T.eq(json.encode(1.0), "1.0")
  T.eq(json.encode(-0.0), "-0.0")
  T.eq(json.encode(0.1), "0.1")
  T.eq(json.encode(1 / 3), "0.3333333333333333")
  T.eq(json.encode(math.mininteger), "-9223372036854775808")
  T.eq(json.encode(true), "true")
  T.eq(json.encode(nil), "null")
  T.eq(json.encode(null), "null")
  T.eq(json.encode("a\"b\\c\n\t\1\127é"), '"a\\"b\\\\c\\n\\t\\u0001\127é"')
  T.eq(json.decode("1"), 1)
  T.eq(json.decode("1.0"), 1.0)
  T.eq(json.decode("-2.5e3"), -2500.0)
  T.eq(json.decode('"\\u00e9\\u0000x"'), "é\0x")
  T.eq(json.decode("false"), false)
  T.ok(json.decode("null") == null, "null decodes to json.null")
end)

T.test("floats read back bit for bit", function()
  for _, x in ipairs{0.1, 1e300, 5e-324, 123456.789, -1.5e-7, 2^53 + 0.0} do
    local back = json.decode(json.encode(x))
    T.eq(back, x, json.encode(x))
  end
end)

T.test("arrays, objects, empty tables", function()
  T.eq(json.encode({}), "[]")
  T.eq(json.encode({1, "a", {}}), '[1,"a",[]]')
  T.eq(json.encode({a = 1}), '{"a":1}')
  local v = json.decode('{"a": [1, null, 3], "b": null, "c": {}, "d": []}')
  T.eq(#v.a, 3)
  T.ok(v.a[2] == null and v.b == null, "nulls keep their place")
  T.ok(next(v.c) == nil and next(v.d) == nil, "empty object and array")
  T.ok(deep_eq(json.decode(json.encode(v)), v), "round trip")
end)


T.test("large values: the buffer grows while tables sit on the stack", function()
  local t = {}
  for i = 1, 5000 do t[i] = { name = string.rep("x", 50), v = i, sub = { 1, 2, { k = "v" } } } end
  local s = json.encode(t)
  T.ok(#s > 300000, "encoded " .. #s .. " bytes")
  local back = json.decode(s)
  T.eq(#back, 5000)
  T.eq(back[4321].sub[3].k, "v")
end)

T.test("a null crosses states as json.null", function()
  local pool = workerpool.new{max_workers = 1}
  local v, text, isnull = pool:submit_wait(function(s)
    local j = require("workerpool").json
    local x = j.decode(s)
    return x, j.encode(x), x.n == j.null
  end, '{"i": 7, "f": 7.0, "n": null, "l": [null, 1, 2.5]}')
  pool:stop()
  T.eq(isnull, true)
  T.ok(v.n == null and v.l[1] == null, "null arrives as the host's null")
  T.eq(math.type(v.i), "integer")
  T.eq(math.type(v.f), "float")
  T.ok(deep_eq(json.decode(text), v), "worker's encoding decodes here")
end)

T.test("syntax errors give LINE:COL: message", function()
  local v, err = json.decode('{"a": 1,\n "b": }')
  T.eq(v, nil)
  T.ok(err:match("^2:%d+: "), err)
  T.eq(select(2, json.decode("")), "1:0: unexpected token near end of file")
  T.ok(select(2, json.decode("[1] x")):match("^1:%d+: end of file expected"))
  T.ok(select(2, json.decode('"\xff"')):match("^1:%d+: unable to decode byte"))
  T.ok(select(2, json.decode(string.rep("[", 100000))):match("depth"))
  T.ok(select(2, json.decode("1e400")):match("overflow"))
  T.ok(select(2, json.decode("99999999999999999999")):match("too big integer"))
  T.raises(function() json.decode({}) end, "bad argument #1 to 'decode'")
end)

T.test("values JSON cannot hold", function()
  local t = {}
  t.self = t
  local function fails(v, pat)
    local r, err = json.encode(v)
    T.eq(r, nil)
    T.ok(err and err:find(pat, 1, true), tostring(err))
  end
  fails(t, "$.self: cycle")
  fails({[1.5] = 1}, "$: cannot encode a number key")
  fails({1, 2, [4] = 4}, "cannot encode a number key")
  fails({a = {0 / 0}}, "$.a[1]: cannot encode NaN or infinity")
  fails(math.huge, "NaN or infinity")
  fails({s = "\xff"}, "$.s: invalid UTF-8")
  fails("\xed\xa0\x80", "invalid UTF-8")     -- a surrogate
  fails("\xc0\x80", "invalid UTF-8")         -- overlong
  fails(print, "cannot encode a function")
  fails(coroutine.create(print), "cannot encode a thread")
  local deep = {}
  local c = deep
  for _ = 1, 5000 do c[1] = {}; c = c[1] end
  fails(deep, "nesting too deep")
  -- a shared (non-cyclic) sub-table is fine
  local s = {1}
  T.eq(json.encode({s, s}), "[[1],[1]]")
  T.raises(function() json.encode() end, "bad argument #1 to 'encode'")
end)

T.run()
