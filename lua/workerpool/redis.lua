-- workerpool.redis: a Redis client that reconnects, over the C connections
-- of bindings/lredis.c (docs/scale-out.md).
--
--   local c = redis.client(url [, {timeout = s, name = "..."}])
--   c:call("XADD", "s", "*", "f", "v")   -> reply | nil, message, "reply"|"io"
--   c:pipeline({{"XACK", ...}, ...})     -> {reply...} | nil, message, "io"
--   c:send(cb, "EVALSHA", ...)           -> (host state) cb(reply | nil, msg, kind)
--   c:retry_in()                         -> seconds until the next connect try
--   c:close()
--
-- In a host state (`wpool run`, `wpool pipeline run`) the connection lives on
-- the host's loop: call and pipeline suspend only the calling host coroutine
-- (workerpool.await), send never waits.  Elsewhere (worker states, plain
-- lua5.4) the connection is blocking and belongs to the state.
--
-- A connection that fails is dropped; the next command after a backoff
-- (0.1 s, doubling, at most 5 s) opens a new one.  The first failure logs
-- `redis.disconnected`, the next success `redis.connected`; meanwhile the
-- process-wide gauge workerpool_redis_connected{url} is 0 and /readyz says
-- 503.  Error replies are not failures of the connection.
local workerpool = require "workerpool"

local M = {}

local parse_url = workerpool["redis.parse_url"]
local LOG = workerpool["pipeline.log"]
local BACKOFF0, BACKOFF_MAX = 0.1, 5.0

-- redis.parse_url(url) -> {host, port, db, password, display} | nil, message
-- (display: the URL without its password, for logs and metric labels).
function M.parse_url(url)
  if type(url) ~= "string" then return nil, "a Redis URL must be a string" end
  local u, err = parse_url(url)
  if not u then return nil, err end
  u.display = string.format("redis://%s:%d/%d", u.host, u.port, u.db)
  return u
end

local Client = {}
Client.__index = Client

local collector_set = false

-- redis.client(url [, opts]) -> client; raises on a bad URL.
-- opts.timeout: seconds for a blocking connect or command (default 10).
function M.client(url, opts)
  opts = opts or {}
  local u, err = M.parse_url(url)
  if not u then error(err, 2) end
  local async = workerpool["redis.has_loop"]()
  local self = setmetatable({ u = u, url = u.display, async = async,
                              timeout = opts.timeout or 10, up = true,
                              delay = BACKOFF0, retry_at = 0 }, Client)
  workerpool["redis.status"](self.url, 1, 0)
  if async and not collector_set then
    collector_set = true
    workerpool.metrics_collector("workerpool.redis", function()
      return workerpool["redis.metrics"]()
    end)
  end
  return self
end

function Client:_down(err)
  if self.c then self.c:close() end
  self.c = nil
  self.retry_at = workerpool.now() + self.delay
  if self.up then
    self.up = false
    workerpool["redis.status"](self.url, 0, 1)
    if LOG then
      LOG("warn", "redis.disconnected", { url = self.url, error = tostring(err),
                                          retry_in_s = self.delay })
    end
  end
  self.delay = math.min(self.delay * 2, BACKOFF_MAX)
end

function Client:_up()
  self.delay = BACKOFF0
  if not self.up then
    self.up = true
    workerpool["redis.status"](self.url, 0, -1)
    if LOG then LOG("info", "redis.connected", { url = self.url }) end
  end
end

-- Seconds until a command may try to connect again (0 when connected).
function Client:retry_in()
  if self.c then return 0 end
  return math.max(0, self.retry_at - workerpool.now())
end

function Client:connected() return self.up and self.c ~= nil end

local function ignore() end

