-- harness.lua: the tiny test framework of the Lua suite.
--
-- A test file registers cases with T.test(name, fn) and ends with T.run(),
-- which runs them in order, prints one line per failure and a closing
-- "N passed, N failed" line, and exits non-zero when anything failed.
-- Scripts run by `wpool run` end with T.run_host() instead.

local T = {}
local cases = {}

-- A factor for time bounds that only a stalled process would exceed: 1 in
-- plain builds, more under sanitizers (tests/CMakeLists.txt sets it).
T.time_scale = tonumber(os.getenv("WPOOL_TEST_TIME_SCALE")) or 1

function T.test(name, fn)
  cases[#cases + 1] = { name = name, fn = fn }
end

local function fmt(v)
  if type(v) == "string" then return string.format("%q", v) end
  if math.type(v) == "float" then return string.format("%.17g (float)", v) end
  return tostring(v)
end

function T.eq(got, want, what)
  if got ~= want or math.type(got) ~= math.type(want) then
    error(string.format("%s: expected %s, got %s", what or "value",
      fmt(want), fmt(got)), 2)
  end
end

function T.ok(v, what)
  if not v then error((what or "assertion") .. " failed", 2) end
  return v
end

-- Runs fn, which must raise an error whose message contains `pattern`
-- (a plain substring); returns the message.
function T.raises(fn, pattern, what)
  local ok, err = pcall(fn)
  if ok then error((what or "call") .. " did not raise", 2) end
  err = tostring(err)
  if pattern and not err:find(pattern, 1, true) then
    error(string.format("%s raised %q, expected it to contain %q",
      what or "call", err, pattern), 2)
  end
  return err
end

-- Polls cond() until it is true or `seconds` pass; returns its last value.
function T.eventually(cond, seconds, what)
  local wp = require "workerpool"
  local deadline = wp.now() + (seconds or 10)
  repeat
    local v = cond()
    if v then return v end
    wp.sleep(0.005)
  until wp.now() > deadline
  error((what or "condition") .. " not reached in time", 2)
end

local function run_cases()
  local passed, failed = 0, 0
  local only = os.getenv("WP_TEST_ONLY")
  for _, c in ipairs(cases) do
    if not only or c.name:find(only, 1, true) then
      local ok, err = xpcall(c.fn, debug.traceback)
      if ok then
        passed = passed + 1
      else
        failed = failed + 1
        io.stderr:write(string.format("FAIL %s: %s\n", c.name, err))
      end
    end
  end
  return passed, failed
end

-- Returns a function that makes a fresh shared dictionary per call and
-- returns it with its name, "<prefix>.<n>".
function T.dict_maker(prefix)
  local n = 0
  return function()
    n = n + 1
    local name = prefix .. "." .. n
    return require("workerpool").shared(name), name
  end
end

-- A task for pools under test: blocks its worker until `key` is set in
-- dict dname (giving up after 30 s), then returns the rest of its
-- arguments.
function T.gate(dname, key, ...)
  local W = require "workerpool"
  local d = W.shared(dname)
  local deadline = W.now() + 30
  while not d:get(key) do
    if W.now() > deadline then error("gate " .. key .. " never opened") end
    W.sleep(0.001)
  end
  return ...
end

-- Helpers for suites whose cases block tasks on shared dictionaries.
-- Returns a table with:
--   case(name, fn): a test that cleans up even when it fails: the dicts it
--     made get their "release" key set (freeing blocked tasks), then the
--     pools it made are stopped;
--   newdict(tag): a fresh dict "<prefix>.<tag>.<n>" and its name;
--   newpool(opts): workerpool.new(opts) after defaults(opts), if given;
--   track(pool): a pool made otherwise, stopped like newpool's;
--   count(d, k), wait_count(d, k, n [, what]), stays(cond, seconds, what).
function T.suite(prefix, defaults)
  local wp = require "workerpool"
  local S, cleanup, ndicts = {}, { dicts = {}, pools = {} }, 0
  function S.case(name, fn)
    T.test(name, function()
      cleanup = { dicts = {}, pools = {} }
      local ok, err = xpcall(fn, debug.traceback)
      for _, d in ipairs(cleanup.dicts) do d:set("release", true) end
      for _, p in ipairs(cleanup.pools) do pcall(p.stop, p) end
      if not ok then error(err, 0) end
    end)
  end
  function S.newdict(tag)
    ndicts = ndicts + 1
    local name = string.format("%s.%s.%d", prefix, tag, ndicts)
    local d = wp.shared(name)
    cleanup.dicts[#cleanup.dicts + 1] = d
    return d, name
  end
  function S.track(p) -- a pool made elsewhere, stopped like newpool's
    cleanup.pools[#cleanup.pools + 1] = p
    return p
  end
  function S.newpool(opts)
    if defaults then defaults(opts) end
    return S.track(wp.new(opts))
  end
  function S.count(d, k) return d:get(k) or 0 end
  function S.wait_count(d, k, n, what)
    T.eventually(function() return S.count(d, k) >= n end, 15,
      what or string.format("%s reaches %d", k, n))
  end
  -- Checks over a short window that cond() stays true.  The window only
  -- guards against a false pass, so its length does not matter.
  function S.stays(cond, seconds, what)
    local deadline = wp.now() + seconds
    repeat
      T.ok(cond(), what)
      wp.sleep(0.005)
    until wp.now() > deadline
  end
  return S
end

-- Returns fresh(tag), which makes unique names "<prefix>.<tag>.<n>" (for
-- dictionaries, breakers, pools), and newpool(opts), which makes a pool
-- with max_workers 2 and idle_timeout 60 unless opts say otherwise.
function T.policy_helpers(prefix)
  local wp = require "workerpool"
  local n = 0
  local function fresh(tag)
    n = n + 1
    return string.format("%s.%s.%d", prefix, tag, n)
  end
  local function newpool(opts)
    opts = opts or {}
    opts.idle_timeout = opts.idle_timeout or 60
    opts.max_workers = opts.max_workers or 2
    return wp.new(opts)
  end
  return fresh, newpool
end

-- ---- child processes ------------------------------------------------------

-- io.popen and os.execute start /bin/sh, which crashes with the TSan
-- runtime preloaded (as TSan runs of the suite do): cases that start
-- processes skip that part there.
T.can_spawn = not (os.getenv("LD_PRELOAD") or ""):find("tsan", 1, true)

function T.skip(what)
  print("SKIP " .. what .. ": cannot start processes under TSan")
end

-- Runs a shell command with the sanitizer runtime (if the suite preloads
-- one) kept out of it; returns true when it exited 0, and its output.
function T.sh(cmd)
  local p = assert(io.popen("env -u LD_PRELOAD " .. cmd .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  return ok == true, out
end

-- Runs Lua source src in a child lua5.4 (with the sanitizer runtime, which
-- the module needs) with its stderr in file errf (or discarded); returns
-- true when it exited 0 (under ASan: without a leak), and its stdout.
function T.child(src, errf)
  local script = os.tmpname()
  local fh = assert(io.open(script, "w"))
  fh:write(src)
  fh:close()
  local preload = os.getenv("LD_PRELOAD")
  local ok, out = T.sh(string.format("sh -c 'exec env %s %s %s 2> %s'",
    preload and ("LD_PRELOAD=" .. preload) or "", arg and arg[-1] or "lua5.4",
    script, errf or "/dev/null"))
  os.remove(script)
  return ok, out
end

-- Checks text with `promtool check metrics`: true, or false and why.
function T.promtool(text)
  local path = os.tmpname()
  local fh = assert(io.open(path, "wb"))
  fh:write(text)
  fh:close()
  local ok, out = T.sh("promtool check metrics < " .. path)
  os.remove(path)
  return ok, out
end

-- JSON null in what T.read_log returns.
T.null = setmetatable({}, { __tostring = function() return "null" end })

-- Reads a file of JSON lines, each checked by python3's strict parser (and
-- required to be ASCII, as the log writes it), into a list of tables.
-- Raises naming the first bad line.
function T.read_log(path)
  local py = os.tmpname()
  local fh = assert(io.open(py, "w"))
  fh:write([[
import json, sys
def lua(v):
    if v is None: return "NULL"
    if v is True: return "true"
    if v is False: return "false"
    if isinstance(v, (int, float)): return repr(v)
    if isinstance(v, str):
        return '"' + "".join("\\%d" % b for b in v.encode("utf-8")) + '"'
    if isinstance(v, list): return "{" + ",".join(lua(x) for x in v) + "}"
    return "{" + ",".join("[%s]=%s" % (lua(k), lua(x)) for k, x in v.items()) + "}"
out = []
for n, line in enumerate(open(sys.argv[1], "rb"), 1):
    try:
        line.decode("ascii")
        out.append(lua(json.loads(line)))
    except Exception as e:
        sys.exit("line %d: %s: %r" % (n, e, line[:300]))
print("local NULL = ...; return {" + ",\n".join(out) + "}")
]])
  fh:close()
  local ok, out = T.sh(string.format("python3 %s %s", py, path))
  os.remove(py)
  if not ok then error("bad log lines: " .. out, 2) end
  return assert(load(out, "=log"))(T.null)
end

-- Packs a call's values, keeping trailing nils.
function T.pack(...) return { n = select("#", ...), ... } end

function T.run()
  local passed, failed = run_cases()
  collectgarbage()
  print(string.format("%d passed, %d failed", passed, failed))
  os.exit(failed == 0 and 0 or 1, true)
end

-- T.run for scripts run by `wpool run` (tests/host): when every case
-- passed it returns, and the event loop must then end by itself (a test
-- that leaves a timer, coroutine or task behind makes the script hang, and
-- ctest's timeout fails it).  After a failure it exits at once with
-- status 1, since what the failed case left running could keep the loop
-- alive (pools are not stopped then: under TSan, expect "thread leak"
-- reports after a failure).
function T.run_host()
  local passed, failed = run_cases()
  print(string.format("%d passed, %d failed", passed, failed))
  io.stdout:flush()
  if failed > 0 then
    io.stderr:flush()
    os.exit(1)
  end
end

return T
