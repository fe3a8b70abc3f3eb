-- redis.lua: the Redis Streams benchmark (docs/performance.md, "Redis
-- Streams"), run by scripts/bench/redis.sh under `wpool run`:
--   wpool run scripts/bench/redis.lua WPOOL ENTRIES REPS
-- Starts a private redis-server, loads ENTRIES entries into `jobs`, and
-- times 1, 2 and 3 `wpool pipeline run` consumer processes of one config
-- (a trivial map stage, redis-stream sink) from the first entry read to
-- the last result, then the same stage with a jsonl file source and sink
-- in one process.  Prints entries/s and the cost per entry.
local workerpool = require "workerpool"
local rserver = require "rserver"
local redis = require "workerpool.redis"
local WPOOL, N, REPS = arg[1], tonumber(arg[2] or "200000"), tonumber(arg[3] or "3")

local write = rserver.write

rserver.run(function(srv)
  local c = redis.client(srv.url)
  local dir = srv.dir
  write(dir .. "/stages.lua", [[
local M = {}
function M.work(item) return { src = item._id, n = item.n } end
return M
]])
  local stage = [[{"name": "work", "module": "stages.lua", "handler": "work", "workers": 2,
                   "batch": 64, "queue": 1024}]]
  write(dir .. "/redis.json", string.format([[
{"name": "bench", "source": {"type": "redis-stream", "url": "%s", "stream": "jobs",
 "group": "g", "start": "0", "claim_idle": 30, "count": 512, "block": 0.1},
 "stages": [%s], "sink": {"type": "redis-stream", "url": "%s", "stream": "results"}}
]], srv.url, stage, srv.url))
  write(dir .. "/file.json", string.format([[
{"name": "benchfile", "source": {"type": "jsonl", "path": "in.jsonl"},
 "stages": [%s], "sink": {"type": "jsonl", "path": "out.jsonl"}}
]], stage))
  local f = assert(io.open(dir .. "/in.jsonl", "w"))
  for i = 1, N do f:write(string.format('{"_id":"%d-0","n":"%d"}\n', i, i)) end
  f:close()
  assert(c:call("EVAL", "for i = 1, tonumber(ARGV[1]) do redis.call('XADD', 'jobs', '*', " ..
                "'n', i) end return 1", 0, N))
  print(string.format("entries: %d, reps: %d, cores: %d", N, REPS,
                      tonumber(io.popen("nproc"):read("l"))))
  local results = {}
  for procs = 1, 3 do
    local best
    for _ = 1, REPS do
      c:call("DEL", "results")
      c:call("XGROUP", "DESTROY", "jobs", "g")
      local t0 = workerpool.now()
      local ps = {}
      for i = 1, procs do
        ps[i] = rserver.spawn(WPOOL .. " pipeline run --no-progress --log-level warn " ..
                              dir .. "/redis.json", dir)
      end
      while true do
        local len = tonumber(c:call("XLEN", "results"))
        local pend = c:call("XPENDING", "jobs", "g")
        if len >= N and type(pend) == "table" and pend[1] == 0 then break end
        workerpool.sleep(0.01)
      end
      local dt = workerpool.now() - t0
      for _, p in ipairs(ps) do p:kill("TERM") end
      for _, p in ipairs(ps) do assert(p:wait(60) == 0, p:output()) end
      best = best and math.min(best, dt) or dt
    end
    results[procs] = best
    print(string.format("redis-stream, %d process%s: %.2fs, %.0f entries/s", procs,
                        procs > 1 and "es" or "", best, N / best))
  end
  local bestf
  for _ = 1, REPS do
    local t0 = workerpool.now()
    local p = rserver.spawn(string.format("cd %s && %s pipeline run --no-progress " ..
                                          "--log-level warn file.json", dir, WPOOL), dir)
    assert(p:wait(300) == 0, p:output())
    local dt = workerpool.now() - t0
    bestf = bestf and math.min(bestf, dt) or dt
  end
  print(string.format("jsonl file, 1 process: %.2fs, %.0f entries/s", bestf, N / bestf))
  print(string.format("cost per entry: redis-stream %.1f us, jsonl file %.1f us, " ..
                      "Redis adds %.1f us", results[1] / N * 1e6, bestf / N * 1e6,
                      (results[1] - bestf) / N * 1e6))
  c:close()
end)
