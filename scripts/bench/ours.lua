-- ours.lua: the benchmark workloads W1-W6 on wpool's `workerpool` module.
-- Run by driver.lua, one workload per process:
--   LUA_CPATH='build/?.so;;' lua5.4 scripts/bench/ours.lua WORKLOAD [sizes...]
-- WORKLOAD is W1 W1n W1m W2 W3 W3n W4 W4n W5 W6 ("n": a named handler
-- defined by init instead of a Lua function shipped with every task; "m":
-- the W1 items through pool:map).  Prints
-- "metric" and "check" lines (see common.lua); exits 1 on a bad checksum.
local dir = arg[0]:match("^(.*)/[^/]*$") or "."
local C = dofile(dir .. "/common.lua")
local workerpool = require "workerpool"
C.now = workerpool.now

local INIT = [[
local workerpool = require "workerpool"
function inc(x) return x + 1 end
function sum_values(t)
  local s = 0
  for _, v in pairs(t) do s = s + v end
  return s
end
function add_shared(x)
  workerpool.shared("bench.w5"):incr("sum", x, 0)
  return x + 1
end
]]

local function inc(x) return x + 1 end

local function sum_values(t)
  local s = 0
  for _, v in pairs(t) do s = s + v end
  return s
end

local function new_pool(n)
  return workerpool.new{max_workers = n or 2, init = INIT}
end

-- Runs a few tasks untimed so both workers and their states exist.
local function warm(pool, task)
  local fs = {}
  for i = 1, 64 do fs[i] = pool:submit(task, i) end
  for i = 1, 64 do assert(fs[i]:wait()) end
end

local W = {}

-- Waits for futures fs[1..n] and returns the sum of their first results.
local function sum_results(fs, n)
  local sum = 0
  for i = 1, n do
    local ok, v = fs[i]:wait()
    if ok then sum = sum + v end
  end
  return sum
end

-- One throughput round of W1 / W4: submits task(i) for i = 1..n (with
-- make_arg, task(make_arg(i))), then waits for every future and checks the
-- sum of the results.  Returns tasks/s.
local function submit_round(pool, task, n, make_arg, expected)
  local fs = {}
  for i = 1, n do fs[i] = false end
  local t0 = C.now()
  if make_arg then
    for i = 1, n do fs[i] = pool:submit(task, make_arg(i)) end
  else
    for i = 1, n do fs[i] = pool:submit(task, i) end
  end
  local sum = sum_results(fs, n)
  local dt = C.now() - t0
  C.check("sum", sum, expected)
  return n / dt
end

-- W1: N tiny tasks submitted at once, then every result collected, in
-- rounds (see C.rounds): the first on a cold heap, the rest reusing it.
local function w1(task)
  local n = C.args{200000}
  local pool = new_pool()
  warm(pool, task)
  C.rounds("tasks_per_s", function()
    return submit_round(pool, task, n, nil, C.w1_expected(n))
  end)
  pool:stop_wait()
end
W.W1 = function() w1(inc) end
W.W1n = function() w1("inc") end

-- W1m: the same N items through pool:map, which batches them into chunks
-- (a few hundred tasks instead of N).
W.W1m = function()
  local n = C.args{200000}
  local pool = new_pool()
  warm(pool, "inc")
  local list = {}
  for i = 1, n do list[i] = i end
  C.rounds("tasks_per_s", function()
    local t0 = C.now()
    local r = pool:map("inc", list)
    local sum = 0
    for i = 1, n do sum = sum + r[i] end
    local dt = C.now() - t0
    C.check("sum", sum, C.w1_expected(n))
    return n / dt
  end)
  pool:stop_wait()
end

-- W2: TASKS pure-Lua loops of ITERS steps on 2 workers, against the same
-- loops run serially in this state (see C.w2).
W.W2 = function()
  C.w2(function(ntasks, iters)
    local pool = new_pool()
    warm(pool, inc)
    local t0 = C.now()
    local fs = {}
    for s = 1, ntasks do fs[s] = pool:submit(C.lcg, s, iters) end
    local sum = sum_results(fs, ntasks)
    local dt = C.now() - t0
    pool:stop_wait()
    return sum, dt
  end)
end

-- W3: N sequential submit-and-wait round trips.
local function w3(task)
  local n = C.args{20000}
  local pool = new_pool()
  warm(pool, task)
  local sum = 0
  local t0 = C.now()
  for i = 1, n do sum = sum + pool:submit_wait(task, i) end
  local dt = C.now() - t0
  pool:stop_wait()
  C.metric("us_per_rt", dt / n * 1e6)
  C.check("sum", sum, C.w1_expected(n))
end
W.W3 = function() w3(inc) end
W.W3n = function() w3("inc") end

-- W4: N tasks, each given a fresh table of 100 string keys -> integers,
-- returning the sum of its values, in rounds like W1.  Building the tables
-- is timed too (luv builds them and packs them into strings).
local function w4(task)
  local n = C.args{20000}
  local pool = new_pool()
  warm(pool, task == "sum_values" and "inc" or inc)
  C.rounds("tasks_per_s", function()
    return submit_round(pool, task, n, C.w4_table, C.w4_expected(n))
  end)
  pool:stop_wait()
