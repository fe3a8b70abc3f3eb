-- test_bucket.lua: tenant.bucket{..., redis = URL} (docs/scale-out.md):
--   1. three `wpool pipeline run` processes whose stage has the bucket admit
--      at most burst + rate x t together (the items reach a counter stream);
--   2. the host loop (async grants) and two worker states (a blocking
--      connection each) share one bucket;
--   3. with Redis gone, on_unavailable decides and the decisions are
--      counted in workerpool_redis_bucket_unavailable_total.
--
-- wpool run test_bucket.lua WPOOL   (tests/CMakeLists.txt sets LUA_PATH)
local workerpool = require "workerpool"
local tenant = require "workerpool.tenant"
local rserver = require "rserver"
local redis = require "workerpool.redis"
local WPOOL = assert(arg[1], "usage: test_bucket.lua path/to/wpool")
local SCALE = tonumber(os.getenv("WPOOL_TEST_TIME_SCALE") or "1")

local write = rserver.write

local function redis_time(c)
  local t = assert(c:call("TIME"))
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end

local RATE, BURST = 20, 10

local function processes(srv)
  local c = redis.client(srv.url)
  assert(c:call("EVAL", "for i = 1, 3000 do redis.call('XADD', 'jobs', '*', 'customer', " ..
                "'acme', 'n', i) end return 1", 0))
  write(srv.dir .. "/stages.lua", "return { id = function(item) return item end }\n")
  write(srv.dir .. "/p.json", string.format([[
{"name": "bk",
 "source": {"type": "redis-stream", "url": "%s", "stream": "jobs", "start": "0",
            "claim_idle": 30, "count": 8, "block": 0.2},
 "stages": [{"name": "id", "module": "stages.lua", "handler": "id", "tenant": "customer",
             "queue": 8, "policies": [{"use": "tenant.bucket", "rate": %d, "burst": %d,
                                       "redis": "%s"}]}],
 "sink": {"type": "redis-stream", "url": "%s", "stream": "counter"}}
]], srv.url, RATE, BURST, srv.url, srv.url))
  local t0 = redis_time(c)
  local procs = {}
  for i = 1, 3 do
    procs[i] = rserver.spawn(WPOOL .. " pipeline run --no-progress " .. srv.dir .. "/p.json",
                             srv.dir)
  end
  workerpool.sleep(3)
  for _, p in ipairs(procs) do p:kill("TERM") end
  for i, p in ipairs(procs) do
    local rc = p:wait(30 * SCALE)
    assert(rc == 0, string.format("process %d exited %s: %s", i, tostring(rc),
                                  p:output():sub(-2000)))
  end
  local t = redis_time(c) - t0
  local n = tonumber(c:call("XLEN", "counter"))
  local bound = BURST + RATE * t
  print(string.format("3 processes admitted %d in %.2fs (bound %.1f)", n, t, bound))
  assert(n <= bound, string.format("%d admitted, more than burst + rate x t = %.1f", n, bound))
  assert(n >= RATE, "the processes admitted almost nothing: " .. n)
  c:close()
end

local function host_and_workers(srv)
  local c = redis.client(srv.url)
  local t0 = redis_time(c)
  local pool = workerpool.new{ max_workers = 2, min_workers = 2 }
  local fs = {}
  for w = 1, 2 do
    fs[w] = pool:submit(function(url, rate, burst)
      local wp = require "workerpool"
      local b = require("workerpool.tenant").bucket{ rate = rate, burst = burst, redis = url }
      local n, start = 0, wp.now()
      while wp.now() - start < 1.5 do
        if b:admit({ tenant = "shared" }) then n = n + 1 end
        wp.sleep(0.002)
      end
      return n
    end, srv.url, RATE, BURST)
  end
  local b = tenant.bucket{ rate = RATE, burst = BURST, redis = srv.url }
  local n, start = 0, workerpool.now()
  while workerpool.now() - start < 1.5 do
    if b:admit({ tenant = "shared" }) then n = n + 1 end
    workerpool.sleep(0.002)
  end
  local host_n = n
  for w = 1, 2 do
    local ok, k = fs[w]:wait()
    assert(ok, k)
    n = n + k
  end
  pool:stop()
  local t = redis_time(c) - t0
  print(string.format("host %d + workers %d admitted in %.2fs (bound %.1f)", host_n,
                      n - host_n, t, BURST + RATE * t))
  assert(n <= BURST + RATE * t)
  assert(host_n > 0 and n - host_n > 0, "both sides admitted")
  c:close()
  b:close()
end

local function unavailable(srv)
  local reject = tenant.bucket{ rate = RATE, burst = BURST, redis = srv.url }
  local allow = tenant.bucket{ rate = RATE, burst = BURST, redis = srv.url,
                               on_unavailable = "allow", key_prefix = "other:" }
  -- connected: the first admit asks, a later one takes the grant
  local got
  for _ = 1, 200 do
    got = reject:admit({ tenant = "u" })
    if got then break end
    workerpool.sleep(0.005)
  end
  assert(got, "no grant from a reachable Redis")
  -- A server that forgot the script (SCRIPT FLUSH, a restart): NOSCRIPT,
  -- SCRIPT LOAD again, on the host loop and on a blocking connection.
  srv:cli("SCRIPT", "FLUSH")
  got = nil
  for _ = 1, 200 do
    got = reject:admit({ tenant = "v" })
    if got then break end
    workerpool.sleep(0.005)
  end
  assert(got, "no grant after SCRIPT FLUSH")
  local pool = workerpool.new{ max_workers = 1 }
  local n = pool:submit_wait(function(url)
    require "workerpool" -- preloads workerpool.tenant in this state
    local b = require("workerpool.tenant").bucket{ rate = 1, burst = 2, redis = url }
    local k = 0
    if b:admit({ tenant = "x" }) then k = k + 1 end
    require("workerpool.redis").client(url):call("SCRIPT", "FLUSH")
    if b:admit({ tenant = "x" }) then k = k + 1 end
    return k
  end, srv.url)
  pool:stop()
  assert(n == 2, "blocking admits around a SCRIPT FLUSH: " .. tostring(n))
  srv:kill()
  local r_ok, r_why, a_ok
  for _ = 1, 200 do -- until both noticed
    r_ok, r_why = reject:admit({ tenant = "u" })
    a_ok = allow:admit({ tenant = "u" })
    if a_ok and not r_ok and reject.client and not reject.client.up then break end
    workerpool.sleep(0.01)
  end
  assert(r_ok == nil and r_why == "rate_limited", tostring(r_why))
  assert(a_ok == true)
  local m = workerpool.metrics()
  local url = srv.url:gsub("%-", "%%-")
  local rej = tonumber(m:match('workerpool_redis_bucket_unavailable_total{url="' .. url ..
                               '",decision="reject"} (%d+)'))
  local alw = tonumber(m:match('workerpool_redis_bucket_unavailable_total{url="' .. url ..
                               '",decision="allow"} (%d+)'))
  assert(rej and rej > 0 and alw and alw > 0, m)
  assert(m:find('workerpool_redis_connected{url="' .. srv.url .. '"} 0', 1, true), m)
  print(string.format("ok unavailable: %d rejected, %d allowed", rej, alw))
  reject:close()
  allow:close()
end

rserver.run(processes, host_and_workers, unavailable)
print("ok")
