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
local workerpool = require "workerpool"
local clock = require "workerpool.clock"

local tenant = {}

local NO_TENANT = "-"

local function key_of(t)
  if t == nil then return NO_TENANT end
  return t
end

-- ---- argument checks --------------------------------------------------

local function fail(what, msg, level)
  error(string.format("%s: %s", what, msg), (level or 1) + 1)
end

local function positive(what, name, v, allow_inf)
  if type(v) ~= "number" or v ~= v or v <= 0 or (not allow_inf and v == math.huge) then
    fail(what, string.format("%s must be a positive%s number (got %s)", name,
      allow_inf and "" or " finite", tostring(v)), 3)
  end
  return v
end

local function check_keys(what, opts, known)
  for k in pairs(opts) do
    if not known[k] then fail(what, string.format("unknown option '%s'", tostring(k)), 3) end
  end
end

local function check_clock(what, c)
  return clock.resolve(c)
    or fail(what, "clock must be a function or a table with a now() function", 3)
end

-- The spec pool:use records so that every submitting state can rebuild
-- the policy (docs/policies.md), or nil when the clock is local to this
-- state.
local function spec_of(fn, opts)
  local c = clock.portable(opts.clock)
  if c == false then return nil end
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.clock = c
  return { module = "workerpool.tenant", fn = fn, opts = o }
end

local function open_dict(what, name, capacity)
  if type(name) ~= "string" or name == "" then
    fail(what, "dict must be a non-empty string", 3)
  end
  if capacity ~= nil and (math.type(capacity) ~= "integer" or capacity <= 0) then
    fail(what, "capacity must be a positive integer (bytes)", 3)
  end
  local d, err = workerpool.shared(name, capacity and { capacity = capacity } or nil)
  if not d then fail(what, string.format("cannot open dict '%s': %s", name, err), 3) end
  return d
end

-- ---- token bucket -----------------------------------------------------

-- Per tenant, the dictionary holds string.pack("<dd", tokens, last): the
-- tokens left at time `last` (seconds of the policy's clock).

local Bucket = {}
Bucket.__index = Bucket

local PACK = "<dd"

local function bucket_conf(what, name, c, base)
  if type(c) ~= "table" then fail(what, name .. " must be a table {rate=, burst=}", 4) end
  for k in pairs(c) do
    if k ~= "rate" and k ~= "burst" then
      fail(what, string.format("%s: unknown field '%s'", name, tostring(k)), 4)
    end
  end
  local rate = c.rate == nil and base and base.rate or c.rate
  local burst = c.burst == nil and base and base.burst or c.burst
  positive(what, name .. ".rate", rate, true)
  positive(what, name .. ".burst", burst, false)
  return { rate = rate, burst = burst }
end

-- tenant.bucket{rate = r, burst = b [, dict =] [, capacity =] [, cost =]
--               [, overrides = {name = {rate =, burst =}}]
--               [, default = {rate =, burst =}] [, clock =]}
function tenant.bucket(opts)
  local what = "tenant.bucket"
  if type(opts) ~= "table" then fail(what, "options must be a table", 2) end
  if opts.redis ~= nil then -- shared by every process: lua/workerpool/redis_bucket.lua
    return require("workerpool.redis_bucket").new(opts, spec_of("bucket", opts))
  end
  check_keys(what, opts, { rate = true, burst = true, dict = true, capacity = true,
    cost = true, overrides = true, default = true, clock = true })
  local default
  if opts.default ~= nil then
    if opts.rate ~= nil or opts.burst ~= nil then
      fail(what, "give either rate and burst or default, not both", 2)
    end
    default = bucket_conf(what, "default", opts.default)
  else
    default = { rate = positive(what, "rate", opts.rate, true),
                burst = positive(what, "burst", opts.burst, false) }
  end
  local overrides = {}
  if opts.overrides ~= nil then
    if type(opts.overrides) ~= "table" then fail(what, "overrides must be a table", 2) end
    for name, c in pairs(opts.overrides) do
      if type(name) ~= "string" then fail(what, "overrides keys must be tenant names", 2) end
      overrides[name] = bucket_conf(what, "overrides." .. name, c, default)
    end
  end
  local cost = opts.cost
  if cost == nil then
    cost = 1
  elseif type(cost) == "number" then
    if cost ~= cost or cost < 0 or cost == math.huge then
      fail(what, "cost must be a non-negative number or a function(task)", 2)
    end
  elseif type(cost) ~= "function" then
    fail(what, "cost must be a non-negative number or a function(task)", 2)
  end
  local dictname = opts.dict or "workerpool.tenant.bucket"
  return setmetatable({
    dict = open_dict(what, dictname, opts.capacity),
    dict_name = dictname,
    default = default,
    overrides = overrides,
    cost = cost,
    now = check_clock(what, opts.clock),
    spec = spec_of("bucket", opts),
  }, Bucket)
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

local function check_limit(what, name, v)
  local n = type(v) == "number" and math.tointeger(v)
  if not n or n < 1 then
    fail(what, string.format("%s must be a positive integer (got %s)", name, tostring(v)), 4)
  end
  return n
end

-- tenant.concurrency{limit = n [, dict =] [, capacity =]
--                    [, overrides = {name = n or {limit = n}}]}
function tenant.concurrency(opts)
  local what = "tenant.concurrency"
  if type(opts) ~= "table" then fail(what, "options must be a table", 2) end
  check_keys(what, opts, { limit = true, dict = true, capacity = true, overrides = true })
  local limit = check_limit(what, "limit", opts.limit)
  local overrides = {}
  if opts.overrides ~= nil then
    if type(opts.overrides) ~= "table" then fail(what, "overrides must be a table", 2) end
    for name, v in pairs(opts.overrides) do
      if type(name) ~= "string" then fail(what, "overrides keys must be tenant names", 2) end
      if type(v) == "table" then
        for k in pairs(v) do
          if k ~= "limit" then
            fail(what, string.format("overrides.%s: unknown field '%s'", name, tostring(k)), 2)
          end
        end
        v = v.limit
      end
      overrides[name] = check_limit(what, "overrides." .. name, v)
    end
  end
  local dictname = opts.dict or "workerpool.tenant.concurrency"
  return setmetatable({
    dict = open_dict(what, dictname, opts.capacity),
    dict_name = dictname,
    limit = limit,
    overrides = overrides,
    spec = spec_of("concurrency", opts),
  }, Conc)
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