end
W.W4 = function() w4(sum_values) end
W.W4n = function() w4("sum_values") end

-- W5: the submitting side alone, N submits of a named handler with one
-- integer into a paused pool, in rounds: keeping each future, letting each
-- become garbage at once, and with pool:post (no future).  Each round is
-- timed, then the pool resumes and drains before the next.  The first
-- round runs on a cold heap: its figure is mostly the kernel mapping fresh
-- pages (first-touch faults) for the futures.  The rounds after it reuse
-- that memory, as a long-running process does: three rounds of each kind,
-- interleaved, whose medians are the figures the target is judged by.
local W5_HANDLER = {keep = "inc", discard = "add_shared", post = "add_shared"}

local function w5_round(pool, n, kind)
  local handler, fs = W5_HANDLER[kind], {}
  for i = 1, n do fs[i] = false end
  pool:pause()
  collectgarbage()
  collectgarbage()
  local t0 = C.now()
  if kind == "keep" then
    for i = 1, n do fs[i] = pool:submit(handler, i) end
  elseif kind == "discard" then
    for i = 1, n do pool:submit(handler, i) end
  else
    for i = 1, n do pool:post(handler, i) end
  end
  local dt = C.now() - t0
  C.check("queued_" .. kind, pool:waiting(), n)
  pool:resume()
  if kind == "keep" then
    C.check("sum_" .. kind, sum_results(fs, n), C.w1_expected(n))
  else
    local shared = workerpool.shared("bench.w5")
    while pool:waiting() + pool:running() > 0 do workerpool.sleep(0.001) end
    C.check("sum_" .. kind, shared:get("sum"), n * (n + 1) // 2)
    shared:set("sum", 0)
  end
  return dt / n * 1e9
end

W.W5 = function()
  local n = C.args{200000}
  local pool = new_pool()
  warm(pool, "inc")
  C.metric("ns_per_submit_cold", w5_round(pool, n, "keep"))
  local warm_ns = {keep = {}, discard = {}, post = {}}
  for r = 1, 3 do
    for _, kind in ipairs{"keep", "discard", "post"} do
      warm_ns[kind][r] = w5_round(pool, n, kind)
    end
  end
  pool:stop_wait()
  C.metric("ns_per_submit_keep", C.median(warm_ns.keep))
  C.metric("ns_per_submit_discard", C.median(warm_ns.discard))
  C.metric("ns_per_post", C.median(warm_ns.post))
end

-- W6: RUNS times: create a pool of 2 workers, run one task, stop it
-- (median); then resident memory per idle worker over a pool of IDLE
-- workers, before and after each of them ran one task.
W.W6 = function()
  local runs, idle = C.args{300, 50}
  local times, sum = {}, 0
  local answer = function() return 42 end
  for r = 1, runs do
    local t0 = C.now()
    local pool = workerpool.new{max_workers = 2}
    sum = sum + pool:submit_wait(answer)
    pool:stop_wait()
    times[r] = C.now() - t0
  end
  C.check("startup_sum", sum, 42 * runs)
  C.metric("startup_us", C.median(times) * 1e6)

  collectgarbage()
  collectgarbage()
  workerpool.sleep(0.1)
  local rss0 = C.rss_kib()
  local pool = workerpool.new{max_workers = idle, min_workers = idle, idle_timeout = -1}
  -- Workers open their states as they start; wait for every one.
  local t0 = C.now()
  while pool:workers() < idle and C.now() - t0 < 10 do workerpool.sleep(0.01) end
  workerpool.sleep(0.3)
  collectgarbage()
  local rss1 = C.rss_kib()
  -- A barrier task: every worker runs exactly one, all at once.
  local barrier = function(n)
    local wp = require "workerpool"
    local d = wp.shared("bench.w6")
    d:incr("in", 1, 0)
    while d:get("in") < n do wp.sleep(0.001) end
    return 1
  end
  local fs = {}
  for i = 1, idle do fs[i] = pool:submit(barrier, idle) end
  local ran = sum_results(fs, idle)
  fs = nil -- luacheck: ignore 311
  collectgarbage()
  collectgarbage()
  workerpool.sleep(0.3)
  local rss2 = C.rss_kib()
  C.check("barrier", ran, idle)
  C.check("workers", pool:workers(), idle)
  pool:stop_wait()
  C.metric("rss_kib_per_idle_worker", (rss1 - rss0) / idle)
  C.metric("rss_kib_per_used_worker", (rss2 - rss0) / idle)
end

local which = arg[1]
if not W[which] then
  io.stderr:write("usage: ours.lua W1|W1n|W1m|W2|W3|W3n|W4|W4n|W5|W6 [sizes...]\n")
  os.exit(2)
end
W[which]()
C.finish()
