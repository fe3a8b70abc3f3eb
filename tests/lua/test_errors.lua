-- test_errors.lua: how failures surface through the Lua module: errors
-- raised by tasks (strings with worker-side tracebacks, non-string error
-- values), missing handlers, memory errors, failing init scripts, the
-- submit_wait deadlock guard, and the module's own argument checks.

-- Tasks deliberately set globals in the worker states:
-- luacheck: globals KEPT NOT_A_FUNCTION

local T = require "harness"
local wp = require "workerpool"

local THIS_FILE = "test_errors.lua"

local function new_pool(opts)
  opts = opts or {}
  opts.max_workers = opts.max_workers or 1
  opts.idle_timeout = opts.idle_timeout or 60
  return wp.new(opts)
end

local function contains(s, sub)
  return type(s) == "string" and s:find(sub, 1, true) ~= nil
end

-- ---------------------------------------------------------------------------
-- Errors raised by tasks
-- ---------------------------------------------------------------------------

T.test("a task that raises: wait gives false and a traceback", function()
  local pool <close> = new_pool()
  local line = debug.getinfo(1, "l").currentline + 1
  local f = pool:submit(function() error("boom in task") end)
  local ok, msg = f:wait()
  T.eq(ok, false)
  T.eq(type(msg), "string")
  T.ok(contains(msg, "boom in task"), "message has the error text: " .. msg)
  T.ok(contains(msg, "stack traceback"), "message has a traceback: " .. msg)
  T.ok(contains(msg, THIS_FILE .. ":" .. line .. ": boom in task"),
    "message names the task's file and line " .. line .. ": " .. msg)
  T.eq(f:status(), "error")
  T.eq(f:done(), true)
  -- Waiting again gives the same answer.
  local ok2, msg2 = f:wait()
  T.eq(ok2, false)
  T.eq(msg2, msg)
end)

T.test("the traceback is the worker's, with the task's frames", function()
  local pool <close> = new_pool()
  local function inner() error("deep error") end
  local inner_line = debug.getinfo(inner, "S").linedefined
  local function outer() inner() end
  local ok, msg = pool:submit(function() outer() end):wait()
  T.eq(ok, false)
  T.ok(contains(msg, THIS_FILE .. ":" .. inner_line .. ": deep error"), msg)
  local tb = msg:sub(msg:find("stack traceback", 1, true) or 1)
  T.ok(contains(tb, THIS_FILE .. ":" .. inner_line .. ": in upvalue 'inner'"),
    "traceback lists inner: " .. tb)
  T.ok(contains(tb, "in upvalue 'outer'"), "traceback lists outer: " .. tb)
  -- It is not this state's traceback: the host's frames are absent.
  T.ok(not contains(tb, "harness.lua"), "no host frames: " .. tb)
end)

T.test("submit_wait re-raises with the worker-side traceback", function()
  local pool <close> = new_pool()
  local line = debug.getinfo(1, "l").currentline + 2
  local ok, err = pcall(pool.submit_wait, pool, function(x)
    error("failed with " .. x)
  end, "arg")
  T.eq(ok, false)
  T.ok(contains(err, "failed with arg"), err)
  T.ok(contains(err, THIS_FILE .. ":" .. line .. ": failed with arg"), err)
  T.ok(contains(err, "stack traceback"), err)
  -- Named handlers too: the position is in the init script.
  local named <close> = new_pool { init = "function h()\n error('in handler')\nend" }
  ok, err = pcall(named.submit_wait, named, "h")
  T.eq(ok, false)
  T.ok(contains(err, "init:2: in handler"), err)
  T.ok(contains(err, "stack traceback"), err)
end)

T.test("the worker is reused after an error", function()
  local pool <close> = new_pool()
  local id = function() return require("workerpool").worker_id() end
  local first = pool:submit_wait(function()
    KEPT = "kept"
    return require("workerpool").worker_id()
  end)
  T.eq(math.type(first), "integer")
  T.eq(pool:workers(), 1)
  for i = 1, 5 do
    local ok = pool:submit(function() error("e" .. i) end):wait()
    T.eq(ok, false)
    T.eq(pool:submit_wait(id), first, "same worker after error " .. i)
    T.eq(pool:workers(), 1)
  end
  T.eq(pool:submit_wait(function() return KEPT end), "kept",
    "an error does not replace the worker's state")
end)

