-- workerpool.tenant: per-tenant admission policies for pool:use().
--
--   local tenant = require "workerpool.tenant"
--   pool:use(tenant.bucket{rate = 50, burst = 10})    -- tokens per tenant
--   pool:use(tenant.concurrency{limit = 4})           -- in flight per tenant
--   pool:submit({fn = work, tenant = "acme"}, ...)    -- nil, "rate_limited"
--
-- Both keep their counters in a workerpool.shared dictionary, so every state
-- that builds the same policy (same `dict`) shares them: the host, its
-- coroutines, and tasks of other pools that submit here. Updates are atomic
-- (cas for the bucket, cas and incr for the concurrency cap): two states
-- never both take the last token or the last slot. Tasks without a tenant
-- share the key "-". See docs/policies.md.
local util = require "workerpool.util"

local tenant = {}

local NO_TENANT = "-"

local function key_of(t)
  if t == nil then return NO_TENANT end
  return t
end

-- ---- token bucket -----------------------------------------------------

-- Per tenant, the dictionary holds string.pack("<dd", tokens, last): the
-- tokens left at time `last` (seconds of the policy's clock).

local Bucket = {}
Bucket.__index = Bucket

local PACK = "<dd"
local RATE = { above = 0, inf = true, required = true }
local BURST = { above = 0, required = true }

-- A {rate =, burst =} table (`field` in messages); base fills what it
-- leaves out.
local function bucket_conf(ck, field, c, base)
  ck:options(c, { rate = true, burst = true }, field)
  local rate = c.rate == nil and base and base.rate or c.rate
  local burst = c.burst == nil and base and base.burst or c.burst
  return { rate = ck:number(field .. ".rate", rate, RATE),
           burst = ck:number(field .. ".burst", burst, BURST) }
end

-- The overrides option: {[tenant] = conf(field, v)} for every entry.
local function overrides_of(ck, v, conf)
  local out = {}
  if v == nil then return out end
  if type(v) ~= "table" then ck:fail("overrides must be a table") end
  for name, c in pairs(v) do
    if type(name) ~= "string" then ck:fail("overrides keys must be tenant names") end
    out[name] = conf("overrides." .. name, c)
  end
  return out
end

-- The policy object of constructor `fn`: fields, with the dictionary
-- (option dict, default "workerpool.tenant.<fn>") and the spec added.
local function policy(ck, fn, opts, fields, mt)
  local name = opts.dict or "workerpool.tenant." .. fn
  fields.dict, fields.dict_name = ck:dict(name, opts.capacity), name
  fields.spec = util.spec("workerpool.tenant", fn, opts)
  return setmetatable(fields, mt)
end

local LOCAL_KEYS = { rate = true, burst = true, dict = true, capacity = true,
  cost = true, overrides = true, default = true, clock = true }
-- With redis = URL the bucket lives in Redis: no dictionary, no default.
local REDIS_KEYS = { rate = true, burst = true, cost = true, overrides = true,
  clock = true, redis = true, key_prefix = true, on_unavailable = true }

-- tenant.bucket{rate = r, burst = b [, dict =] [, capacity =] [, cost =]
--               [, overrides = {name = {rate =, burst =}}]
--               [, default = {rate =, burst =}] [, clock =]}
-- or, shared by every process, {rate =, burst =, redis = URL
--   [, key_prefix =] [, on_unavailable =] [, cost =] [, overrides =]}
function tenant.bucket(opts)
  local ck = util.checker(tenant.bucket, "tenant.bucket: %s")
  local shared = type(opts) == "table" and opts.redis ~= nil
  ck:options(opts, shared and REDIS_KEYS or LOCAL_KEYS)
  local default
  if opts.default ~= nil then
    if opts.rate ~= nil or opts.burst ~= nil then
      ck:fail("give either rate and burst or default, not both")
    end
    default = bucket_conf(ck, "default", opts.default)
  else
    default = { rate = ck:number("rate", opts.rate, RATE),
                burst = ck:number("burst", opts.burst, BURST) }
  end
  local cost = opts.cost
  if cost == nil then
    cost = 1
  elseif type(cost) ~= "function" and (type(cost) ~= "number" or cost ~= cost
      or cost < 0 or cost == math.huge) then
    ck:fail("cost must be a non-negative number or a function(task)")
  end
  local overrides = overrides_of(ck, opts.overrides, function(field, c)
    return bucket_conf(ck, field, c, default)
  end)
  local fields = { default = default, overrides = overrides, cost = cost }
  if shared then -- lua/workerpool/redis_bucket.lua
    fields.spec = util.spec("workerpool.tenant", "bucket", opts)
    return require("workerpool.redis_bucket").new(ck, opts, fields, Bucket)
  end
  fields.now = ck:clock(opts.clock)
  return policy(ck, "bucket", opts, fields, Bucket)
end

function Bucket:config(name)
  return self.overrides[key_of(name)] or self.default
end

-- Tokens of the record `raw` brought forward to `now`, and the time the
-- record is then at. Time never moves the record backwards: a reading
-- older than the record refills nothing.
local function refill(raw, conf, now)
  if raw == nil then return conf.burst + 0.0, now end
  local tokens, last = string.unpack(PACK, raw)
  if now > last then
    tokens = tokens + (now - last) * conf.rate
    last = now
  end
  if tokens > conf.burst then tokens = conf.burst + 0.0 end
  return tokens, last
end

function Bucket:cost_of(task)
  local c = self.cost
  if type(c) == "function" then
    c = c(task)
    if type(c) ~= "number" or c ~= c or c < 0 or c == math.huge then
      error(string.format("tenant.bucket: cost function returned %s "
        .. "(a non-negative number expected)", tostring(c)), 3)
    end
  end
  return c
end

-- policy:admit(task) -> true | nil, "rate_limited"
function Bucket:admit(task)
  local conf = self:config(task.tenant)
  local cost = self:cost_of(task)
  if conf.rate == math.huge or cost == 0 then
    return true
  end
  if cost > conf.burst then return nil, "rate_limited" end
  local key = "t:" .. key_of(task.tenant)
  local dict = self.dict
  while true do
    -- The record first, then the clock: a successful cas then proves the
    -- clock was read after the record's own reading (see docs/policies.md).
    local raw = dict:get(key)
    local tokens, last = refill(raw, conf, self.now())
    if tokens < cost then return nil, "rate_limited" end
    local ok, err = dict:cas(key, raw, string.pack(PACK, tokens - cost, last))
    if ok then
      task[self] = cost
      return true
    elseif ok == nil then
      return nil, "rate_limited: " .. tostring(err)
    end
  end
end

-- policy:undo(task): gives the tokens back (never above burst).
function Bucket:undo(task)
  local cost = task[self]
  if not cost then return end
  task[self] = nil
  local conf = self:config(task.tenant)
  local key = "t:" .. key_of(task.tenant)
  local dict = self.dict
  while true do
    local raw = dict:get(key)
    local tokens, last = refill(raw, conf, self.now())
    tokens = math.min(conf.burst, tokens + cost)
    if dict:cas(key, raw, string.pack(PACK, tokens, last)) ~= false then return end
  end
end

-- bucket:remaining(tenant) -> tokens available now (a float)
function Bucket:remaining(name)
  local conf = self:config(name)
  if conf.rate == math.huge then return math.huge end
  return (refill(self.dict:get("t:" .. key_of(name)), conf, self.now()))
end

-- ---- concurrency cap --------------------------------------------------

-- Per tenant, the dictionary holds the integer count of tasks admitted and
-- not yet ended (queued or running).

local Conc = {}
Conc.__index = Conc

local LIMIT = { min = 1, required = true }

-- tenant.concurrency{limit = n [, dict =] [, capacity =]
--                    [, overrides = {name = n or {limit = n}}]}
function tenant.concurrency(opts)
  local ck = util.checker(tenant.concurrency, "tenant.concurrency: %s")
  ck:options(opts, { limit = true, dict = true, capacity = true, overrides = true })
  local limit = ck:integer("limit", opts.limit, LIMIT)
  local overrides = overrides_of(ck, opts.overrides, function(field, v)
    if type(v) == "table" then v = ck:options(v, { limit = true }, field).limit end
    return ck:integer(field, v, LIMIT)
  end)
  return policy(ck, "concurrency", opts, { limit = limit, overrides = overrides }, Conc)
end

function Conc:limit_of(name)
  return self.overrides[key_of(name)] or self.limit
end

-- policy:admit(task) -> true | nil, "concurrency_limited"
function Conc:admit(task)
  local key = "c:" .. key_of(task.tenant)
  local limit = self:limit_of(task.tenant)
  local dict = self.dict
  while true do
    local n = dict:get(key)
    if (n or 0) >= limit then return nil, "concurrency_limited" end
    -- cas instead of incr-then-check: a race for the last slot never
    -- refuses a submitter spuriously, and never lets both in.
    local ok, err = dict:cas(key, n, (n or 0) + 1)
    if ok then
      task[self] = true
      return true
    elseif ok == nil then
      return nil, "concurrency_limited: " .. tostring(err)
    end
  end
end

local function release(self, task)
  if not task[self] then return end
  task[self] = nil
  self.dict:incr("c:" .. key_of(task.tenant), -1, 0)
end

-- policy:undo(task): the task was not queued after all.
Conc.undo = release

-- policy:done(task, outcome, duration): any outcome frees the slot.
function Conc:done(task)
  release(self, task)
end

-- cap:remaining(tenant) -> slots free now (an integer >= 0)
function Conc:remaining(name)
  local n = self.dict:get("c:" .. key_of(name)) or 0
  return math.max(0, self:limit_of(name) - n)
end

-- cap:in_flight(tenant) -> tasks admitted and not ended
function Conc:in_flight(name)
  return self.dict:get("c:" .. key_of(name)) or 0
end

return tenant
