-- test_input.lua: hostile input to the module's own calls (issue 10):
-- task descriptors read through __index, pool names that are not UTF-8 or
-- hold '\0', strings in log lines that are not UTF-8, workerpool.log with
-- every kind of value, init_file errors, and a sweep of bad arguments to
-- workerpool.log, workerpool.new's name, descriptor fields and
-- workerpool.shared.  Every bad input either works or raises a clear
-- error; none crashes or leaks (the suite runs under ASan with LSan).
--
-- Log lines are checked in a child lua5.4 with its stderr in a file, read
-- back through python3's strict JSON parser (T.read_log).

local T = require "harness"
local wp = require "workerpool"

local npools = 0
local S = T.suite("test_input", function(opts)
  npools = npools + 1
  opts.name = opts.name or string.format("input-%d", npools)
  opts.max_workers = opts.max_workers or 1
  if opts.idle_timeout == nil then opts.idle_timeout = 60 end
end)
local case, newpool = S.case, S.newpool

-- Runs src in a child with logging at debug; returns its log lines.
local function logged(src)
  local logf = os.tmpname()
  local ok, out = T.child([[
    local W = require "workerpool"
    W.set_log_level("debug")
  ]] .. src, logf)
  T.ok(ok, "child ran: " .. out)
  local lines = T.read_log(logf)
  os.remove(logf)
  return lines
end

-- The first line whose fields hold every key = value of want.
local function find(lines, want)
  for _, l in ipairs(lines) do
    local all = true
    for k, v in pairs(want) do
      if l[k] ~= v then all = false end
    end
    if all then return l end
  end
end

