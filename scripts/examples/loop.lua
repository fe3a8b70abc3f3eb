-- loop.lua: run with `wpool run scripts/examples/loop.lua`.
--
-- A hundred coroutines keep a thousand tasks in flight while a timer ticks
-- on the same loop: waiting for a task suspends one coroutine, never the
-- loop.  Then Ctrl-C (or SIGTERM) would drain the pool gracefully; here the
-- script simply ends and the pool drains on exit.
local workerpool = require "workerpool"

local pool = workerpool.new{
  name = "cpu",
  max_workers = 2,
  init = [[
    function work(n)
      local x = n
      for _ = 1, 20000 do x = (x * 1103515245 + 12345) % 2147483648 end
      return n, x
    end
  ]],
}

local ticks = 0
local ticker = workerpool.every(0.01, function() ticks = ticks + 1 end)

local t0 = workerpool.now()
local handles = {}
for c = 1, 100 do
  handles[c] = workerpool.spawn(function()
    for i = 1, 10 do
      local n = pool:submit_wait("work", c * 100 + i)
      assert(n == c * 100 + i, "a result reached the wrong coroutine")
    end
    return c
  end)
end
for c = 1, 100 do assert(select(2, handles[c]:join()) == c) end
local elapsed = workerpool.now() - t0
ticker:cancel()

print(string.format("1000 tasks from 100 coroutines in %.2f s; " ..
  "the 10 ms timer ticked %d times meanwhile", elapsed, ticks))
workerpool.log("info", "example finished", { tasks = 1000, ticks = ticks })
