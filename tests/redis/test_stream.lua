-- test_stream.lua: the redis-stream source, sink and dead letter against a
-- real redis-server (docs/scale-out.md):
--   1. poison entries end in jobs.dead after max_deliveries, with the error
--      and the delivery count, and are acknowledged; a clean SIGTERM exits 0;
--   2. a redis-server restarted mid-run (same folder, AOF on) loses
--      nothing: two consumers log redis.disconnected / redis.connected,
--      /readyz answers 503 and workerpool_redis_connected is 0 meanwhile,
--      and they finish every entry.
--
-- wpool run test_stream.lua WPOOL   (tests/CMakeLists.txt sets LUA_PATH)
local workerpool = require "workerpool"
local rserver = require "rserver"
local redis = require "workerpool.redis"
local WPOOL = assert(arg[1], "usage: test_stream.lua path/to/wpool")
local SCALE = tonumber(os.getenv("WPOOL_TEST_TIME_SCALE") or "1")

local write = rserver.write

local function fields(list)
  local t = {}
  for k = 1, #list, 2 do t[list[k]] = list[k + 1] end
  return t
end

local function wait_for(what, timeout, fn)
  local t0 = workerpool.now()
  while not fn() do
    assert(workerpool.now() - t0 < timeout * SCALE, "timed out waiting for " .. what)
    workerpool.sleep(0.05)
  end
end

local function http_code(port, path)
  local p = io.popen(string.format("curl -s -o /dev/null -w '%%{http_code}' " ..
                                   "http://127.0.0.1:%d%s", port, path))
  local code = p:read("a")
  p:close()
  return code
end

local function http_get(port, path)
  local p = io.popen(string.format("curl -s http://127.0.0.1:%d%s", port, path))
  local body = p:read("a")
  p:close()
  return body
end

local function config(srv, extra)
  return string.format([[
{"name": "st",
 "source": {"type": "redis-stream", "url": "%s", "stream": "jobs", "group": "wpool",
            "start": "0", "claim_idle": 0.5, "max_deliveries": 3, "count": 64, "block": 0.2},
 "stages": [{"name": "work", "module": "stages.lua", "handler": "work", "workers": 2,
             "batch": 16, "queue": 128}],
 "sink": {"type": "redis-stream", "url": "%s", "stream": "results"},
 "dead_letter": {"type": "redis-stream", "url": "%s", "stream": "jobs.dead"}%s}
]], srv.url, srv.url, srv.url, extra or "")
end

local STAGES = [[
local M = {}
function M.work(item)
  if item.poison then error("poison entry " .. item._id, 0) end
  return { src = item._id, n = item.n }
end
return M
]]

local function poison(srv)
  local c = redis.client(srv.url)
  write(srv.dir .. "/stages.lua", STAGES)
  write(srv.dir .. "/p.json", config(srv))
  local bad = {}
  for i = 1, 50 do
    local id
    if i % 20 == 0 then
      id = assert(c:call("XADD", "jobs", "*", "poison", "1", "n", i))
      bad[id] = true
    else
      assert(c:call("XADD", "jobs", "*", "n", i))
    end
  end
  local p = rserver.spawn(WPOOL .. " pipeline run --no-progress " .. srv.dir .. "/p.json",
                          srv.dir)
  wait_for("2 dead letters", 60, function()
    return tonumber(c:call("XLEN", "jobs.dead")) == 2
       and c:call("XPENDING", "jobs", "wpool")[1] == 0
  end)
  assert(tonumber(c:call("XLEN", "results")) == 48)
  for _, ent in ipairs(c:call("XRANGE", "jobs.dead", "-", "+")) do
    local d = fields(ent[2])
    assert(bad[d.id], "dead letter of an entry that is not poison: " .. tostring(d.id))
    assert(d.deliveries == "3", "deliveries " .. tostring(d.deliveries))
    assert(d.error:find("poison entry " .. d.id, 1, true), d.error)
    assert(d.stage == "work" and d.pipeline == "st")
    assert(workerpool.json.decode(d.item).poison == "1")
  end
  -- Acknowledged: nothing pending, and the errors kept meanwhile are gone.
  assert(c:call("HLEN", "jobs:wpool:errors") == 0)
  p:kill("TERM")
  local rc = p:wait(30 * SCALE)
  assert(rc == 0, "exit " .. tostring(rc) .. ": " .. p:output():sub(-2000))
  local out = p:output()
  assert(out:find('"redelivered":4', 1, true), "two entries redelivered twice each: " .. out)
  c:close()
  print("ok poison entries")