-- The connection, opened when needed; nil, message while backing off.
function Client:_conn()
  if self.closed then return nil, "closed" end
  if self.c then return self.c end
  if workerpool.now() < self.retry_at then
    return nil, string.format("disconnected (next try in %.1fs)", self:retry_in())
  end
  local u = self.u
  local c, err
  if self.async then
    c, err = workerpool["redis.connect_async"](u.host, u.port)
  else
    c, err = workerpool["redis.connect"](u.host, u.port, self.timeout)
  end
  if not c then
    self:_down(err)
    return nil, err
  end
  self.c = c
  local setup = {}
  if u.password then setup[#setup + 1] = { "AUTH", u.password } end
  if u.db ~= 0 then setup[#setup + 1] = { "SELECT", u.db } end
  for _, cmd in ipairs(setup) do
    if self.async then
      c:send(ignore, table.unpack(cmd)) -- later commands fail if this did
    else
      local r, e, kind = c:call(table.unpack(cmd))
      if r == nil then
        self:_down(e)
        return nil, e, kind
      end
    end
  end
  return c
end

-- Error replies of a server that cannot serve yet (loading its data after
-- a restart...) count as a failure of the connection: retried later.
local TRANSIENT = { "^LOADING", "^BUSY ", "^TRYAGAIN", "^MASTERDOWN" }
local function transient(msg)
  if type(msg) ~= "string" then return false end
  for _, pat in ipairs(TRANSIENT) do if msg:find(pat) then return true end end
  return false
end

local function outcome(self, r, e, kind)
  if r == nil and kind == "reply" and transient(e) then kind = "io" end
  if type(r) == "table" and r.error == nil then -- a pipeline's replies
    for _, x in ipairs(r) do
      if type(x) == "table" and transient(x.error) then
        r, e, kind = nil, x.error, "io"
        break
      end
    end
  end
  if r == nil and kind == "io" then self:_down(e) elseif self.c then self:_up() end
  return r, e, kind
end

-- c:call(cmd, args...) -> reply | nil, message, "reply" | nil, message, "io"
function Client:call(...)
  local c, err = self:_conn()
  if not c then return nil, err, "io" end
  if not self.async then return outcome(self, c:call(...)) end
  local args = table.pack(...)
  return outcome(self, workerpool.await(function(cb)
    local ok, e = c:send(cb, table.unpack(args, 1, args.n))
    if not ok then cb(nil, e, "io") end
  end))
end

-- c:pipeline({cmd...}) -> {reply...} (error replies as {error = msg})
-- | nil, message, "io"
function Client:pipeline(cmds)
  if #cmds == 0 then return {} end
  local c, err = self:_conn()
  if not c then return nil, err, "io" end
  if not self.async then return outcome(self, c:pipeline(cmds)) end
  return outcome(self, workerpool.await(function(cb)
    local n, res, failed = #cmds, {}, nil
    local left = n
    local function one(i)
      return function(r, e, kind)
        if r == nil then
          if kind == "io" then failed = failed or e else r = { error = e } end
        end
        res[i] = r
        left = left - 1
        if left == 0 then
          if failed then cb(nil, failed, "io") else cb(res) end
        end
      end
    end
    for i, cmd in ipairs(cmds) do
      local ok, e = c:send(one(i), table.unpack(cmd))
      if not ok then
        failed = failed or e
        left = left - (n - i + 1)
        if left == 0 then cb(nil, failed, "io") end
        break
      end
    end
  end))
end

-- c:send(cb, cmd, args...) -> true | nil, message: host state only; cb
-- runs from the loop with the reply or nil, message, kind.
function Client:send(cb, ...)
  local c, err = self:_conn()
  if not c then return nil, err end
  local ok, e = c:send(function(r, e2, kind)
    outcome(self, r, e2, kind)
    cb(r, e2, kind)
  end, ...)
  if not ok then self:_down(e) return nil, e end
  return true
end

-- A client dropped without close (a worker state that closes) leaves the
-- registry as close would.
function Client:__gc() self:close() end

function Client:close()
  if self.closed then return end
  self.closed = true
  if self.c then self.c:close() end
  self.c = nil
  workerpool["redis.status"](self.url, -1, self.up and 0 or -1)
end

return M
