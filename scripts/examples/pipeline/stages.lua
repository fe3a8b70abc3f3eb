-- stages.lua: the stages of the access-log job (access.json): parse a line
-- with Lua patterns, keep the requests worth counting, and count requests
-- and bytes by status and path.  Plain functions, as the pipeline expects.
local M = {}

local PATTERN = '^(%S+) %S+ %S+ %[([^%]]+)%] "(%u+) ([^ "?]+)[^ "]* [^"]*" (%d+) (%d+)'

-- parse(line) -> {ip, time, method, path, status, bytes}; raises on junk.
function M.parse(line)
  local ip, time, method, path, status, bytes = line:match(PATTERN)
  if not ip then error("unparsable line: " .. line:sub(1, 80), 0) end
  return { ip = ip, time = time, method = method, path = path,
           status = tonumber(status), bytes = tonumber(bytes) }
end

-- keep(req) -> req, or nothing for redirects and not-modified responses.
function M.keep(req)
  if req.status >= 300 and req.status < 400 then return end
  return req
end

-- parse_keep(line): parse and keep in one stage (access-2stage.json), so
-- that requests cross between stages once instead of twice.
function M.parse_keep(line)
  return M.keep(M.parse(line))
end

-- The reduce stage: an accumulator per worker, merged at the end.
function M.zero() return {} end

function M.add(acc, req)
  local k = req.status .. " " .. req.path
  local e = acc[k]
  if not e then
    e = { status = req.status, path = req.path, requests = 0, bytes = 0 }
    acc[k] = e
  end
  e.requests = e.requests + 1
  e.bytes = e.bytes + req.bytes
  return acc
end

function M.merge(a, b)
  for k, e in pairs(b) do
    local x = a[k]
    if x then
      x.requests = x.requests + e.requests
      x.bytes = x.bytes + e.bytes
    else
      a[k] = e
    end
  end
  return a
end

-- finish(acc) -> one item per (status, path), sorted, for the sink.
function M.finish(acc)
  local list = {}
  for _, e in pairs(acc) do list[#list + 1] = e end
  table.sort(list, function(x, y)
    if x.status ~= y.status then return x.status < y.status end
    return x.path < y.path
  end)
  return table.unpack(list)
end

return M
