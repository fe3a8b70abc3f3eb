-- quickstart.lua: the README's first example.  Runs a named handler and an
-- inline function on a pool of 4 worker threads, each with its own Lua
-- state, then fans 100 tasks out and gathers their results.
local workerpool = require "workerpool"

local pool = workerpool.new{
  name = "resize",
  max_workers = 4,
  init = [[ function double(x) return 2 * x end ]],
}

local f = pool:submit("double", 21)          -- a handler defined by init
print("double(21):", f:wait())               --> true  42

print("sum, product:", pool:submit_wait(function(a, b)
  return a + b, a * b
end, 3, 4))                                  --> 7  12

-- Fan out: each task runs in some worker's state; arguments and results
-- are copied between states.
local futures = {}
for i = 1, 100 do
  futures[i] = pool:submit(function(n)
    local wp = require "workerpool"
    local acc = 0
    for k = 1, n * 1000 do acc = acc + k % 7 end
    return acc, wp.worker_id()
  end, i)
end
local total, used = 0, {}
for i = 1, 100 do
  local ok, acc, worker = futures[i]:wait()
  assert(ok, acc)
  total = total + acc
  used[worker] = true
end
local nworkers = 0
for _ in pairs(used) do nworkers = nworkers + 1 end
print(string.format("100 tasks: checksum %d, ran on %d worker state(s)",
  total, nworkers))

-- A shared dictionary is visible from every state.
local hits = workerpool.shared("hits")
pool:submit_wait(function()
  require("workerpool").shared("hits"):incr("n", 5, 0)
end)
print("hits set by a worker:", hits:get("n"))

print("discarded, interrupted at stop:", pool:stop_wait())