T.test("non-string error values come back as they are", function()
  local pool <close> = new_pool()
  local ok, e = pool:submit(function() error({ code = 42, tags = { "a" } }) end)
      :wait()
  T.eq(ok, false)
  T.eq(type(e), "table")
  T.eq(e.code, 42)
  T.eq(e.tags[1], "a")
  -- submit_wait raises the table itself.
  local ok2, e2 = pcall(pool.submit_wait, pool, function()
    error({ code = 7 })
  end)
  T.eq(ok2, false)
  T.eq(type(e2), "table")
  T.eq(e2.code, 7)
  -- Other error values.
  local ok3, e3 = pool:submit(function() error(true) end):wait()
  T.eq(ok3, false)
  T.eq(e3, true)
  -- A number becomes a string with a traceback (docs/values.md).
  local ok5, e5 = pool:submit(function() error(42) end):wait()
  T.eq(ok5, false)
  T.eq(type(e5), "string")
  T.ok(e5:find("^42\nstack traceback:\n"), "a traceback: " .. e5)
  -- An error value that cannot cross states still fails the task.
  local ok4, e4 = pool:submit(function() error(coroutine.create(print)) end)
      :wait()
  T.eq(ok4, false)
  T.ok(contains(e4, "thread: "), "described as a string: " .. tostring(e4))
end)

T.test("error(nil)", function()
  local pool <close> = new_pool()
  local ok, msg = pool:submit(function() error(nil) end):wait()
  T.eq(ok, false)
  T.ok(contains(msg, "error object is nil"), tostring(msg))
  T.ok(contains(msg, "stack traceback"), tostring(msg))
  local ok2, err = pcall(pool.submit_wait, pool, function() error() end)
  T.eq(ok2, false)
  T.ok(contains(err, "error object is nil"), tostring(err))
end)

T.test("a handler name that does not exist", function()
  local pool <close> = new_pool { name = "errors-nohandler",
    init = "function exists() return 1 end" }
  local ok, msg = pool:submit("does_not_exist", 1, 2):wait()
  T.eq(ok, false)
  T.ok(contains(msg, "no handler"), msg)
  T.ok(contains(msg, "does_not_exist"), msg)
  T.ok(contains(msg, "errors-nohandler"), msg)
  T.ok(not contains(msg, "stack traceback"),
    "engine errors carry no traceback: " .. msg)
  -- A global that is not a function is not a handler either.
  pool:submit_wait(function() NOT_A_FUNCTION = 5 end)
  ok, msg = pool:submit("NOT_A_FUNCTION"):wait()
  T.eq(ok, false)
  T.ok(contains(msg, "no handler"), msg)
  T.raises(function() pool:submit_wait("nope") end, "no handler 'nope'")
  T.eq(pool:submit_wait("exists"), 1, "the pool still works")
end)

