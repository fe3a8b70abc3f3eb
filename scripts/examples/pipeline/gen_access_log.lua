-- gen_access_log.lua: writes N access-log lines (combined log format) with a
-- fixed seed, so every run of the example and the benchmark reads the same
-- input.  Usage: lua5.4 gen_access_log.lua N [FILE]   (FILE: stdout)
local n = tonumber(arg[1]) or 100000
local out = arg[2] and assert(io.open(arg[2], "wb")) or io.stdout
math.randomseed(12345)
local paths = { "/", "/index.html", "/api/users", "/api/orders", "/api/items",
                "/static/app.js", "/static/style.css", "/login", "/logout", "/search" }
local methods = { "GET", "GET", "GET", "GET", "POST", "PUT", "DELETE" }
local statuses = { 200, 200, 200, 200, 200, 201, 204, 301, 304, 400, 404, 404, 500, 503 }
local agents = { "Mozilla/5.0 (X11; Linux x86_64)", "curl/7.88.1", "Go-http-client/1.1" }
local buf = {}
for i = 1, n do
  local ip = string.format("10.%d.%d.%d", math.random(0, 255), math.random(0, 255),
                           math.random(1, 254))
  local path = paths[math.random(#paths)]
  if math.random() < 0.3 then path = path .. "?id=" .. math.random(1, 99999) end
  buf[#buf + 1] = string.format(
    '%s - - [06/Dec/2026:00:%02d:%02d +0000] "%s %s HTTP/1.1" %d %d "-" "%s"\n',
    ip, (i // 60) % 60, i % 60, methods[math.random(#methods)], path,
    statuses[math.random(#statuses)], math.random(0, 50000), agents[math.random(#agents)])
  if #buf == 4096 then out:write(table.concat(buf)); buf = {} end
end
out:write(table.concat(buf))
if out ~= io.stdout then out:close() end
