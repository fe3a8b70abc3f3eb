-- workerpool.redis_bucket: tenant.bucket{rate =, burst =, redis = URL, ...},
-- a token bucket per tenant kept in Redis and shared by every process that
-- builds it with the same URL and key_prefix (docs/scale-out.md).
--
-- Admission is one Lua script run by Redis (EVALSHA; SCRIPT LOAD once per
-- connection and again after NOSCRIPT): it refills the tenant's hash
-- {tokens, ts} from Redis' own clock (TIME) and takes the cost, atomically,
-- so any number of processes together admit at most burst + rate x t over
-- an interval t.
--
-- admit() is synchronous (pool:submit calls it).  In a worker state or
-- plain lua5.4 it runs the script on the state's own blocking connection.
-- On the host's loop it must not block: a tenant without a token in hand is
-- refused ("rate_limited") while a request for one goes out asynchronously;
-- its reply leaves a grant that the next admit of that tenant takes
-- (pipelines offer a refused item again every 10 ms).  Grants unused for a
-- second are dropped, so a grant never stretches the bound.
--
-- When Redis cannot be reached, on_unavailable decides: "reject" (the
-- default: refused with "rate_limited") or "allow"; each such decision
-- counts in workerpool_redis_bucket_unavailable_total{url, decision}.
local workerpool = require "workerpool"
local redis = require "workerpool.redis"

local M = {}

local SCRIPT = [[
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(v[1]), tonumber(v[2])
if tokens == nil or ts == nil then tokens, ts = burst, now end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
  ts = now
end
local ok = 0
if cost < 0 then
  tokens, ok = math.min(burst, tokens - cost), 1
elseif tokens >= cost then
  tokens, ok = tokens - cost, 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'ts', string.format('%.17g', ts))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 60000)
return ok
]]

local GRANT_TTL = 1.0  -- seconds a grant may wait for its admit
local MAX_ASKING = 64  -- requests in flight per tenant (host loop)

local Bucket = {}
Bucket.__index = Bucket

-- redis_bucket.new(ck, opts, fields, base) -> bucket; raises through the
-- checker ck on bad options.  tenant.bucket has checked rate, burst,
-- overrides and cost into fields (spec included: what pool:use records so
-- other states rebuild the same bucket); base is the local bucket's method
-- table, whose config and cost_of this bucket shares.
function M.new(ck, opts, fields, base)
  Bucket.config, Bucket.cost_of = base.config, base.cost_of
  local u, err = redis.parse_url(opts.redis)
  if not u then ck:fail("redis: %s", err) end
  local prefix = opts.key_prefix == nil and "wpool:bucket:" or opts.key_prefix
  if type(prefix) ~= "string" then ck:fail("key_prefix must be a string") end
  local unavail = opts.on_unavailable == nil and "reject" or opts.on_unavailable
  if unavail ~= "reject" and unavail ~= "allow" then
    ck:fail('on_unavailable must be "reject" or "allow" (got %s)', tostring(unavail))
  end
  fields.url, fields.rawurl, fields.prefix = u.display, opts.redis, prefix
  fields.on_unavailable = unavail
  fields.async = workerpool["redis.has_loop"]()
  fields.grants, fields.asking = {}, {}
  return setmetatable(fields, Bucket)
end

function Bucket:_client()
  if not self.client then
    -- blocking connections wait at most a second: a worker is held meanwhile
    self.client = redis.client(self.rawurl, { timeout = 1 })
  end
  return self.client
end

function Bucket:_unavailable()
  workerpool["redis.count"](self.url, self.on_unavailable)
  if self.on_unavailable == "allow" then return true end
  return nil, "rate_limited"
end

