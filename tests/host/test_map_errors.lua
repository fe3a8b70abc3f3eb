-- test_map_errors.lua: a failing pool:map item under `wpool run` keeps its
-- message (issue 14): the task.error log line and what map raises carry
-- "item #i: message", a table error by its tostring, instead of
-- "(error object is not a string)".  The log is read from a child
-- `wpool run --log-file` of a small script.

local T = require "harness"

local wpool = arg[-2]

-- Error values are made in the worker: a metatable does not cross states.
local script = [[
local wp = require "workerpool"
local pool = wp.new{ name = "maperr", max_workers = 1 }
local function try(kind)
  local ok, err = pcall(pool.map, pool, function(x)
    if x ~= 2 then return x end
    if kind == "obj" then
      error(setmetatable({}, { __tostring = function() return "obj-msg" end }))
    elseif kind == "bad" then
      error(setmetatable({}, { __tostring = function() error("no") end }))
    end
    error(kind == "num" and 42 or "str-msg", 0)
  end, { 1, 2, 3 }, { chunk = 1 })
  assert(not ok)
  print((err:gsub("\n.*", "")))
end
try("str")
try("obj")
try("bad")
try("num")
local h = wp.spawn(function()
  return pool:map(function()
    error(setmetatable({}, { __tostring = function() return "obj-msg" end }))
  end, { 1 })
end)
local ok, err = h:join()
print(ok, (err:gsub("\n.*", "")))
]]

T.test("map errors keep their message in the log and in what map raises", function()
  local src, log = os.tmpname(), os.tmpname()
  local fh = assert(io.open(src, "w"))
  fh:write(script)
  fh:close()
  local ok, out = T.sh(string.format("%s run --log-file %s %s", wpool, log, src))
  T.ok(ok, out)
  local lines = {}
  for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
  T.eq(lines[1], "item #2: str-msg")
  T.eq(lines[2], "item #2: obj-msg")
  T.eq(lines[3], "item #2: (error object is a table value)")
  T.eq(lines[4], "item #2: 42")
  T.eq(lines[5], "false\titem #1: obj-msg")
  local errors = {}
  for _, e in ipairs(T.read_log(log)) do
    if e.event == "task.error" then errors[#errors + 1] = e.error:gsub("\n.*", "") end
  end
  os.remove(src)
  os.remove(log)
  T.eq(#errors, 5, "five task.error lines")
  T.eq(errors[1], "item #2: str-msg")
  T.eq(errors[2], "item #2: obj-msg")
  T.eq(errors[5], "item #1: obj-msg")
  for _, e in ipairs(errors) do
    T.ok(not e:find("not a string", 1, true), e)
  end
end)

T.run_host()
