-- test_drop_log.lua: the tasks.dropped log summaries tell the refusal
-- reasons apart and carry the tenant (docs/logging.md).
--
-- The scenario runs in a child lua5.4 whose stderr (the JSON log) is read
-- back; under TSan, which cannot start processes, it runs in this process
-- with the log off and only pool:stats() is checked.

local T = require "harness"

local TSAN = (os.getenv("LD_PRELOAD") or ""):find("tsan", 1, true) ~= nil

-- The scenario: returns the stats of its pools.  SUFFIX keeps the names of
-- its pools and dictionaries apart from other runs.  A huge
-- drop_log_interval leaves one summary per (reason, tenant) at stop; pool
-- "dlq" uses a tiny one, whose lines are added up.
local SCENARIO = [[
local W = require "workerpool"
local tenant = require "workerpool.tenant"
local S, LOG = ...
if LOG then W.set_log_level("info") end
local function noop() end
local function gate(dname)
  local W2 = require "workerpool"
  local d = W2.shared(dname)
  local deadline = W2.now() + 30
  while not d:get("go") do
    if W2.now() > deadline then error("gate never opened") end
    W2.sleep(0.001)
  end
end
local g = W.shared("dl.gate" .. S)
local out = {}

-- Tenant "a" is throttled by the bucket, "b" refused by the cap.
local p = W.new { name = "dl" .. S, max_workers = 4, drop_log_interval = 3600 }
p:use(tenant.bucket { rate = 1e-6, burst = 2, dict = "dl.b" .. S })
p:use(tenant.concurrency { limit = 1, dict = "dl.c" .. S })
for _ = 1, 5 do
  local f = p:submit { fn = noop, tenant = "a" }
  if f then assert(f:wait(30)) end
end
local fb = assert(p:submit({ fn = gate, tenant = "b" }, "dl.gate" .. S))
assert(not p:submit { fn = noop, tenant = "b" })
assert(not p:submit { fn = noop, tenant = "b" })
g:set("go", true)
assert(fb:wait(30))
out.dl = p:stats().dropped
p:stop_wait()

-- Drops of a full queue, untenanted and of tenant "z".
g:delete("go")
local q = W.new { name = "dlq" .. S, max_workers = 1, queue_cap = 1,
                  drop_log_interval = 0.01 }
local fs, drops = {}, 0
while drops < 6 do -- a summary interval or more between the drops
  local f, err = q:submit(gate, "dl.gate" .. S)
  if f then fs[#fs + 1] = f else assert(err == "full", err); drops = drops + 1 end
  if drops == 3 then W.sleep(0.05) end
end
for _ = 1, 2 do -- a tenanted task refused by the full queue
  local f, err = q:submit({ fn = gate, tenant = "z" }, "dl.gate" .. S)
  assert(not f and err == "full", err)
end
g:set("go", true)
for _, f in ipairs(fs) do assert(f:wait(30)) end
out.dlq = q:stats().dropped
q:stop_wait()

-- Past tenant_label_limit tenants are "other".
local o = W.new { name = "dlo" .. S, max_workers = 1, tenant_label_limit = 2,
                  drop_log_interval = 3600 }
o:use(tenant.bucket { rate = 1e-6, burst = 1, dict = "dl.o" .. S })
for _, t in ipairs { "t1", "t2", "t3", "t4" } do
  assert(assert(o:submit { fn = noop, tenant = t }):wait(30))
  assert(not o:submit { fn = noop, tenant = t })
end
out.dlo = o:stats().dropped
o:stop_wait()

-- More tenants than the summary's table holds (WP_DROP_TENANT_ROWS), and
-- more lines than one watchdog pass writes.
local m = W.new { name = "dlm" .. S, max_workers = 1, tenant_label_limit = 1000,
                  drop_log_interval = 3600 }
m:use(tenant.bucket { rate = 1e-6, burst = 1, dict = "dl.m" .. S })
for i = 1, 130 do
  local t = "m" .. i
  assert(assert(m:submit { fn = noop, tenant = t }):wait(30))
  assert(not m:submit { fn = noop, tenant = t })
end
out.dlm = m:stats().dropped
m:stop_wait()
return out
]]

-- Adds up the tasks.dropped lines of pool into {[reason .. "/" .. tenant] = n}
-- ("-" for no tenant), and counts the lines per key.
local function summaries(log, pool)
  local sum, lines = {}, {}
  for _, e in ipairs(log) do
    if e.event == "tasks.dropped" and e.pool == pool then
      T.eq(e.level, "warn")
      T.ok(e.msg:find("reason=" .. e.reason, 1, true), e.msg)
      local k = e.reason .. "/" .. (e.tenant or "-")
      sum[k] = (sum[k] or 0) + e.dropped
      lines[k] = (lines[k] or 0) + 1
    end
  end
  return sum, lines
end

local function same(got, want, what)
  for k, v in pairs(want) do T.eq(got[k], v, what .. " " .. k) end
  for k, v in pairs(got) do T.eq(want[k], v, what .. " extra " .. k) end
end

T.test("tasks.dropped: per reason and tenant; untenanted; other", function()
  local S = tostring(os.time()) .. tostring(math.random(1e9))
  local stats
  if TSAN then
    stats = assert(load(SCENARIO, "=scenario"))(S, false)
  else
    local errf = os.tmpname()
    local ok, out = T.child("local S = " .. string.format("%q", S) ..
      "\nlocal f = assert(load(" .. string.format("%q", SCENARIO) ..
      "))\nlocal st = f(S, true)\n" ..
      "for pool, d in pairs(st) do for k, v in pairs(d) do " ..
      "io.write(pool, ' ', k, ' ', v, '\\n') end end", errf)
    T.ok(ok, "child ran: " .. out)
    stats = {}
    for pool, k, v in out:gmatch("(%S+) (%S+) (%d+)") do
      stats[pool] = stats[pool] or {}
      stats[pool][k] = tonumber(v)
    end
    local log = T.read_log(errf)
    os.remove(errf)
    local sum, lines = summaries(log, "dl" .. S)
    same(sum, { ["rate_limited/a"] = 3, ["concurrency/b"] = 2 }, "dl")
    for k, n in pairs(lines) do T.eq(n, 1, "one line for " .. k) end
    sum = summaries(log, "dlq" .. S)
    T.eq(sum["full/-"], stats.dlq.full - 2, "full drops, untenanted")
    T.eq(sum["full/z"], 2, "full drops of tenant z")
    for k in pairs(sum) do
      T.ok(k == "full/-" or k == "full/z", "only full drops: " .. k)
    end
    sum, lines = summaries(log, "dlo" .. S)
    same(sum, { ["rate_limited/t1"] = 1, ["rate_limited/t2"] = 1,
                ["rate_limited/other"] = 2 }, "dlo")
    for k, n in pairs(lines) do T.eq(n, 1, "one line for " .. k) end
    sum, lines = summaries(log, "dlm" .. S)
    local total, named = 0, 0
    for k, n in pairs(sum) do
      T.ok(k:match("^rate_limited/"), k)
      T.eq(lines[k], 1, "one line for " .. k)
      total = total + n
      if k ~= "rate_limited/other" then named = named + 1 end
    end
    T.eq(total, 130, "every drop in a summary")
    T.eq(named, 118, "tenants with a line of their own")
    T.eq(sum["rate_limited/other"], 12)
  end
  T.eq(stats.dlm.rate_limited, 130)
  T.eq(stats.dl.rate_limited, 3)
  T.eq(stats.dl.concurrency, 2)
  T.eq(stats.dl.policy, 0)
  T.ok(stats.dlq.full >= 8, "full drops: " .. tostring(stats.dlq.full))
  T.eq(stats.dlo.rate_limited, 4)
end)

T.run()
