-- test_process.lua: what a script run by `wpool run` sees of its process:
-- `arg` and `...` hold the arguments; the loop runs until no coroutine,
-- timer or watched task is left and then the process ends by itself; an
-- error in a spawned coroutine or a callback is reported as a JSON log line
-- ("event":"coroutine.error", with a traceback) on stderr and the loop goes
-- on, while an error in the main script ends it with status 1.
--
-- The process-level cases run a child `wpool run` (the binary running this
-- file, arg[-2]) under coreutils' timeout, so a loop that never ends fails
-- instead of hanging.  The child inherits the environment (sanitizer
-- options included).

local NARGS = select("#", ...)

local T = require "harness"
local wp = require "workerpool"

local WPOOL = arg[-2]

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local function write_file(path, text)
  local fh = assert(io.open(path, "w"))
  fh:write(text)
  fh:close()
end

local function read_file(path)
  local fh = assert(io.open(path, "r"))
  local s = fh:read("a")
  fh:close()
  return s
end

-- Runs `source` as a script under `wpool run` with the (already quoted)
-- argument string; returns exit status, stdout, stderr, seconds taken, and
-- the script's path (removed already).  Blocks this loop meanwhile, which is
-- fine for a test.
local function run_child(source, args, limit)
  local script, errf = os.tmpname(), os.tmpname()
  write_file(script, source)
  local cmd = string.format("timeout -k 5 %d %s run %s %s 2>%s </dev/null",
    limit or 60, shell_quote(WPOOL), shell_quote(script), args or "",
    shell_quote(errf))
  local t0 = wp.now()
  local p = assert(io.popen(cmd, "r"))
  local out = p:read("a")
  local _, how, code = p:close()
  local took = wp.now() - t0
  local err = read_file(errf)
  os.remove(script)
  os.remove(errf)
  if how ~= "exit" then code = 128 + code end
  return code, out, err, took, script
end

local function lines(s)
  local v = {}
  for l in s:gmatch("[^\n]+") do v[#v + 1] = l end
  return v
end

-- The stderr lines that are JSON log lines of `event`.
local function events(err, event)
  local v = {}
  for _, l in ipairs(lines(err)) do
    if l:sub(1, 1) == "{" and l:find('"event":"' .. event .. '"', 1, true) then
      v[#v + 1] = l
    end
  end
  return v
end

-- ---- arguments ------------------------------------------------------------

T.test("this script: arg[0] is the script, arg[-1] the command, no arguments",
  function()
    T.ok(WPOOL and WPOOL ~= "", "arg[-2] names the wpool binary")
    T.eq(arg[-1], "run")
    T.ok(arg[0]:find("test_process.lua", 1, true), arg[0])
    T.eq(#arg, 0)
    T.eq(NARGS, 0)
  end)

T.test("arg and ... hold the script's arguments", function()
  local code, out, err, _, script = run_child([[
    print("n", select("#", ...))
    for i = 1, select("#", ...) do print("vararg", i, (select(i, ...))) end
    for i = -1, #arg do print("arg", i, arg[i]) end
  ]], "alpha 'two words' '' --log-level")
  T.eq(code, 0, "exit status; stderr: " .. err)
  local want = {
    "n\t4",
    "vararg\t1\talpha",
    "vararg\t2\ttwo words",
    "vararg\t3\t",
    "vararg\t4\t--log-level",
    "arg\t-1\trun",
    "arg\t0\t" .. script,
    "arg\t1\talpha",
    "arg\t2\ttwo words",
    "arg\t3\t",
    "arg\t4\t--log-level",
  }
  T.eq(out, table.concat(want, "\n") .. "\n")
end)

-- ---- the loop ends by itself ---------------------------------------------

T.test("the loop runs until nothing is left, then the process ends", function()
  local code, out, err, took = run_child([[
    local wp = require "workerpool"
    local pool = wp.new { max_workers = 2 }
    wp.spawn(function()
      wp.sleep(0.3)
      print("sleeper done")
    end)
    wp.after(0.1, function() print("after fired") end)
    pool:submit(function()
      require("workerpool").sleep(0.05)
      return "task result"
    end):on_done(function(ok, v) print("on_done", ok, v) end)
    local n, t = 0, nil
    t = wp.every(0.02, function()
      n = n + 1
      if n == 3 then
        t:cancel()
        print("every stopped")
      end
    end)
    print("main done")
  ]])
  T.eq(code, 0, "exit status; stderr: " .. err)
  local got = lines(out)
  T.eq(got[1], "main done", "the main chunk returned first")
  T.eq(got[#got], "sleeper done", "the last coroutine kept the loop alive")
  local seen = {}
  for _, l in ipairs(got) do seen[l] = true end
  T.ok(seen["after fired"], out)
  T.ok(seen["every stopped"], out)
  T.ok(seen["on_done\ttrue\ttask result"], out)
  T.eq(#got, 5, out)
  T.ok(took < 30, string.format("the process ended after %.1f s", took))
end)

T.test("a script with nothing left to do ends at once", function()
  local code, out, _, took = run_child([[print("hello")]])
  T.eq(code, 0)
  T.eq(out, "hello\n")
  T.ok(took < 30, string.format("took %.1f s", took))
end)

-- ---- errors ---------------------------------------------------------------

T.test("errors in coroutines and callbacks are logged; the loop goes on",
  function()
    local code, out, err = run_child([[
      local wp = require "workerpool"
      local h = wp.spawn(function()
        wp.sleep(0.01)
        error("spawned boom")
      end)
      wp.after(0.02, function() error("timer boom") end)
      local pool = wp.new { max_workers = 1 }
      pool:submit(function() return 1 end):on_done(function()
        error("on_done boom")
      end)
      wp.sleep(0.2)
      local ok, e = h:join()
      print("join", ok, e:find("spawned boom", 1, true) ~= nil)
      print("still running")
      pool:stop_wait()
    ]])
    T.eq(code, 0, "exit status; stderr: " .. err)
    T.eq(out, "join\tfalse\ttrue\nstill running\n")
    local errs = events(err, "coroutine.error")
    T.eq(#errs, 3, "three coroutine.error lines in:\n" .. err)
    for _, what in ipairs { "spawned boom", "timer boom", "on_done boom" } do
      local found
      for _, l in ipairs(errs) do
        if l:find(what, 1, true) then found = l end
      end
      T.ok(found, what .. " was logged:\n" .. err)
      T.ok(found:find('"level":"error"', 1, true), found)
      T.ok(found:find("stack traceback", 1, true), "with a traceback: " .. found)
      T.ok(found:find('"ts":"', 1, true), found)
    end
  end)

T.test("an error in the main script ends the loop at once with status 1",
  function()
    local code, out, err, took = run_child([[
      local wp = require "workerpool"
      wp.spawn(function() wp.sleep(600) end) -- would keep the loop alive
      wp.every(1, function() end)
      print("before")
      local function fail() error("main boom") end
      fail()
    ]])
    T.eq(code, 1)
    T.eq(out, "before\n")
    T.ok(err:find("^wpool: [^\n]*main boom"), err)
    T.ok(err:find("stack traceback", 1, true), err)
    T.ok(err:find("'fail'", 1, true), "the traceback names the function: " .. err)
    T.ok(took < 30, string.format("took %.1f s", took))
  end)

T.run_host()
