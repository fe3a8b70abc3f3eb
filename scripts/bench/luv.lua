-- luv.lua: the peer side of the benchmark: W1-W4 on luv's thread pool
-- (uv.new_work / work:queue, Debian's lua-luv).  Run by driver.lua, one
-- workload per process, with UV_THREADPOOL_SIZE=2:
--   UV_THREADPOOL_SIZE=2 lua5.4 scripts/bench/luv.lua WORKLOAD [sizes...]
-- WORKLOAD is W1 W2 W3 W4.  luv carries numbers as floats and cannot send
-- tables, so W4 packs each table into a string (string.pack) and the work
-- function unpacks it into a table again, as luv users do.  Prints "metric"
-- and "check" lines (see common.lua); exits 1 on a bad checksum.
local dir = arg[0]:match("^(.*)/[^/]*$") or "."
local C = dofile(dir .. "/common.lua")
local uv = require "luv"
C.now = function() return uv.hrtime() / 1e9 end

local function inc(x) return x + 1 end

-- Runs 64 tasks of work_fn untimed, so the pool's threads and their states
-- exist before the clock starts.
local function warm(work_fn)
  local left = 64
  local work = uv.new_work(work_fn, function() left = left - 1 end)
  for i = 1, 64 do work:queue(i) end
  uv.run()
  assert(left == 0)
end

local W = {}

-- One throughput round of W1 / W4: queues work_fn(i) for i = 1..n (with
-- make_arg, work_fn(make_arg(i))), runs the loop until every
-- after-callback ran, and checks the count and the sum.  Returns tasks/s.
local function queue_round(work_fn, n, make_arg, expected)
  local sum, got = 0, 0
  local work = uv.new_work(work_fn, function(v)
    sum = sum + v
    got = got + 1
  end)
  local t0 = C.now()
  if make_arg then
    for i = 1, n do work:queue(make_arg(i)) end
  else
    for i = 1, n do work:queue(i) end
  end
  uv.run()
  local dt = C.now() - t0
  C.check("count", got, n)
  C.check("sum", sum, expected)
  return n / dt
end

-- W1: N tiny tasks queued at once, every result collected, in rounds
-- (see C.rounds).
W.W1 = function()
  local n = C.args{200000}
  warm(inc)
  C.rounds("tasks_per_s", function() return queue_round(inc, n, nil, C.w1_expected(n)) end)
end

-- W2: the same loops as ours.lua on 2 threads (see C.w2).
W.W2 = function()
  C.w2(function(ntasks, iters)
    warm(inc)
    local sum = 0
    local work = uv.new_work(C.lcg, function(v) sum = sum + v end)
    local t0 = C.now()
    for s = 1, ntasks do work:queue(s, iters) end
    uv.run()
    return sum, C.now() - t0
  end)
end

-- W3: N sequential round trips: each after-callback queues the next task.
W.W3 = function()
  local n = C.args{20000}
  warm(inc)
  local sum, i = 0, 1
  local work
  work = uv.new_work(inc, function(v)
    sum = sum + v
    if i < n then
      i = i + 1
      work:queue(i)
    end
  end)
  local t0 = C.now()
  work:queue(1)
  uv.run()
  local dt = C.now() - t0
  C.metric("us_per_rt", dt / n * 1e6)
  C.check("sum", sum, C.w1_expected(n))
end

-- W4: each table packed into one string, unpacked in the worker.
local function pack(t)
  local parts, n, spack = {}, 0, string.pack
  for k, v in pairs(t) do
    n = n + 1
    parts[n] = spack("s1j", k, v)
  end
  return table.concat(parts)
end

local function unpack_sum(s)
  local t, pos, len, sunpack = {}, 1, #s, string.unpack
  while pos <= len do
    local k, v
    k, v, pos = sunpack("s1j", s, pos)
    t[k] = v
  end
  local sum = 0
  for _, v in pairs(t) do sum = sum + v end
  return sum
end

W.W4 = function()
  local n = C.args{20000}
  warm(inc)
  C.rounds("tasks_per_s", function()
    return queue_round(unpack_sum, n, function(t) return pack(C.w4_table(t)) end,
      C.w4_expected(n))
  end)
end

local which = arg[1]
if not W[which] then
  io.stderr:write("usage: luv.lua W1|W2|W3|W4 [sizes...]\n")
  os.exit(2)
end
W[which]()
C.finish()
