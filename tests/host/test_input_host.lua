-- test_input_host.lua: task descriptors under `wpool run` when a full
-- queue with on_full = "block" parks the submitting coroutine and the
-- submit is retried later (issue 10): the descriptor's name, read through
-- __index with a collection in between, stays valid across the retries,
-- and a handler gets exactly the arguments given.

local T = require "harness"
local wp = require "workerpool"

T.test("a blocked descriptor submit keeps its fields and arguments", function()
  local p <close> = wp.new { max_workers = 1, queue_cap = 1, on_full = "block",
    idle_timeout = 60, init = [[
      function COUNT(...)
        require("workerpool").sleep(0.02)
        return select("#", ...), ...
      end]] }
  local seen = {}
  p:use { admit = function(_, task)
    collectgarbage()
    seen[#seen + 1] = task.name
    return true
  end }
  local fs = {}
  for i = 1, 6 do
    local d = setmetatable({ handler = "COUNT" }, { __index = function(_, k)
      if k == "name" then
        collectgarbage()
        return ("task-" .. i):rep(10)
      end
    end })
    fs[i] = assert(p:submit(d, i, nil))
  end
  for i = 1, 6 do
    local r = T.pack(fs[i]:wait(30))
    T.eq(r[1], true)
    T.eq(r[2], 2, "arguments of task " .. i)
    T.eq(r[3], i)
    T.eq(seen[i], ("task-" .. i):rep(10))
  end
  T.eq(p:submit_wait({ handler = "COUNT", name = "w" }, "a"), 1)
end)

T.run_host()
