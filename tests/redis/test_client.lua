-- test_client.lua: workerpool.redis (bindings/lredis.c) against a real
-- redis-server: URLs, replies, error replies, pipelines, on the host loop
-- and blocking in a worker state, and a connection the server closed.
--
-- wpool run test_client.lua   (tests/CMakeLists.txt sets LUA_PATH)
local workerpool = require "workerpool"
local rserver = require "rserver"
local redis = require "workerpool.redis"

-- URLs.
local u = assert(redis.parse_url("redis://:pw@example.org:6380/3"))
assert(u.host == "example.org" and u.port == 6380 and u.db == 3 and u.password == "pw")
assert(u.display == "redis://example.org:6380/3")
u = assert(redis.parse_url("redis://localhost"))
assert(u.port == 6379 and u.db == 0 and u.password == nil)
for _, bad in ipairs{ "http://x", "redis://", "redis://h:0", "redis://h:70000", "redis://h:x",
                      "redis://h/x", "redis://h:/1", "redis://a b", "redis://h/-1", 42 } do
  assert(redis.parse_url(bad) == nil, tostring(bad))
end
assert(not pcall(redis.client, "nope"))

rserver.run(function(srv)
  -- On the host loop.
  local c = redis.client(srv.url)
  assert(c.async)
  assert(c:call("PING") == "PONG")
  assert(c:call("SET", "k", 12.5) == "OK")
  assert(c:call("GET", "k") == "12.5")
  assert(c:call("GET", "missing") == false)
  assert(c:call("INCR", "n") == 1)
  local r, e, kind = c:call("INCR", "k")
  assert(r == nil and kind == "reply" and e:find("not an integer"), tostring(e))
  local p = assert(c:pipeline({ { "RPUSH", "l", "a", "b" }, { "LRANGE", "l", 0, -1 },
                                { "NOSUCHCOMMAND" } }))
  assert(p[1] == 2 and p[2][1] == "a" and p[2][2] == "b" and p[3].error:find("unknown"))
  assert(not pcall(c.call, c, "SET", "k", {}), "a table argument raises")

  -- Blocking, in a worker state; a pipeline cut short by a bad argument
  -- must not leave replies out of step.
  local pool = workerpool.new{ max_workers = 1 }
  local res = pool:submit_wait(function(url)
    local wp = require "workerpool"
    local rc = require("workerpool.redis").client(url)
    assert(not rc.async)
    assert(rc:call("SET", "w", "1") == "OK")
    local okp = pcall(rc.pipeline, rc, { { "SET", "w", "2" }, { "GET", {} } })
    assert(not okp)
    local v
    for _ = 1, 50 do -- the cut connection is replaced after the backoff
      v = rc:call("GET", "w")
      if v then break end
      wp.sleep(0.05)
    end
    -- (the cut pipeline's commands were only buffered: dropped with it)
    assert(v == "1", tostring(v))
    assert(rc:call("ECHO", "x") == "x")
    local pr = assert(rc:pipeline({ { "GET", "w" }, { "ECHO", "y" } }))
    rc:close()
    return pr[1] .. pr[2]
  end, srv.url)
  assert(res == "1y", tostring(res))
  pool:stop()

  -- The server closes the connection: the next call fails (it does not
  -- hang), a later one reconnects.
  local rd = redis.client(srv.url)
  assert(rd:call("PING") == "PONG")
  srv:restart(0.2)
  local got
  for _ = 1, 100 do
    got = rd:call("PING")
    if got == "PONG" then break end
    workerpool.sleep(0.05)
  end
  assert(got == "PONG", "no reconnection")
  assert(rd:connected())
  rd:close()
  c:close()
end)
print("ok")