T.test("memory errors fail the task; the pool keeps working", function()
  local pool <close> = new_pool()
  -- Lua 5.4 refuses a string this long before allocating it.
  local ok, msg = pool:submit(function() return #string.rep("x", 2 ^ 40) end)
      :wait()
  T.eq(ok, false)
  T.ok(contains(msg, "resulting string too large") or
    contains(msg, "not enough memory"), msg)
  T.eq(pool:submit_wait(function() return 1 + 1 end), 2)
  -- Big but possible: 64 MiB allocated and dropped in the worker.
  T.eq(pool:submit_wait(function() return #string.rep("y", 64 << 20) end),
    64 << 20)
  T.eq(pool:submit_wait(function() return "next" end), "next")
end)

-- ---------------------------------------------------------------------------
-- Init scripts
-- ---------------------------------------------------------------------------

T.test("a runtime error in init raises from workerpool.new", function()
  local err = T.raises(function()
    wp.new { max_workers = 1, init = "local x = 1\nerror('init exploded')" }
  end, "init exploded")
  T.ok(contains(err, "workerpool.new: init failed"), err)
  T.ok(contains(err, "init:2: init exploded"), err)
  T.ok(contains(err, "stack traceback"), err)
  -- A failing call deeper in the init.
  err = T.raises(function()
    wp.new { max_workers = 1, init = "local t = nil\nreturn t.field" }
  end, "init failed")
  T.ok(contains(err, "attempt to index"), err)
  T.ok(contains(err, "stack traceback"), err)
end)

T.test("a syntax error in init raises from workerpool.new", function()
  local err = T.raises(function()
    wp.new { max_workers = 1, init = "function (" }
  end, "workerpool.new: init failed")
  T.ok(contains(err, "init:1:"), err)
end)

T.test("a failed init does not take the pool name", function()
  T.raises(function()
    wp.new { name = "errors-badinit", max_workers = 1, init = "error('x')" }
  end, "init failed")
  T.eq(wp.get("errors-badinit"), nil)
  local p <close> = wp.new { name = "errors-badinit", max_workers = 1 }
  T.eq(p:name(), "errors-badinit")
end)

T.test("init_file: a missing file and a failing file", function()
  T.raises(function()
    wp.new { max_workers = 1, init_file = "/nonexistent/wpool-init.lua" }
  end, "cannot read init_file")
  local path = os.tmpname()
  local fh = assert(io.open(path, "w"))
  fh:write("-- line 1\nerror('file init failed')\n")
  fh:close()
  local err = T.raises(function()
    wp.new { max_workers = 1, init_file = path }
  end, "file init failed")
  os.remove(path)
  T.ok(contains(err, ":2: file init failed"), err)
  T.ok(contains(err, "stack traceback"), err)
end)

-- ---------------------------------------------------------------------------
-- Deadlock guard
-- ---------------------------------------------------------------------------

T.test("submit_wait from a task of its own pool raises 'deadlock'", function()
  local pool <close> = new_pool { name = "errors-deadlock", max_workers = 2 }
  local msg = pool:submit_wait(function()
    local p = require("workerpool").get("errors-deadlock")
    local ok, err = pcall(p.submit_wait, p, function() return 1 end)
    return ok and "no error" or err
  end)
  T.ok(contains(msg, "deadlock"), msg)
  T.ok(contains(msg, "errors-deadlock"), msg)
  -- Without the pcall, the task fails with that message.
  local ok, err = pool:submit(function()
    local p = require("workerpool").get("errors-deadlock")
    return p:submit_wait(function() return 1 end)
  end):wait()
  T.eq(ok, false)
  T.ok(contains(err, "deadlock"), err)
  -- submit (no waiting) from a task is fine.
  T.eq(pool:submit_wait(function()
    local p = require("workerpool").get("errors-deadlock")
    return p:submit(function() return 1 end) ~= nil
  end), true)
  -- stop_wait from the pool's own task also raises.
  local ok2, err2 = pool:submit(function()
    return require("workerpool").get("errors-deadlock"):stop_wait()
  end):wait()
  T.eq(ok2, false)
  T.ok(contains(err2, "deadlock"), err2)
  T.eq(pool:stopped(), false)
end)

T.test("submit_wait to another pool from a task is allowed", function()
  local a <close> = new_pool { name = "errors-a" }
  local b <close> = new_pool { name = "errors-b" } -- luacheck: ignore 211
  T.eq(a:submit_wait(function()
    return require("workerpool").get("errors-b"):submit_wait(function()
      return "from b"
    end)
  end), "from b")
end)

-- ---------------------------------------------------------------------------
-- Argument checks of the module
-- ---------------------------------------------------------------------------

T.test("argument checks", function()
  local pool <close> = new_pool()
  local f = pool:submit(function() return 1 end)
  T.raises(function() f:wait(-1) end, "bad argument #1 to 'wait'")
  T.raises(function() f:wait("soon") end, "bad argument #1 to 'wait'")
  T.raises(function() pool:submit() end, "bad argument #1 to 'submit'")
  T.raises(function() pool:submit_wait() end,
    "bad argument #1 to 'submit_wait'")
  T.raises(function() pool:submit(42) end,
    "bad argument #1 to 'submit' (handler name or Lua function expected, " ..
    "got number)")
  T.raises(function() pool:submit(nil) end,
    "handler name or Lua function expected, got nil")
  -- A table is a task descriptor (docs/guards.md): it needs fn or handler.
  T.raises(function() pool:submit({}) end,
    "bad argument #1 to 'submit' (a task descriptor needs fn or handler)")
  T.raises(function() pool:submit(print) end,
    "bad argument #1 to 'submit' (handler name or Lua function expected")
  T.raises(function() pool:submit_wait(math.floor, 1.5) end,
    "bad argument #1 to 'submit_wait' (handler name or Lua function expected")
  T.raises(function() pool.submit(42, function() end) end, "bad argument #1")
  T.raises(function() wp.sleep(-1) end, "bad argument #1 to 'sleep'")
  T.raises(function() wp.sleep("x") end, "bad argument #1 to 'sleep'")
  T.raises(function() wp.new("x") end, "bad argument #1 to 'new'")
  T.raises(function() wp.new() end, "bad argument #1 to 'new'")
  T.raises(function() wp.new {} end, "max_workers must be a positive integer")
  T.raises(function() wp.new { max_workers = 0 } end,
    "max_workers must be a positive integer")
  T.raises(function() wp.new { max_workers = 1.5 } end,
    "max_workers must be a positive integer")
  T.raises(function() wp.new { max_workers = 1, min_workers = 2 } end,
    "min_workers")
  T.raises(function() wp.new { max_workers = 1, idle_timeout = 0 / 0 } end,
    "idle_timeout")
  T.raises(function() wp.new { max_workers = 1, bogus = true } end,
    "unknown option 'bogus'")
  T.raises(function() wp.new { max_workers = 1, init = 5 } end,
    "init must be a string")
  T.raises(function() wp.new { max_workers = 1, init = "", init_file = "x" } end,
    "mutually exclusive")
  T.raises(function()
    local p <close> = wp.new { name = "errors-dup", max_workers = 1 } -- luacheck: ignore 211
    wp.new { name = "errors-dup", max_workers = 1 }
  end, "already exists")
  -- Nothing above broke the pool.
  local ok, v = f:wait()
  T.eq(ok, true)
  T.eq(v, 1)
end)

T.test("a stopped pool refuses submissions without raising", function()
  local pool = new_pool()
  pool:stop_wait()
  local f, msg, name = pool:submit(function() end)
  T.eq(f, nil)
  T.eq(msg, "stopped")
  T.eq(name, "ESTOPPED")
  local r1, r2 = pool:submit_wait(function() end)
  T.eq(r1, nil)
  T.eq(r2, "stopped")
  -- The check comes before encoding: a bad argument does not raise.
  local f2, msg2 = pool:submit(function() end, coroutine.create(print))
  T.eq(f2, nil)
  T.eq(msg2, "stopped")
end)

-- The error convention (docs/architecture.md, "Errors"): every runtime
-- failure is nil, message, NAME, and code compares the NAME.

T.test("a policy refusal is nil, reason, NAME of its drop class", function()
  local tenant = require "workerpool.tenant"
  local breaker = require "workerpool.breaker"
  local function refuse(why) return { admit = function() return nil, why end } end
  local cases = {
    { refuse("rate_limited"), "rate_limited", "ERATE_LIMITED" },
    { refuse("rate_limited: not enough memory"), "rate_limited: not enough memory",
      "ERATE_LIMITED" },
    { refuse("concurrency_limited"), "concurrency_limited", "ECONCURRENCY" },
    { refuse("open"), "open", "EBREAKER_OPEN" },
    { refuse("half_open"), "half_open", "EBREAKER_OPEN" },
    { refuse("closed for lunch"), "closed for lunch", "EPOLICY" },
    { refuse(nil), "policy", "EPOLICY" },
  }
  for i, c in ipairs(cases) do
    local pool <close> = new_pool { name = "errors-refusal-" .. i }
    pool:use(c[1])
    local r = T.pack(pool:submit(function() end))
    T.eq(r.n, 3, "three values for " .. c[2])
    T.eq(r[1], nil)
    T.eq(r[2], c[2])
    T.eq(r[3], c[3])
    r = T.pack(pool:post(function() end))
    T.eq(r.n, 3)
    T.eq(r[3], c[3])
    -- submit_wait raises the reason itself, as before
    T.eq(select(2, pcall(pool.submit_wait, pool, function() end)), c[2])
  end
  -- The shipped policies, end to end.
  local pool <close> = new_pool { name = "errors-refusal-shipped" }
  pool:use(tenant.bucket { rate = 0.001, burst = 1, dict = "errors.refusal.bucket" })
  T.eq(pool:submit(function() end):wait(), true)
  T.eq(select(3, pool:submit(function() end)), "ERATE_LIMITED")
  local p2 <close> = new_pool { name = "errors-refusal-breaker" }
  local b = breaker.new { name = "errors.refusal", consecutive_failures = 1, open_timeout = 60 }
  p2:use(b)
  p2:submit(function() error("x") end):wait()
  local f, why, name = b:submit(p2, function() end)
  T.eq(f, nil)
  T.eq(why, "open")
  T.eq(name, "EBREAKER_OPEN")
end)

T.test("f:wait running out is nil, \"timeout\", \"ETIMEDOUT\"", function()
  local pool <close> = new_pool()
  local d = wp.shared("errors.wait.gate")
  local f = pool:submit(T.gate, "errors.wait.gate", "go")
  local r = T.pack(f:wait(0))
  T.eq(r.n, 3)
  T.eq(r[1], nil)
  T.eq(r[2], "timeout")
  T.eq(r[3], "ETIMEDOUT")
  d:set("go", true)
  T.eq(f:wait(), true)
end)

T.test("the outcome words are the status names, in every API", function()
  local pool = new_pool()
  pool:pause()
  local f = pool:submit(function() end)
  T.eq(f:cancel(), true)
  local ok, why = f:wait()
  T.eq(ok, false)
  T.eq(why, "cancelled")
  T.eq(f:status(), why)
  local g = pool:submit(function() end)
  T.eq(pool:stop(), 1)
  ok, why = g:wait()
  T.eq(ok, false)
  T.eq(why, "discarded")
  T.eq(g:status(), why)
end)

T.test("json and pack failures carry EINVAL", function()
  local r = T.pack(wp.json.decode('{"a": 1,'))
  T.eq(r.n, 3)
  T.eq(r[1], nil)
  T.eq(r[3], "EINVAL")
  r = T.pack(wp.json.encode { f = print })
  T.eq(r.n, 3)
  T.eq(r[2], "$.f: cannot encode a function")
  T.eq(r[3], "EINVAL")
end)

T.run()
