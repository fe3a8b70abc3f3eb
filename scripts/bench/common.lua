-- common.lua: what the workload scripts (ours.lua, luv.lua) share: the W2
-- loop, the W4 input table, expected checksums, a wall clock, and the line
-- protocol they report to driver.lua with ("metric NAME VALUE" and
-- "check NAME ok|FAIL detail" on stdout, exit status 1 when a check failed).
local M = {}

-- W2's task: an LCG accumulated over `iters` steps, reduced modulo a prime
-- so the result stays exact even where a peer carries numbers as floats.
-- It has no upvalues, so it can be shipped as bytecode to any state.
function M.lcg(seed, iters)
  seed = math.tointeger(seed)
  iters = math.tointeger(iters)
  local x, acc = seed, 0
  for _ = 1, iters do
    x = (x * 1103515245 + 12345) & 0x7fffffff
    acc = acc + x
  end
  return acc % 1000000007
end

-- W4: the 100 keys, built once so every table shares interned strings.
M.W4_KEYS = {}
for j = 1, 100 do M.W4_KEYS[j] = "field_" .. j end

-- A fresh table for task t: W4_KEYS[j] -> t + j.
function M.w4_table(t)
  local tbl, keys = {}, M.W4_KEYS
  for j = 1, 100 do tbl[keys[j]] = t + j end
  return tbl
end

-- Sum over tasks 1..n of the tasks' results.
function M.w1_expected(n) return n * (n + 1) // 2 + n end        -- x + 1
function M.w4_expected(n) return 100 * (n * (n + 1) // 2) + 5050 * n end

-- Wall-clock seconds, monotonic.  Set by the script (workerpool.now or
-- uv.hrtime) so both engines are timed by a clock of the same kind.
M.now = os.clock

local failed = false

function M.metric(name, value)
  io.write(string.format("metric %s %.17g\n", name, value))
end

-- Compares numerically (luv turns integers into floats).
function M.check(name, got, want)
  if got == want then
    io.write(string.format("check %s ok\n", name))
  else
    failed = true
    io.write(string.format("check %s FAIL got %s want %s\n", name,
                           tostring(got), tostring(want)))
  end
end

function M.finish()
  io.stdout:flush()
  os.exit(failed and 1 or 0)
end

-- Throughput workloads run in rounds in one process: round 1 on a cold
-- heap, whose memory is new to the process (on this VM, first touches of
-- fresh pages cost several microseconds each, charged as user time), then
-- M.WARM_ROUNDS more that reuse it, as a long-running process does.
-- run() does one round and returns its figure; reported as NAME_cold and
-- NAME (the median of the warm rounds).  Garbage is collected between
-- rounds, untimed.  BENCH_WARM_ROUNDS=0 (the driver's instruction counts)
-- runs the first round only.
M.WARM_ROUNDS = math.tointeger(tonumber(os.getenv("BENCH_WARM_ROUNDS") or "2")) or 2

function M.rounds(name, run)
  collectgarbage()
  collectgarbage()
  M.metric(name .. "_cold", run())
  local warm = {}
  for r = 1, M.WARM_ROUNDS do
    collectgarbage()
    collectgarbage()
    warm[r] = run()
  end
  if #warm > 0 then M.metric(name, M.median(warm)) end
end

function M.median(list)
  local s = {}
  for i = 1, #list do s[i] = list[i] end
  table.sort(s)
  local n = #s
  if n == 0 then return nil end
  if n % 2 == 1 then return s[(n + 1) // 2] end
  return (s[n // 2] + s[n // 2 + 1]) / 2
end

-- Resident set size of this process in KiB, from /proc/self/status.
function M.rss_kib()
  local f = assert(io.open("/proc/self/status", "r"))
  local s = f:read("a")
  f:close()
  return tonumber(s:match("VmRSS:%s*(%d+)"))
end

-- Reads the numeric command-line arguments from index 2 on, with defaults.
-- W2's frame, the same for every engine: TASKS loops of ITERS steps run
-- serially in this state, half just before the engine's parallel run and
-- half just after, so drift in the machine's speed hits both alike.
-- parallel(ntasks, iters) runs every loop on the engine and returns the
-- sum of their results and the seconds the timed part took.  Efficiency =
-- serial / (2 x parallel).
function M.w2(parallel)
  local ntasks, iters = M.args{400, 500000}
  local lcg, half = M.lcg, ntasks // 2
  local serial_sum = 0
  local t0 = M.now()
  for s = 1, half do serial_sum = serial_sum + lcg(s, iters) end
  local serial = M.now() - t0
  local sum, parallel_s = parallel(ntasks, iters)
  t0 = M.now()
  for s = half + 1, ntasks do serial_sum = serial_sum + lcg(s, iters) end
  serial = serial + (M.now() - t0)
  M.metric("serial_s", serial)
  M.metric("parallel_s", parallel_s)
  M.metric("efficiency", serial / (2 * parallel_s))
  M.check("sum", sum, serial_sum)
  M.metric("checksum", sum)
end

function M.args(defaults)
  local out = {}
  for i = 1, #defaults do out[i] = math.tointeger(tonumber(arg[i + 1])) or defaults[i] end
  return table.unpack(out)
end

return M