end

local function restart(srv)
  local N = 20000
  local c = redis.client(srv.url)
  write(srv.dir .. "/stages.lua", STAGES)
  write(srv.dir .. "/p.json", config(srv))
  assert(c:call("EVAL", "for i = 1, tonumber(ARGV[1]) do redis.call('XADD', 'jobs', '*', " ..
                "'n', i) end return 1", 0, N))
  local mport = srv.port + 1 < 65000 and srv.port + 1 or srv.port - 1
  local cmd = WPOOL .. " pipeline run --no-progress " .. srv.dir .. "/p.json"
  local p1 = rserver.spawn(cmd .. " --metrics-addr 127.0.0.1:" .. mport, srv.dir)
  local p2 = rserver.spawn(cmd, srv.dir)
  wait_for("/readyz", 30, function() return http_code(mport, "/readyz") == "200" end)
  wait_for("a quarter of the results", 60, function()
    return tonumber(c:call("XLEN", "results") or 0) >= N // 4
  end)
  local before = tonumber(c:call("XLEN", "results"))
  c:close()
  assert(before < N, "the run ended before the restart")
  -- Down for a second: both consumers notice, /readyz says 503.
  srv:cli("SHUTDOWN")
  wait_for("redis-server to stop", 20, function() return srv:cli("PING") ~= "PONG" end)
  wait_for("/readyz 503", 20, function() return http_code(mport, "/readyz") == "503" end)
  local m = http_get(mport, "/metrics")
  assert(m:find('workerpool_redis_connected{url="' .. srv.url .. '"} 0', 1, true), m)
  workerpool.sleep(1)
  assert(srv:launch() and srv:wait_up(), "redis-server did not come back")
  c = redis.client(srv.url)
  wait_for("every entry done", 120, function()
    local pend = c:call("XPENDING", "jobs", "wpool")
    return type(pend) == "table" and pend[1] == 0
       and tonumber(c:call("XLEN", "results")) >= N
  end)
  wait_for("/readyz 200 again", 20, function() return http_code(mport, "/readyz") == "200" end)
  assert(http_get(mport, "/metrics"):find('workerpool_redis_connected{url="' .. srv.url ..
                                           '"} 1', 1, true))
  -- Nothing lost: every entry has a result.
  local seen, n = {}, 0
  for _, ent in ipairs(c:call("XRANGE", "results", "-", "+")) do
    local f = fields(ent[2])
    if not seen[f.src] then seen[f.src], n = true, n + 1 end
  end
  for _, ent in ipairs(c:call("XRANGE", "jobs", "-", "+")) do
    assert(seen[ent[1]], "no result for " .. ent[1])
  end
  assert(n == N, n)
  for _, p in ipairs{ p1, p2 } do p:kill("TERM") end
  for _, p in ipairs{ p1, p2 } do
    local rc = p:wait(30 * SCALE)
    local out = p:output()
    assert(rc == 0, "exit " .. tostring(rc) .. ": " .. out:sub(-2000))
    assert(out:find('"event":"redis.disconnected"', 1, true), out:sub(-3000))
    assert(out:find('"event":"redis.connected"', 1, true), out:sub(-3000))
  end
  c:close()
  print(string.format("ok redis restart: %d entries, %d results", N, n))
end

rserver.run(poison, restart)
