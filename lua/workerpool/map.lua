-- workerpool.map: pool:map(task, list [, opts]), one task applied to every
-- item of a list, in batches.
--
--   local squares = pool:map(function(x) return x * x end, {1, 2, 3})
--
-- The list is cut into chunks of consecutive items; each chunk is one pool
-- task that calls `task` on its items in turn, so a list of 200,000 tiny
-- items costs a few hundred submits, not 200,000.  Results come back in
-- list order.  Under a host loop (`wpool run`) the waiting suspends only
-- the calling coroutine.  See docs/api.md.
local util = require "workerpool.util"

local M = {}

local KNOWN = { chunk = true }
local MAX_CHUNK = 1024   -- items per task when opts.chunk is not given
local PER_WORKER = 4     -- aim for this many chunks per worker

-- Errors name the line that called pool:map, the C method whose frame
-- util.raise finds above M.map.
local function bad_arg(pool, n, msg)
  util.raise(pool.map, string.format("bad argument #%d to 'map' (%s)", n, msg))
end

-- Runs in a worker: calls task on items[1..count], the items #first.. of
-- the list, and returns the first result of each.  An error is raised as a
-- string naming the item ("item #i: message" and the traceback; a value
-- that is not a string by its tostring), so the task.error log line and
-- what map raises both carry the real message.
local function run_chunk(task, items, count, first)
  local fn = task
  if type(task) == "string" then
    fn = rawget(_ENV, task)
    if type(fn) ~= "function" then
      local W = require "workerpool"
      error(string.format("items #%d-#%d: no handler '%s' in pool '%s' (the "
        .. "init script must define a global function of that name)", first,
        first + count - 1, task, tostring(W.pool_name())), 0)
    end
  end
  local function message(e)
    if type(e) ~= "string" then
      local ok, s = pcall(tostring, e)
      e = ok and type(s) == "string" and s
        or string.format("(error object is a %s value)", type(e))
    end
    return debug and debug.traceback and debug.traceback(e, 2) or e
  end
  local out, at = {}, 0
  local ok, err = xpcall(function()
    for i = 1, count do
      at = i
      out[i] = (fn(items[i]))
    end
  end, message)
  if not ok then error(string.format("item #%d: %s", first + at - 1, err), 0) end
  return out
end

local function check(pool, task, list, opts)
  local tt = type(task)
  if tt ~= "string" and tt ~= "function" then
    bad_arg(pool, 1, "handler name or function expected, got " .. tt)
  end
  if type(list) ~= "table" then bad_arg(pool, 2, "table expected, got " .. type(list)) end
  if opts == nil then return nil end
  local ck = util.checker(pool.map, "bad argument #3 to 'map' (%s)")
  return ck:integer("chunk", ck:options(opts, KNOWN).chunk, {})
end

local function cancel_all(futures, from)
  for k = from, #futures do futures[k]:cancel() end
end

-- Raises what ended the chunk of items first..last: the error run_chunk
-- raised, which names its item(s), or why the chunk never ran.
local function chunk_error(first, last, err)
  if type(err) == "string" and err:find("^items? #%d") then error(err, 0) end
  error(string.format("items #%d-#%d: %s", first, last, tostring(err)), 0)
end

-- A submit that raised names its argument #2 (the task) or #3 (the items):
-- say it in map's terms.
local function submit_error(pool, msg, first, last)
  msg = tostring(msg)
  local which, why = msg:match("^bad argument #(%d) to 'submit' %((.*)%)$")
  if which == "2" then bad_arg(pool, 1, why) end
  if which == "3" then bad_arg(pool, 2, string.format("items #%d-#%d: %s", first, last, why)) end
  error(msg, 0)
end

function M.map(pool, task, list, opts)
  local chunk = check(pool, task, list, opts)
  local n = #list
  local results = {}
  if n == 0 then return results end
  chunk = chunk or math.max(1, math.min(MAX_CHUNK, -(-n // (pool:size() * PER_WORKER))))
  local futures, firsts = {}, {}
  for first = 1, n, chunk do
    local last = math.min(first + chunk - 1, n)
    local items = table.move(list, first, last, 1, {})
    local ok, f, err, code = pcall(pool.submit, pool, run_chunk, task, items,
      last - first + 1, first)
    if not ok then -- nothing of this call runs
      cancel_all(futures, 1)
      submit_error(pool, f, first, last)
    end
    if not f then
      cancel_all(futures, 1)
      return nil, err, code
    end
    local k = #futures + 1
    futures[k], firsts[k] = f, first
  end
  for k, f in ipairs(futures) do
    local first = firsts[k]
    local last = math.min(first + chunk - 1, n)
    local ok, out = f:wait()
    if not ok then
      cancel_all(futures, k + 1)
      chunk_error(first, last, out)
    end
    table.move(out, 1, last - first + 1, first, results)
  end
  return results
end

return M