local function count_keys(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end

-- ---- task descriptors -------------------------------------------------------

-- A descriptor whose name and tenant come from __index as fresh strings,
-- with a full collection between the lookups: the strings must stay valid
-- until the task is queued (under ASan, a use-after-free otherwise).
case("descriptor: name and tenant from __index survive a collection",
function()
  local p = newpool {}
  local seen = {}
  p:use { admit = function(_, task)
    collectgarbage()
    seen[#seen + 1] = task.name .. "|" .. task.tenant
    return true
  end }
  for i = 1, 50 do
    local d = setmetatable({ fn = function() return 1 end }, { __index =
      function(_, k)
        if k == "name" then return ("task-" .. i):rep(20) end
        if k == "tenant" then
          collectgarbage()
          return ("tenant-" .. i):rep(20)
        end
      end })
    T.eq(p:submit(d):wait(10), true)
    T.eq(seen[i], ("task-" .. i):rep(20) .. "|" .. ("tenant-" .. i):rep(20))
  end
end)

-- A policy that clears the caller's descriptor while the task is being
-- admitted: the submit still has its own copy of the fields.
case("descriptor: a policy that changes the descriptor changes nothing",
function()
  local p = newpool {}
  local d
  p:use { admit = function(_, task)
    d.name, d.tenant, d.fn = nil, nil, nil
    collectgarbage()
    T.eq(task.name, ("n"):rep(100))
    return true
  end }
  d = { fn = function() return "ran" end, name = ("n"):rep(100),
        tenant = ("t"):rep(100) }
  T.eq(select(2, p:submit(d):wait(10)), "ran")
end)

case("descriptor: a handler gets exactly the arguments given", function()
  local p = newpool { init = "function COUNT(...) return select('#', ...) end" }
  T.eq(select(2, p:submit({ handler = "COUNT" }):wait(10)), 0)
  T.eq(select(2, p:submit({ handler = "COUNT" }, 1, nil):wait(10)), 2)
  T.eq(select(2, p:submit({ fn = function(...) return select("#", ...) end },
    1):wait(10)), 1)
  T.eq(p:submit_wait({ handler = "COUNT" }, "a"), 1)
end)

case("descriptor: every field refuses every wrong type; '\\0' in names",
function()
  local p = newpool {}
  local fn = function() end
  local values = { 1, 1.5, true, {}, fn, print, coroutine.create(fn),
    io.stdout, "s", "a\0b", 0 / 0, math.huge, -1, 0 }
  local want = {
    name = { s = true, err = "name must be a string" },
    tenant = { s = true, err = "tenant must be a string" },
    handler = { s = true, err = "handler must be a string" },
    fn = { err = "fn must be a Lua function" },
    timeout = { err = "timeout must be a positive number of seconds" },
  }
  for field, w in pairs(want) do
    for _, v in ipairs(values) do
      local d = { [field] = v }
      if field ~= "fn" and field ~= "handler" then d.fn = fn end
      local ok, err = pcall(p.submit, p, d)
      if type(v) == "string" and v:find("\0", 1, true) and w.s and
          field ~= "handler" then
        T.eq(ok, false, field .. " with \\0")
        T.ok(err:find(field .. " must not contain '\\0'", 1, true), err)
      elseif ok then
        T.ok(err ~= nil, field .. " accepted: " .. tostring(v))
        err:wait(10)
      else
        T.ok(err:find("bad argument #1 to 'submit'", 1, true), err)
        T.ok(err:find(w.err, 1, true) or
          err:find("a task descriptor needs fn or handler", 1, true), err)
      end
    end
  end
  T.raises(function() p:submit({ fn = fn, [1] = 2 }) end,
    "unknown task field '1'")
  T.raises(function() p:submit({ fn = fn, [fn] = 2 }) end,
    "unknown task field 'function")
  T.raises(function() p:submit({}) end, "needs fn or handler")
  T.raises(function() p:submit({ fn = fn, handler = "x" }) end,
    "needs fn or handler")
  T.eq(p:submit({ fn = fn, name = "é\xff", tenant = "" }):wait(10), true)
end)

-- ---- pool names --------------------------------------------------------------

case("names: new refuses '\\0' and invalid UTF-8, with a bad argument error",
function()
  for _, bad in ipairs { "a\0b", "\0", "a\xffb", "\xc0\x80", "\xed\xa0\x80",
    "\xf4\x90\x80\x80", "\xe2\x82", "\x80" } do
    local err = T.raises(function() wp.new { max_workers = 1, name = bad } end,
      "bad argument #1 to", bad)
    T.ok(err:find("name must not contain '\\0'", 1, true) or
      err:find("name must be valid UTF-8", 1, true), err)
    T.eq(wp.get(bad), nil)
  end
  -- "a\0b" is not pool "a"
  local _ = newpool { name = "a" }
  T.eq(wp.get("a\0b"), nil)
  T.ok(wp.get("a"))
  T.raises(function() wp.new { max_workers = 1, name = 7 } end,
    "name must be a string")
  T.raises(function() wp.new { max_workers = 1, name = "" } end,
    "name must not be empty")
  T.raises(function() wp.new { max_workers = 1, name = ("x"):rep(256) } end,
    "at most 255 bytes")
  T.ok(newpool { name = ("x"):rep(255) })
end)

case("names: any UTF-8 name makes a valid exposition (promtool)", function()
  local names = { 'q"q', "b\\s", "n\nl", "t\tab\r", "é日本\u{10FFFF}",
    '\\"\n', "{}=,", "# HELP" }
  for _, n in ipairs(names) do
    local p = newpool { name = n }
    T.eq(p:name(), n)
    T.eq(p:submit(function() end):wait(10), true)
  end
  local m = wp.metrics()
  for _, n in ipairs(names) do
    local lbl = require("workerpool.util").label(n)
    T.ok(m:find('workerpool_submitted_total{pool="' .. lbl .. '"} 1\n', 1,
      true), "escaped: " .. lbl)
  end
  if not T.can_spawn then return T.skip("promtool") end
  local ok, out = T.promtool(m)
  T.ok(ok, "promtool check metrics: " .. out)
end)

-- ---- init_file ---------------------------------------------------------------

case("init_file: a directory, a missing file and '\\0' say what is wrong",
function()
  T.raises(function() wp.new { max_workers = 1, init_file = "/" } end,
    "cannot read init_file '/': Is a directory")
  T.raises(function()
    wp.new { max_workers = 1, init_file = "/nonexistent/x.lua" }
  end, "cannot read init_file '/nonexistent/x.lua': No such file")
  T.raises(function() wp.new { max_workers = 1, init_file = "/\0x" } end,
    "init_file must not contain '\\0'")
end)

-- ---- logs: text --------------------------------------------------------------

case("logs: task.error keeps its error when it is not UTF-8 or was cut",
function()
  if not T.can_spawn then return T.skip("the child process") end
  local lines = logged [[
    local p = W.new { max_workers = 1, name = "errs" }
    p:submit({ fn = function() error("bad \xff byte", 0) end, name = "a" }):wait()
    p:submit({ fn = function() error(("é"):rep(3000), 0) end, name = "b" }):wait()
    p:submit({ fn = function() error("x" .. ("é"):rep(3000), 0) end,
      name = "c\xfe" }):wait()
    p:stop()
  ]]
  local a = T.ok(find(lines, { event = "task.error", task = "a" }), "task a")
  T.ok(a.error:find("^bad %? byte\nstack traceback"), a.error)
  local b = T.ok(find(lines, { event = "task.error", task = "b" }), "task b")
  T.eq(b.error, ("é"):rep(2000), "cut at 4000 bytes, between characters")
  local c = T.ok(find(lines, { event = "task.error", task = "c?" }), "task c")
  T.eq(c.error, "x" .. ("é"):rep(1999), "cut before a split character")
end)

case("logs: keys and values that are not UTF-8 become '?', nothing is lost",
function()
  if not T.can_spawn then return T.skip("the child process") end
  local lines = logged [[
    W.log("info", "m\xff", { ["k\xff"] = "v\xfe", ok = "é", ["a\0b"] = "c\0d",
      [1] = "one", [2.5] = true, [true] = false })
    W.log("info", ("é"):rep(5000))
    W.log("info", "long", { s = "é" .. ("x"):rep(20000) })
  ]]
  local l = T.ok(find(lines, { event = "log", msg = "m?" }), "line")
  T.eq(l["k?"], "v?")
  T.eq(l.ok, "é")
  T.eq(l["a?b"], "c\0d")
  T.eq(l["1"], "one")
  T.eq(l["2.5"], true)
  T.eq(l["true"], false)
  local long = T.ok(find(lines, { event = "log", msg = "long" }), "long")
  T.eq(#long.s, 8192 + 3, "strings are cut at 8 KiB")
  T.eq(long.s:sub(-3), "...")
  for _, m in ipairs(lines) do
    if type(m.msg) == "string" and m.msg:find("^é") then
      T.eq(m.msg, ("é"):rep(4096) .. "...", "a cut msg")
    end
  end
end)

-- The wpool command of this build, beside the module (LUA_CPATH).
local function wpool_bin()
  local dir = (os.getenv("LUA_CPATH") or ""):match("^([^;]*)/%?%.so")
  local path = dir and dir .. "/wpool"
  local fh = path and io.open(path)
  if fh then fh:close() end
  return fh and path
end

case("logs: coroutine.error keeps an error that is not UTF-8", function()
  if not T.can_spawn then return T.skip("wpool") end
  local wpool = T.ok(wpool_bin(), "wpool next to the module")
  local script, logf = os.tmpname(), os.tmpname()
  local fh = assert(io.open(script, "w"))
  fh:write([[require("workerpool").spawn(function() error("co \xff", 0) end)]])
  fh:close()
  local ok, out = T.sh(string.format("%s run --log-file %s %s", wpool, logf,
    script))
  T.ok(ok, "wpool ran: " .. out)
  local lines = T.read_log(logf)
  os.remove(script)
  os.remove(logf)
  local l = T.ok(find(lines, { event = "coroutine.error" }), "the line")
  T.ok(l.error:find("^co %?"), l.error)
end)

-- ---- logs: every kind of value -----------------------------------------------

case("logs: functions, userdata, threads, cycles, deep and huge tables",
function()
  if not T.can_spawn then return T.skip("the child process") end
  local lines = logged [[
    local cyc = {}
    cyc.self = cyc
    local deep = {}
    local t = deep
    for _ = 1, 100 do t.d = {} t = t.d end
    local huge = {}
    for i = 1, 100000 do huge[i] = i end
    local raising = setmetatable({}, { __tostring = function() error("no") end,
      __name = "Raising" })
    local notstr = setmetatable({}, { __tostring = function() return {} end })
    local u = io.stdout
    assert(W.log("info", "kinds", { f = print, u = u, th = coroutine.running(),
      lu = W.now, cyc = cyc, deep = deep, [raising] = raising,
      [print] = 1, n = 0 / 0, inf = math.huge, i = math.maxinteger }) == nil)
    W.log("info", "huge", { huge = huge })
    W.log("warn", raising)
    W.log("error", print, nil)
    W.log("debug", nil, { [notstr] = notstr, [u] = setmetatable({},
      { __index = function() error("never read") end }) })
    for _ = 1, 100 do W.log("info", "raising key", { [raising] = 1 }) end
  ]]
  local l = T.ok(find(lines, { msg = "kinds" }), "kinds")
  T.ok(l.f:find("function"), l.f)
  T.ok(l.u:find("^file %("), l.u)
  T.ok(l.th:find("^thread: "), l.th)
  T.eq(l.n, T.null)
  T.eq(l.inf, T.null)
  T.eq(l.i, math.maxinteger)
  T.eq(type(l["(Raising: tostring failed)"]), "table", "a table's key")
  -- a cycle is cut after 8 levels, by tostring
  local c, levels = l.cyc, 1
  while type(c.self) == "table" do c, levels = c.self, levels + 1 end
  T.eq(levels, 7, "levels under cyc")
  T.ok(c.self:find("^table: "), c.self)
  local d, dl = l.deep, 1
  while type(d.d) == "table" do d, dl = d.d, dl + 1 end
  T.eq(dl, 7)
  local h = T.ok(find(lines, { msg = "huge" }), "huge")
  T.eq(h.truncated, true)
  T.eq(count_keys(h.huge), 999, "1000 entries in all, the table included")
  local w = T.ok(find(lines, { level = "warn", event = "log" }), "table msg")
  T.eq(type(w.msg), "table", "a table msg is an object")
  local pm = T.ok(find(lines, { level = "error", event = "log" }), "print msg")
  T.ok(pm.msg:find("function"), pm.msg)
  local dbg = T.ok(find(lines, { level = "debug", event = "log" }), "debug")
  T.eq(dbg.msg, T.null)
  T.eq(type(dbg["(table: tostring failed)"]), "table", "a bad key")
  local n = 0
  for _, x in ipairs(lines) do
    if x.msg == "raising key" then n = n + 1 end
  end
  T.eq(n, 100, "every line written")
end)

-- A worker whose memory_limit runs out while a line is built (the state
-- is filled to 4 KB under its limit, and cleaning the string needs 8 KB):
-- the line is dropped, the call returns, and nothing leaks.
case("logs: a memory error while building a line drops it quietly", function()
  if not T.can_spawn then return T.skip("the child process") end
  local lines = logged [[
    local p = W.new { max_workers = 1, name = "mem", memory_limit = 4 << 20 }
    local ok, r = p:submit(function()
      local W = require "workerpool"
      local fields = { bad = ("\xff"):rep(8000) }
      W.log("info", "small", { n = 1 })
      local hog = {}
      for i = 1, 8000 do hog[i] = false end
      collectgarbage("stop")
      local i = 0
      while collectgarbage("count") * 1024 < (4 << 20) - 4000 do
        i = i + 1
        hog[i] = ("y"):rep(500) .. i
      end
      W.log("info", "big", fields)
      return "returned"
    end):wait()
    assert(ok and r == "returned", tostring(r))
    p:stop()
  ]]
  T.ok(find(lines, { msg = "small" }), "the small line")
  T.eq(find(lines, { msg = "big" }), nil, "the big line is dropped")
end)

-- ---- logs: bad arguments -----------------------------------------------------

case("logs: level and fields of every wrong type raise; msg may be anything",
function()
  local fn = function() end
  local all = { nil, 1, 1.5, true, {}, fn, coroutine.create(fn), io.stdout,
    "info", "INFO", "off", "", "a\0b" }
  for i = 1, 13 do
    local v = all[i]
    local ok = pcall(wp.log, v, "m")
    T.eq(ok, v == "info", "level " .. tostring(v))
    T.eq(pcall(wp.log, "info", v), true, "msg " .. tostring(v))
    ok = pcall(wp.log, "info", "m", v)
    T.eq(ok, v == nil or type(v) == "table", "fields " .. tostring(v))
  end
  T.raises(function() wp.log("info") end, "value expected")
end)

-- ---- workerpool.shared -------------------------------------------------------

case("shared: names and values of every type", function()
  local fn = function() end
  for _, bad in ipairs { "", "a\0b", "\0" } do
    T.raises(function() wp.shared(bad) end,
      "name must be a non-empty string without '\\0'")
  end
  for _, bad in ipairs { {}, fn, true, coroutine.create(fn), io.stdout } do
    T.raises(function() wp.shared(bad) end, "string expected")
  end
  T.raises(function() wp.shared("test_input.cap", 5) end, "table expected")
  for _, cap in ipairs { 0, -1, 1.5, "10", 0 / 0, math.huge } do
    T.raises(function() wp.shared("test_input.cap", { capacity = cap }) end,
      "'capacity' must be a positive integer")
  end
  local d = wp.shared("test_input.\xff\n日本", { capacity = 1 << 20 })
  T.ok(tostring(d):find("test_input.\xff\n日本", 1, true))
  for _, bad in ipairs { {}, fn, coroutine.create(fn), io.stdout } do
    T.raises(function() d:set("k", bad) end,
      "nil, boolean, number or string expected")
    T.raises(function() d:set(bad, 1) end, "string expected")
    T.raises(function() d:incr("k", bad) end, "number expected")
  end
  for _, ttl in ipairs { -1, 0 / 0 } do
    T.raises(function() d:set("k", 1, ttl) end, "ttl must be a non-negative")
  end
  T.raises(function() d:set("k", 1, "x") end, "number expected")
  T.eq(d:set("k\0\xff", "v\0\xfe", math.huge), true)
  T.eq(d:get("k\0\xff"), "v\0\xfe")
  T.eq(d:set("tiny", 1, 1e-300), true)
  T.eq(d:set("big", ("x"):rep(2 << 20)), nil, "bigger than the capacity")
  T.eq(select(3, d:incr("k\0\xff", 1)), "ENOTNUM")
  T.raises(function() d:keys(-1) end, "max must be non-negative")
  T.raises(function() d.get({}, "k") end, "workerpool.shared expected")
end)

T.run()
