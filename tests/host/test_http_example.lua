-- test_http_example.lua: scripts/examples/http_server.lua under `wpool run`
-- (issue 14). A luv client makes keep-alive and pipelined requests, checks
-- the answers the pool computed and the server's own /metrics, then sends
-- SIGTERM to that wpool process itself while a request is in flight: the
-- drain must close the listener (through the example's on_shutdown
-- handler) and the idle connections, still answer the request in flight,
-- and end with exit status 0.

local T = require "harness"
local wp = require "workerpool"
local uv = require "luv"


local src = assert(os.getenv("WPOOL_SOURCE_DIR"), "WPOOL_SOURCE_DIR unset")
local example = src .. "/scripts/examples/http_server.lua"

-- A buffered reader over a luv stream, for this (host) coroutine.
local function reader(stream)
  local R, chunks, wake, buf = {}, {}, nil, ""
  stream:read_start(function(err, data)
    chunks[#chunks + 1] = { err = err or (data == nil and "EOF"), data = data }
    if wake then
      local cb = wake
      wake = nil
      cb()
    end
  end)
  local function more()
    if #chunks == 0 then wp.await(function(cb) wake = cb end) end
    local c = table.remove(chunks, 1)
    if c.err then return nil, c.err end
    buf = buf .. c.data
    return true
  end
  function R.line() -- the next line, or nil, err
    while not buf:find("\n", 1, true) do
      local ok, err = more()
      if not ok then return nil, err end
    end
    local line
    line, buf = buf:match("^([^\n]*)\n(.*)$")
    return line
  end
  function R.response() -- status, headers, body; or nil, err
    local e = buf:find("\r\n\r\n", 1, true)
    while not e do
      local ok, err = more()
      if not ok then return nil, err end
      e = buf:find("\r\n\r\n", 1, true)
    end
    local head = buf:sub(1, e + 1)
    buf = buf:sub(e + 4)
    local status = tonumber(head:match("^HTTP/1%.1 (%d%d%d) "))
    local headers = {}
    for k, v in head:gmatch("\r\n([^:]+): ([^\r]*)") do headers[k:lower()] = v end
    local len = tonumber(headers["content-length"])
    while #buf < len do
      local ok, err = more()
      if not ok then return nil, err end
    end
    local body = buf:sub(1, len)
    buf = buf:sub(len + 1)
    return status, headers, body
  end
  function R.eof() -- true once the peer closed and nothing is left
    while buf == "" do
      local ok, err = more()
      if not ok then return err == "EOF" end
    end
    return false
  end
  return R
end

local function connect(port)
  local c = uv.new_tcp()
  local err = wp.await(c.connect, c, "127.0.0.1", port)
  if err then
    c:close()
    return nil, err
  end
  return c, reader(c)
end

local function get(c, r, target, extra)
  T.eq(wp.await(c.write, c, "GET " .. target .. " HTTP/1.1\r\nHost: t\r\n"
    .. (extra or "") .. "\r\n"), nil, "write error")
  return r.response()
end

local function fnv(n) -- what the example's `work` handler computes
  local h = 2166136261
  for i = 1, n do h = ((h ~ (i & 0xff)) * 16777619) & 0xffffffff end
  return string.format("n=%d fnv=%08x\n", n, h)
end

-- The value of one series in Prometheus text, or nil.
local function series(text, name)
  for line in text:gmatch("[^\n]+") do
    local k, v = line:match("^(%S+) (%S+)$")
    if k == name then return tonumber(v) end
  end
end

T.test("keep-alive, pipelining, /metrics, then a SIGTERM drain", function()
  local errpipe = uv.new_pipe(false)
  local exited = {}
  local child = assert(uv.spawn(arg[-2], {
    args = { "run", example, "0", "2" },
    stdio = { nil, 1, errpipe },
  }, function(code, signal)
    exited.code, exited.signal = code, signal
    if exited.wake then exited.wake() end
  end))
  local log = reader(errpipe)
  local lines = {}
  local function wait_log(event) -- reads the child's log up to a line
    while true do
      local line = log.line()
      if not line then return nil end
      lines[#lines + 1] = line
      if line:find(event, 1, true) then return line end
    end
  end
  local ok, err = xpcall(function()
    local port = tonumber(assert(wait_log('"http.listening"'), "no listening line")
      :match('"port":(%d+)'))

    -- Keep-alive: several requests on one connection.
    local a, ra = assert(connect(port))
    local st, h, body = get(a, ra, "/")
    T.eq(st, 200)
    T.eq(body, "hello from a worker\n")
    T.eq(h.connection, nil, "HTTP/1.1 keeps the connection")
    st, h, body = get(a, ra, "/work?n=1000")
    T.eq(st, 200)
    T.eq(body, fnv(1000))
    T.eq(h["content-length"], tostring(#body))
    st = get(a, ra, "/nope")
    T.eq(st, 404)

    -- Two requests in one write: two answers, in order.
    T.eq(wp.await(a.write, a, "GET /work?n=7 HTTP/1.1\r\nHost: t\r\n\r\n"
      .. "GET /work?n=9 HTTP/1.1\r\nHost: t\r\n\r\n"), nil)
    st, h, body = ra.response()
    T.eq(st, 200)
    T.eq(body, fnv(7))
    T.eq(h.connection, nil)
    st, h, body = ra.response()
    T.eq(st, 200)
    T.eq(body, fnv(9))
    T.eq(h.connection, nil)

    -- The server's own /metrics: its series and the pool's.
    st, h, body = get(a, ra, "/metrics")
    T.eq(st, 200)
    T.ok(h["content-type"]:find("text/plain", 1, true), h["content-type"])
    T.eq(series(body, "http_connections_accepted_total"), 1, "one connection so far")
    T.eq(series(body, "http_connections_open"), 1)
    T.eq(series(body, 'http_requests_total{code="200"}'), 4)
    T.eq(series(body, 'http_requests_total{code="404"}'), 1)
    T.eq(series(body, 'workerpool_submitted_total{pool="http"}'), 4)

    -- A bad request gets 400 and the connection is closed.
    local b, rb = assert(connect(port))
    T.eq(wp.await(b.write, b, "NONSENSE\r\n\r\n"), nil)
    st, h = rb.response()
    T.eq(st, 400)
    T.eq(h.connection, "close")
    T.ok(rb.eof(), "closed after a bad request")
    b:close()

    -- A client that resets the connection before its answer: the write
    -- of the answer fails at once (no callback), and the server still
    -- closes its side.
    local gone = assert(connect(port))
    T.eq(wp.await(gone.write, gone,
      "GET /sleep?ms=200 HTTP/1.1\r\nHost: t\r\n\r\n"), nil)
    gone:close_reset()
    -- A client that pipelines requests and leaves at once: the answers
    -- after the first meet EPIPE, which must cost only that connection
    -- (with SIGPIPE at its default action it killed the server).
    local left = assert(connect(port))
    T.eq(wp.await(left.write, left,
      "GET /sleep?ms=100 HTTP/1.1\r\nHost: t\r\n\r\n"
      .. string.rep("GET /work?n=1 HTTP/1.1\r\nHost: t\r\n\r\n", 3)), nil)
    left:close()
    T.eventually(function()
      local st2, _, m = get(a, ra, "/metrics")
      T.eq(st2, 200, "the server still answers")
      return series(m, "http_connections_open") == 1
        and series(m, 'workerpool_running_tasks{pool="http"}') == 0
    end, 30, "the server closed the abandoned connections")

    -- A request in flight (a worker sleeps), seen running in /metrics.
    local slow, rslow = assert(connect(port))
    local ms = math.floor(1500 * T.time_scale)
    T.eq(wp.await(slow.write, slow,
      "GET /sleep?ms=" .. ms .. " HTTP/1.1\r\nHost: t\r\n\r\n"), nil)
    T.eventually(function()
      local _, _, m = get(a, ra, "/metrics")
      return series(m, 'workerpool_running_tasks{pool="http"}') == 1
    end, 30, "the slow request runs")

    -- SIGTERM to wpool itself.
    T.eq(child:kill("sigterm"), 0)
    T.ok(wait_log('"http.listener_closed"'), "the drain closed the listener")
    local c, cerr = connect(port)
    T.eq(c, nil, "a connection after the listener closed")
    T.eq(cerr, "ECONNREFUSED")
    T.ok(ra.eof(), "the idle keep-alive connection is closed by the drain")
    st, h, body = rslow.response()
    T.eq(st, 200, "the request in flight is answered")
    T.eq(body, string.format("slept %d ms\n", ms))
    T.eq(h.connection, "close")
    T.ok(rslow.eof(), "and its connection closed")
    a:close()
    slow:close()

    -- The process ends by itself, cleanly.
    local stopped = assert(wait_log('"shutdown.stopped"'), "no shutdown.stopped")
    T.ok(stopped:find('"clean":true', 1, true), stopped)
    if exited.code == nil then wp.await(function(cb) exited.wake = cb end) end
    T.eq(exited.code, 0, "exit status")
    T.eq(exited.signal, 0)
  end, debug.traceback)
  if exited.code == nil then child:kill("sigkill") end
  if not child:is_closing() then child:close() end
  errpipe:close()
  if not ok then
    error(err .. "\nchild log:\n" .. table.concat(lines, "\n"), 0)
  end
  local all = table.concat(lines, "\n")
  T.ok(all:find('"idle_closed":1', 1, true), "one idle connection closed: " .. all)
end)

T.run_host()
