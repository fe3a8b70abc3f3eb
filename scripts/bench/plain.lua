-- plain.lua: W2's loops with no engine at all, to measure what this machine
-- gives two independent processes (the ceiling any 2-worker pool can reach).
-- driver.lua runs it alone and as two concurrent processes:
--   lua5.4 scripts/bench/plain.lua FIRST LAST ITERS
-- runs the LCG tasks FIRST..LAST of ITERS steps each and prints
-- "metric seconds_FIRST S" and "metric checksum_FIRST SUM".
local dir = arg[0]:match("^(.*)/[^/]*$") or "."
local C = dofile(dir .. "/common.lua")
local uv = require "luv" -- only for its monotonic clock
local first, last, iters = math.tointeger(tonumber(arg[1])), math.tointeger(tonumber(arg[2])),
                           math.tointeger(tonumber(arg[3]))
assert(first and last and iters, "usage: plain.lua FIRST LAST ITERS")
local lcg, sum = C.lcg, 0
local t0 = uv.hrtime()
for s = first, last do sum = sum + lcg(s, iters) end
local dt = (uv.hrtime() - t0) / 1e9
C.metric("seconds_" .. first, dt)
C.metric("checksum_" .. first, sum)
C.finish()
