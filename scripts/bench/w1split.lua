-- w1split.lua: the peers harness' W1 timed in its parts inside the process: the
-- live submits (ns per submit, while 2 workers run) and the waits after them.
-- usage: LUA_CPATH=build/?.so;; lua5.4 scripts/bench/w1split.lua
local wp = require("workerpool")
local pool = wp.new{ name = "bench", max_workers = 2 }
local task = function(x) return x + 1 end
local N = 200000
local futs = {}
local t0 = wp.now()
for i = 1, N do futs[i] = pool:submit(task, i) end
local t1 = wp.now()
local sum = 0
for i = 1, N do
  local ok, r = futs[i]:wait()
  assert(ok, r)
  sum = sum + r
end
local t2 = wp.now()
assert(sum == N * (N + 1) // 2 + N)
io.write(string.format("submit %.0f ns/task, wait %.1f ms\n", (t1 - t0) / N * 1e9, (t2 - t1) * 1e3))
pool:stop_wait()
