-- test_worker_heap.lua: the free lists each worker state keeps for its
-- small blocks (core/worker.c, worker_alloc): blocks that move to another
-- size class, grow past the largest class or shrink back into one keep
-- their contents, and the state's byte count stays exact (the allocator's
-- count, seen in pool:inspect(), against Lua's own collectgarbage count).

local T = require "harness"
local S = T.suite("test_worker_heap")

-- Strings of every length from 1 to 1100 bytes (every class and past the
-- largest), a table grown slot by slot to 4096 (its array reallocated from
-- the small classes to large blocks), a hash part grown and then shrunk by
-- a rehash, three times over with full collections in between.  Returns
-- whether every value read back intact and the state's bytes after a full
-- collection.
local function churn()
  local function round_trip(round)
    local ok = true
    local parts = {}
    for n = 1, 1100 do parts[n] = string.rep(string.char(65 + (n + round) % 26), n) end
    for n = 1, 1100 do
      local s = parts[n]
      if #s ~= n or s:byte(1) ~= 65 + (n + round) % 26 or s:byte(n) ~= s:byte(1) then
        ok = false
      end
    end
    local t = {}
    for i = 1, 4096 do t[i] = i * round end
    for i = 1, 4096 do if t[i] ~= i * round then ok = false end end
    local h = {}
    for i = 1, 300 do h["k" .. i] = i end
    for i = 1, 299 do h["k" .. i] = nil end
    for i = 1, 40 do h[-i] = i end -- rehash: the node array shrinks
    return ok and h.k300 == 300 and h[-40] == 40
  end
  local ok = true
  for round = 1, 3 do
    ok = round_trip(round) and ok
    collectgarbage()
  end
  collectgarbage()
  collectgarbage()
  return ok, collectgarbage("count") * 1024
end

S.case("worker heap: contents survive every size change, the byte count stays exact", function()
  local p = S.newpool { max_workers = 1, name = "heap-1" }
  for _ = 1, 3 do
    local ok, intact, bytes = p:submit(churn):wait()
    T.ok(ok, "the task ran")
    T.ok(intact, "every value read back intact")
    local mem = p:inspect().workers[1].memory
    -- The allocator's count includes what the task's results left behind
    -- since its last collection: a few KB, never the drift of a miscount
    -- (megabytes over these allocations).
    T.ok(math.abs(mem - bytes) < 64 * 1024,
      string.format("allocator count %d, Lua's count %d", mem, bytes))
  end
end)

T.run()
