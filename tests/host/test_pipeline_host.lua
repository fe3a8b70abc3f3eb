-- test_pipeline_host.lua: workerpool.pipeline.run under `wpool run`
-- suspends only the calling coroutine: a ticker keeps firing while a
-- pipeline with a slow stage runs in one coroutine and another coroutine
-- does its own work; the report comes back to the caller as usual.

local T = require "harness"
local wp = require "workerpool"

local base = os.tmpname()
local function F(name) return base .. "_" .. name end
local function write(name, text)
  local f = assert(io.open(F(name), "wb"))
  f:write(text)
  f:close()
  return F(name)
end

T.test("run suspends only its coroutine", function()
  local nums = {}
  for i = 1, 400 do nums[i] = tostring(i) end
  write("in.txt", table.concat(nums, "\n") .. "\n")
  write("m.lua", [[
    local M = {}
    function M.slow(x) require("workerpool").sleep(0.001) return x end
    return M]])
  local ticks, gap, last = 0, 0, wp.now()
  local ticker = wp.every(0.01, function()
    local t = wp.now()
    gap = math.max(gap, t - last)
    last = t
    ticks = ticks + 1
  end)
  local other = wp.spawn(function()
    local pool = wp.new{ max_workers = 1 }
    local sum = 0
    for i = 1, 20 do sum = sum + pool:submit_wait(function(x) return x end, i) end
    pool:stop_wait()
    return sum
  end)
  local t0 = wp.now()
  local rep = assert(wp.pipeline.run({
    name = "hosted",
    source = { type = "lines", path = F"in.txt" },
    stages = { { name = "slow", module = F"m.lua", handler = "slow", workers = 2,
                 batch = 4, queue = 16 } },
    sink = { type = "lines", path = F"out.txt" } }, { progress = false }))
  local took = wp.now() - t0
  ticker:cancel()
  T.eq(rep.status, "done")
  T.eq(rep.written, 400)
  T.eq(select(2, other:join()), 210)
  T.ok(took > 0.1, "the pipeline took a while: " .. took)
  T.ok(ticks >= took / 0.01 / 4, string.format("%d ticks in %.2f s", ticks, took))
  T.ok(gap < 0.5 * T.time_scale, "largest gap between ticks: " .. gap)
  for _, n in ipairs{ "in.txt", "m.lua", "out.txt" } do os.remove(F(n)) end
  os.remove(base)
end)

T.run_host()
