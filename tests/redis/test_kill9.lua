-- test_kill9.lua: 100,000 entries in `jobs`, three `wpool pipeline run`
-- processes of one config consume them through the group `wpool`; one is
-- killed with SIGKILL partway.  After the other two are done and past
-- claim_idle: every entry has a result, XPENDING is empty, and the
-- duplicates are at most the entries that were pending on the killed one.
--
-- lua5.4 test_kill9.lua WPOOL   (LUA_PATH: tests/redis and lua/; LUA_CPATH:
-- the build's workerpool.so; tests/CMakeLists.txt sets them)
local rserver = require "rserver"
local redis = require "workerpool.redis"
local WPOOL = assert(arg[1], "usage: test_kill9.lua path/to/wpool")
local SCALE = tonumber(os.getenv("WPOOL_TEST_TIME_SCALE") or "1")
local N = 100000

rserver.run(function(srv)
  local c = redis.client(srv.url)
  assert(c:call("EVAL", "for i = 1, tonumber(ARGV[1]) do redis.call('XADD', 'jobs', '*', " ..
                "'n', i) end return 1", 0, N))
  local dir = srv.dir
  local f = assert(io.open(dir .. "/stages.lua", "w"))
  f:write([[
local M = {}
function M.work(item) return { src = item._id, n = item.n } end
return M
]])
  f:close()
  f = assert(io.open(dir .. "/p.json", "w"))
  f:write(string.format([[
{"name": "k9",
 "source": {"type": "redis-stream", "url": "%s", "stream": "jobs", "group": "wpool",
            "start": "0", "claim_idle": 2, "count": 128, "block": 0.2},
 "stages": [{"name": "work", "module": "stages.lua", "handler": "work", "workers": 2,
             "batch": 32, "queue": 256}],
 "sink": {"type": "redis-stream", "url": "%s", "stream": "results"}}
]], srv.url, srv.url))
  f:close()
  local cmd = string.format("%s pipeline run --no-progress --drain-timeout 20 %s/p.json",
                            WPOOL, dir)
  local procs = {}
  for i = 1, 3 do procs[i] = rserver.spawn(cmd, dir) end

  -- Kill the first one once the work is well under way.
  local t0 = os.time()
  while tonumber(c:call("XLEN", "results")) < N // 5 do
    assert(os.time() - t0 < 120 * SCALE, "no progress: " .. procs[1]:output())
    rserver.sleep(0.02)
  end
  procs[1]:kill("KILL")
  assert(procs[1]:wait(10), "the killed process did not end")
  local me = require("workerpool")["redis.consumer_name"]()
  local victim = me:match("^(.*)%-%d+$") .. "-" .. procs[1]:pid()
  local summary = assert(c:call("XPENDING", "jobs", "wpool"))
  local pending_victim = 0
  for _, pc in ipairs(type(summary[4]) == "table" and summary[4] or {}) do
    if pc[1] == victim then pending_victim = tonumber(pc[2]) end
  end
  print(string.format("killed %s with %d entries pending on it (results %s)", victim,
                      pending_victim, c:call("XLEN", "results")))

  -- Done: nothing pending, and at least N results (duplicates allowed).
  t0 = os.time()
  while true do
    local s = c:call("XPENDING", "jobs", "wpool")
    local len = tonumber(c:call("XLEN", "results"))
    if s[1] == 0 and len >= N then break end
    assert(os.time() - t0 < 120 * SCALE, string.format("not done: %d pending, %d results",
                                                       s[1], len))
    rserver.sleep(0.1)
  end
  for i = 2, 3 do procs[i]:kill("TERM") end
  for i = 2, 3 do
    local rc = procs[i]:wait(60 * SCALE)
    assert(rc == 0, string.format("process %d exited %s: %s", i, tostring(rc),
                                  procs[i]:output():sub(-2000)))
  end

  -- Every entry has at least one result; count the duplicates.
  local seen, total, last = {}, 0, "-"
  while true do
    local r = assert(c:call("XRANGE", "results", last == "-" and "-" or "(" .. last, "+",
                            "COUNT", 10000))
    if #r == 0 then break end
    for _, ent in ipairs(r) do
      local fields = ent[2]
      for k = 1, #fields, 2 do
        if fields[k] == "src" then seen[fields[k + 1]] = (seen[fields[k + 1]] or 0) + 1 end
      end
      total = total + 1
      last = ent[1]
    end
  end
  local unique, missing = 0, 0
  for _ in pairs(seen) do unique = unique + 1 end
  last = "-"
  while true do
    local r = assert(c:call("XRANGE", "jobs", last == "-" and "-" or "(" .. last, "+",
                            "COUNT", 10000))
    if #r == 0 then break end
    for _, ent in ipairs(r) do
      if not seen[ent[1]] then missing = missing + 1 end
      last = ent[1]
    end
  end
  local dups = total - unique
  print(string.format("results %d, entries with a result %d, missing %d, duplicates %d " ..
                      "(bound %d)", total, unique, missing, dups, pending_victim))
  assert(missing == 0, missing .. " entries have no result")
  assert(unique == N, "results for entries not in jobs")
  local s = c:call("XPENDING", "jobs", "wpool")
  assert(s[1] == 0, "XPENDING jobs wpool is not empty")
  assert(dups <= pending_victim, string.format("%d duplicates, more than the %d entries " ..
                                               "pending on the killed consumer", dups,
                                               pending_victim))
  c:close()
end)
print("ok")
