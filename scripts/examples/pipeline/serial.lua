-- serial.lua: the access-log job done by one plain lua5.4 process, the
-- reference for the benchmark.  Same stages module, same output.
-- Usage: lua5.4 serial.lua access.log out.jsonl
local dir = arg[0]:match("^(.*)/[^/]*$") or "."
package.path = dir .. "/?.lua;" .. package.path
local S = require "stages"
local ok_json, workerpool = pcall(require, "workerpool")
local acc = S.zero()
for line in io.lines(arg[1]) do
  local ok, req = pcall(S.parse, line)
  if ok then
    req = S.keep(req)
    if req then acc = S.add(acc, req) end
  end
end
local out = assert(io.open(arg[2], "wb"))
local encode = ok_json and workerpool.json.encode
for _, e in ipairs{ S.finish(acc) } do
  out:write(encode and encode(e) or
    string.format('{"status":%d,"path":%q,"requests":%d,"bytes":%d}',
                  e.status, e.path, e.requests, e.bytes), "\n")
end
out:close()
