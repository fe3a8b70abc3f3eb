-- http_server.lua: an OpenResty-style HTTP/1.1 service under `wpool run`.
--
-- luv TCP on the host's own loop, one host coroutine per connection with
-- keep-alive and pipelining, and each request's CPU work done by a pool
-- (`submit_wait` suspends only that connection's coroutine). It serves its
-- own `/metrics`: the engine's series plus the server's, added by a
-- collector. On SIGINT/SIGTERM an `on_shutdown` handler closes the
-- listener and the idle connections; a request in flight gets its answer
-- with `Connection: close`, and the pool drains as usual.
--
--   wpool run scripts/examples/http_server.lua [PORT [WORKERS]]
--
-- PORT defaults to 8080 (0: any free port); the port is logged as
-- `http.listening`. Routes: `GET /` (a small task), `GET /work?n=N` (N
-- rounds of hashing, at most 10^7), `GET /sleep?ms=N` (a worker waits N ms,
-- at most 10 s: a slow upstream), `GET /metrics`. Deliberately left out:
-- chunked request bodies (501), TLS, and any limit on connections.

local uv = require "luv"
local workerpool = require "workerpool"

local port = math.tointeger(tonumber(arg[1] or 8080))
local workers = math.tointeger(tonumber(arg[2] or 4))
assert(port and port >= 0 and port < 65536, "PORT must be 0..65535")
assert(workers and workers > 0, "WORKERS must be a positive integer")

local MAX_HEAD = 8192 -- bytes of request line and headers
local MAX_BODY = 1024 * 1024

local pool = workerpool.new{
  name = "http", max_workers = workers, queue_cap = 4096, on_full = "reject",
  init = [[
    -- Runs in every worker state: the handlers the requests call by name.
    function hello() return 200, "hello from a worker\n" end
    function work(n) -- FNV-1a over the integers 1..n: pure CPU
      local h = 2166136261
      for i = 1, n do h = ((h ~ (i & 0xff)) * 16777619) & 0xffffffff end
      return 200, string.format("n=%d fnv=%08x\n", n, h)
    end
    function slow(ms)
      require("workerpool").sleep(ms / 1000)
      return 200, string.format("slept %d ms\n", ms)
    end
  ]],
}

-- The server's own series, for the collector below.
local stats = { open = 0, accepted = 0, requests = {} }

workerpool.metrics_collector("http_server", function()
  local out = {
    "# HELP http_connections_open Client connections open now.",
    "# TYPE http_connections_open gauge",
    "http_connections_open " .. stats.open,
    "# HELP http_connections_accepted_total Client connections accepted.",
    "# TYPE http_connections_accepted_total counter",
    "http_connections_accepted_total " .. stats.accepted,
    "# HELP http_requests_total Requests answered, by status code.",
    "# TYPE http_requests_total counter",
  }
  local codes = {}
  for code in pairs(stats.requests) do codes[#codes + 1] = code end
  table.sort(codes)
  for _, code in ipairs(codes) do
    out[#out + 1] = string.format('http_requests_total{code="%d"} %d', code,
      stats.requests[code])
  end
  return table.concat(out, "\n") .. "\n"
end)

local reasons = { [200] = "OK", [400] = "Bad Request", [404] = "Not Found",
  [405] = "Method Not Allowed", [413] = "Content Too Large",
  [431] = "Request Header Fields Too Large", [500] = "Internal Server Error",
  [501] = "Not Implemented", [503] = "Service Unavailable" }

local draining = false
local idle = {} -- conn -> its reader's stop(), while it waits for a request

-- Reads from a connection in its host coroutine. Returns read(), which
-- gives the next chunk or nil and the error ("EOF" at the end), and
-- stop(why), which stops reading and makes read() return nil, why.
local function reader(conn)
  local chunks, wake = {}, nil
  local function push(err, data)
    chunks[#chunks + 1] = { err = err or (data == nil and "EOF"), data = data }
    if wake then
      local cb = wake
      wake = nil
      cb()
    end
  end
  conn:read_start(push)
  local function read()
    if #chunks == 0 then workerpool.await(function(cb) wake = cb end) end
    local c = table.remove(chunks, 1)
    if c.err then return nil, c.err end
    return c.data
  end
  local function stop(why)
    conn:read_stop()
    push(why)
  end
  return read, stop
end

-- Parses one request head. Returns method, target, version, headers (lower
-- case names), or nil.
local function parse_head(head)
  local method, target, major, minor =
    head:match("^(%u+) (%S+) HTTP/(%d)%.(%d)\r\n")
  if not method then return nil end
  local headers = {}
  for name, value in head:gmatch("\r\n([^:\r\n]+):[ \t]*([^\r\n]*)") do
    headers[name:lower()] = value:gsub("[ \t]+$", "")
  end
  return method, target, tonumber(major) * 10 + tonumber(minor), headers
end

local function query_int(target, key, default, max)
  local v = math.tointeger(tonumber(target:match("[?&]" .. key .. "=(%d+)")))
  if not v then return default end
  return math.min(v, max)
end

-- Answers one request: status, body, content type.
local function route(method, target)
  if method ~= "GET" and method ~= "HEAD" then return 405, "GET only\n" end
  local path = target:match("^[^?]*")
  local ok, status, body
  if path == "/metrics" then
    return 200, workerpool.metrics(), "text/plain; version=0.0.4"
  elseif path == "/" then
    ok, status, body = pcall(pool.submit_wait, pool, "hello")
  elseif path == "/work" then
    ok, status, body = pcall(pool.submit_wait, pool, "work",
      query_int(target, "n", 1000, 10000000))
  elseif path == "/sleep" then
    ok, status, body = pcall(pool.submit_wait, pool, "slow",
      query_int(target, "ms", 100, 10000))
  else
    return 404, "not found\n"
  end
  if not ok then
    workerpool.log("error", "http.task_failed", { path = path, error = status })
    return 500, "task failed\n"
  end
  if status == nil then return 503, (body or "unavailable") .. "\n" end
  return status, body
end

-- Writes one response; conn_header is "close", "keep-alive" or nil. True
-- once the write is done.
local function respond(conn, status, body, ctype, conn_header, head_only)
  stats.requests[status] = (stats.requests[status] or 0) + 1
  local msg = table.concat{
    "HTTP/1.1 ", status, " ", reasons[status] or "Unknown", "\r\n",
    "Content-Type: ", ctype or "text/plain", "\r\n",
    "Content-Length: ", #body, "\r\n",
    conn_header and "Connection: " .. conn_header .. "\r\n" or "", "\r\n",
    head_only and "" or body }
  -- nil once written; an error at once (EPIPE, ECONNRESET) or later.
  return workerpool.await(conn.write, conn, msg) == nil
end

-- One connection's coroutine: requests in order, until either side closes.
local function serve(conn)
  local read, stop = reader(conn)
  local buf = ""
  while true do
    local e = buf:find("\r\n\r\n", 1, true)
    while not e and not draining do
      if #buf > MAX_HEAD then break end
      idle[conn] = stop
      local data = read()
      idle[conn] = nil
      if not data then break end
      buf = buf .. data
      e = buf:find("\r\n\r\n", 1, true)
    end
    if not e then
      if #buf > MAX_HEAD then respond(conn, 431, "headers too large\n", nil, "close") end
      break
    end
    local method, target, version, headers = parse_head(buf:sub(1, e + 1))
    buf = buf:sub(e + 4)
    if not method then
      respond(conn, 400, "bad request\n", nil, "close")
      break
    end
    if headers["transfer-encoding"] then
      respond(conn, 501, "chunked bodies are not supported\n", nil, "close")
      break
    end
    local len = math.tointeger(tonumber(headers["content-length"] or 0))
    if not len or len < 0 or len > MAX_BODY then
      respond(conn, 413, "body too large\n", nil, "close")
      break
    end
    while #buf < len do -- bodies are read and ignored
      local data = read()
      if not data then break end
      buf = buf .. data
    end
    if #buf < len then break end
    buf = buf:sub(len + 1)
    local connection = (headers["connection"] or ""):lower()
    local keep = version >= 11 and connection ~= "close"
      or version == 10 and connection == "keep-alive"
    local status, body, ctype = route(method, target)
    keep = keep and not draining
    local header = not keep and "close" or version == 10 and "keep-alive" or nil
    if not respond(conn, status, body, ctype, header, method == "HEAD")
      or not keep then
      break
    end
  end
  stop("EOF")
  stats.open = stats.open - 1
  conn:close()
end

local server = uv.new_tcp()
assert(server:bind("127.0.0.1", port))
assert(server:listen(511, function(err)
  if err then
    workerpool.log("error", "http.accept_failed", { error = err })
    return
  end
  local conn = uv.new_tcp()
  if server:accept(conn) then
    stats.open = stats.open + 1
    stats.accepted = stats.accepted + 1
    conn:nodelay(true)
    workerpool.spawn(serve, conn)
  else
    conn:close()
  end
end))

-- The drain: stop accepting, and close the connections that wait for a
-- request; those with a request in flight close after their answer.
workerpool.on_shutdown(function()
  draining = true
  server:close(function()
    workerpool.log("info", "http.listener_closed", { port = port })
  end)
  local n = 0
  for conn, stop in pairs(idle) do
    idle[conn] = nil
    stop("draining") -- its coroutine closes it
    n = n + 1
  end
  workerpool.log("info", "http.draining", { idle_closed = n })
end)

port = server:getsockname().port
workerpool.log("info", "http.listening", { addr = "127.0.0.1", port = port,
  workers = workers })
