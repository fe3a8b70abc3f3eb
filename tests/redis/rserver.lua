-- rserver.lua: starts a private redis-server for a test (a free loopback
-- port, a temporary folder, AOF on) and stops it.  Used by the tests in
-- tests/redis/ and by scripts/bench/redis.sh.
--
--   local srv = require("rserver").start()   -- srv.port, srv.url, srv.dir
--   srv:cli("XLEN", "jobs")                   -- redis-cli, output trimmed
--   srv:restart()                             -- same port, same folder
--   srv:stop()
--   local p = rserver.spawn(cmd, dir)         -- a background process
--   p:pid(), p:done() -> exit status | nil, p:kill("TERM"), p:wait(timeout)
local M = {}

local function sh(cmd)
  local ok = os.execute(cmd)
  return ok == true
end

local function read(path)
  local f = io.open(path, "r")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local Srv = {}
Srv.__index = Srv

function Srv:launch()
  return sh(string.format(
    "redis-server --bind 127.0.0.1 --port %d --dir %s --daemonize yes " ..
    "--pidfile %s/redis.pid --logfile %s/redis.log --appendonly yes " ..
    "--appendfsync everysec --save '' >/dev/null 2>&1",
    self.port, self.dir, self.dir, self.dir))
end

-- Waits until the server answers PING (at most ~10 s).
function Srv:wait_up()
  for _ = 1, 200 do
    if self:cli("PING") == "PONG" then return true end
    sh("sleep 0.05")
  end
  return false
end

function M.start()
  local dir = io.popen("mktemp -d /tmp/wpool-redis.XXXXXX"):read("l")
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16))
  for _ = 1, 20 do
    local port = math.random(20000, 60000)
    -- free when nothing answers there
    if not sh(string.format("redis-cli -p %d PING >/dev/null 2>&1", port)) then
      local s = setmetatable({ port = port, dir = dir,
                               url = string.format("redis://127.0.0.1:%d/0", port) }, Srv)
      if s:launch() and s:wait_up() then return s end
    end
  end
  error("cannot start redis-server")
end

-- Runs redis-cli with the arguments (quoted), returns its output trimmed.
function Srv:cli(...)
  local args = {}
  for i, a in ipairs({ ... }) do args[i] = "'" .. tostring(a):gsub("'", "'\\''") .. "'" end
  local p = io.popen(string.format("redis-cli -p %d %s 2>/dev/null", self.port,
                                   table.concat(args, " ")))
  local out = p:read("a")
  p:close()
  return (out:gsub("%s+$", ""))
end

function Srv:pid()
  return tonumber(read(self.dir .. "/redis.pid") or "")
end

-- Kills the server at once (SIGKILL: what was fsynced survives).
function Srv:kill()
  local pid = self:pid()
  if pid then sh("kill -9 " .. pid .. " 2>/dev/null") end
  for _ = 1, 100 do
    if not sh(string.format("kill -0 %d 2>/dev/null", pid or 0)) then break end
    sh("sleep 0.05")
  end
  os.remove(self.dir .. "/redis.pid")
end

-- Stops the server cleanly (AOF flushed) and starts it again on the same
-- port and folder.
function Srv:restart(down_s)
  self:cli("SHUTDOWN")
  for _ = 1, 100 do
    if self:cli("PING") ~= "PONG" then break end
    sh("sleep 0.05")
  end
  if down_s then sh("sleep " .. down_s) end
  assert(self:launch(), "cannot restart redis-server")
  assert(self:wait_up(), "redis-server did not come back")
end

function Srv:stop()
  if self.stopped then return end
  self.stopped = true
  self:cli("SHUTDOWN", "NOSAVE")
  local pid = self:pid()
  if pid then sh("kill -9 " .. pid .. " 2>/dev/null") end
  sh("rm -rf " .. self.dir)
end

-- ---- background processes ----------------------------------------------

local Proc = {}
Proc.__index = Proc
local nproc = 0

-- Runs cmd (a shell command line) in the background, its output to
-- dir/procN.log; a subshell waits for it, so its exit status is kept in
-- dir/procN.rc and no zombie is left behind.
function M.spawn(cmd, dir)
  nproc = nproc + 1
  local base = string.format("%s/proc%d", dir, nproc)
  local p = setmetatable({ base = base, log = base .. ".log" }, Proc)
  os.remove(base .. ".rc")
  os.remove(base .. ".pid")
  sh(string.format("( %s > %s 2>&1 & echo $! > %s.pid; wait $!; echo $? > %s.rc.tmp; " ..
                   "mv %s.rc.tmp %s.rc ) </dev/null >/dev/null 2>&1 &",
                   cmd, p.log, base, base, base, base))
  for _ = 1, 200 do
    if p:pid() then break end
    sh("sleep 0.02")
  end
  return p
end

function Proc:pid()
  self._pid = self._pid or tonumber(read(self.base .. ".pid") or "")
  return self._pid
end

function Proc:done()
  local s = read(self.base .. ".rc")
  return s and tonumber(s) or nil
end

function Proc:kill(sig)
  if self:pid() and not self:done() then
    sh(string.format("kill -%s %d 2>/dev/null", sig, self:pid()))
  end
end

-- Waits for the process to end (timeout seconds); its exit status or nil.
function Proc:wait(timeout)
  local t0 = os.time()
  while os.time() - t0 <= timeout do
    local rc = self:done()
    if rc then return rc end
    sh("sleep 0.05")
  end
  return nil
end

function Proc:output() return read(self.log) or "" end

function M.sleep(s) sh("sleep " .. s) end

-- M.write(path, text): writes a test's file.
function M.write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

-- M.run(fn, ...): runs each fn(srv) against a redis-server of its own,
-- stopping it whatever happens; on a failure writes it and exits 1.
function M.run(...)
  for _, fn in ipairs{ ... } do
    local srv = M.start()
    local ok, err = pcall(fn, srv)
    srv:stop()
    if not ok then
      io.stderr:write("FAIL ", tostring(err), "\n")
      os.exit(1)
    end
  end
end

return M