-- Runs the script on the blocking connection: 1, 0 or nil, message, kind.
function Bucket:_eval_sync(key, conf, cost)
  local c = self:_client()
  for _ = 1, 2 do
    if not self.sha then
      local r, e, kind = c:call("SCRIPT", "LOAD", SCRIPT)
      if type(r) ~= "string" then return nil, e, kind end
      self.sha = r
    end
    local r, e, kind = c:call("EVALSHA", self.sha, 1, key, conf.rate, conf.burst, cost)
    if r == nil and kind == "reply" and tostring(e):find("NOSCRIPT", 1, true) then
      self.sha = nil
    else
      return r, e, kind
    end
  end
  return nil, "NOSCRIPT twice", "reply"
end

-- The same from the host loop: cb(1 | 0 | nil, message, kind) later.
function Bucket:_eval_async(key, conf, cost, cb, again)
  local c = self:_client()
  if not self.sha then
    local ok, e = c:send(function(r, e2, kind)
      if type(r) ~= "string" then return cb(nil, e2, kind) end
      self.sha = r
      self:_eval_async(key, conf, cost, cb, again)
    end, "SCRIPT", "LOAD", SCRIPT)
    if not ok then cb(nil, e, "io") end
    return
  end
  local ok, e = c:send(function(r, e2, kind)
    if r == nil and kind == "reply" and not again
       and tostring(e2):find("NOSCRIPT", 1, true) then
      self.sha = nil
      return self:_eval_async(key, conf, cost, cb, true)
    end
    cb(r, e2, kind)
  end, "EVALSHA", self.sha, 1, key, conf.rate, conf.burst, cost)
  if not ok then cb(nil, e, "io") end
end

-- policy:admit(task) -> true | nil, "rate_limited"
function Bucket:admit(task)
  local conf = self:config(task.tenant)
  local cost = self:cost_of(task)
  if conf.rate == math.huge or cost == 0 then return true end
  if cost > conf.burst then return nil, "rate_limited" end
  local key = self.prefix .. (task.tenant or "-")
  if not self.async then
    local r = self:_eval_sync(key, conf, cost)
    if r == nil then return self:_unavailable() end
    if r == 1 then
      task[self] = cost
      return true
    end
    return nil, "rate_limited"
  end
  local now = workerpool.now()
  local g = self.grants[key]
  if g and g.exp < now then
    self.grants[key] = nil
    g = nil
  end
  if g and g.tokens >= cost then
    g.tokens = g.tokens - cost
    task[self] = cost
    return true
  end
  local c = self:_client()
  if not c.up or c:retry_in() > 0 then
    -- Redis is down: decide now, and ask again once the backoff allows.
    if c:retry_in() == 0 and (self.asking[key] or 0) == 0 then self:_ask(key, conf, cost) end
    return self:_unavailable()
  end
  if (self.asking[key] or 0) < MAX_ASKING then self:_ask(key, conf, cost) end
  return nil, "rate_limited"
end

-- Asks Redis for cost tokens of key; a yes becomes a grant.
function Bucket:_ask(key, conf, cost)
  self.asking[key] = (self.asking[key] or 0) + 1
  self:_eval_async(key, conf, cost, function(r)
    self.asking[key] = self.asking[key] - 1
    if r == 1 then
      local g = self.grants[key]
      if not g or g.exp < workerpool.now() then
        g = { tokens = 0 }
        self.grants[key] = g
      end
      g.tokens = g.tokens + cost
      g.exp = workerpool.now() + GRANT_TTL
    end
  end)
end

-- policy:undo(task): gives the tokens back (never above burst).
function Bucket:undo(task)
  local cost = task[self]
  if not cost then return end
  task[self] = nil
  local conf = self:config(task.tenant)
  local key = self.prefix .. (task.tenant or "-")
  if self.async then
    local g = self.grants[key]
    if g and g.exp >= workerpool.now() then
      g.tokens = g.tokens + cost -- kept here for the next admit
    else
      self:_eval_async(key, conf, -cost, function() end)
    end
  else
    self:_eval_sync(key, conf, -cost)
  end
end

function Bucket:close()
  if self.client then self.client:close() end
  self.client = nil
end

return M
