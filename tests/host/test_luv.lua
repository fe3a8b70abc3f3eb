-- test_luv.lua: `require "luv"` under `wpool run` is luv on the host's own
-- loop (issue 14), and workerpool.await turns its callbacks into waits of
-- the calling host coroutine: a TCP echo round trip, luv and workerpool
-- timers together, callbacks that run early, twice or never matter, and
-- await where no host coroutine can wait.

local T = require "harness"
local wp = require "workerpool"
local uv = require "luv"

T.test("a luv TCP echo round trip through await", function()
  local server = uv.new_tcp()
  assert(server:bind("127.0.0.1", 0))
  local port = server:getsockname().port
  assert(server:listen(16, function(err)
    assert(not err, err)
    local conn = uv.new_tcp()
    server:accept(conn)
    conn:read_start(function(_, data)
      if data then conn:write(data) else conn:close() end
    end)
  end))
  local c = uv.new_tcp()
  T.eq(wp.await(c.connect, c, "127.0.0.1", port), nil, "connect error")
  T.eq(wp.await(c.write, c, "hello, loop"), nil, "write error")
  local got = ""
  while #got < #"hello, loop" do
    local err, data = wp.await(function(cb)
      c:read_start(function(e, d)
        c:read_stop()
        cb(e, d)
      end)
    end)
    T.eq(err, nil)
    got = got .. assert(data)
  end
  T.eq(got, "hello, loop")
  wp.await(c.shutdown, c)
  c:close()
  server:close()
end)

T.test("luv timers and workerpool timers share one loop", function()
  local order = {}
  local t = uv.new_timer()
  t:start(20, 0, function()
    order[#order + 1] = "luv"
    t:close()
  end)
  wp.after(0.06, function() order[#order + 1] = "wp" end)
  local pool = wp.new{ max_workers = 1 }
  T.eq(pool:submit_wait(function() return 7 end), 7) -- the loop runs meanwhile
  wp.sleep(0.2)
  T.eq(table.concat(order, ","), "luv,wp")
  pool:stop_wait()
end)

T.test("await returns the callback's arguments, even when it ran early", function()
  local a, b, c = wp.await(function(x, cb) cb(x, nil, 3) end, 1)
  T.eq(a, 1)
  T.eq(b, nil)
  T.eq(c, 3)
  T.eq(select("#", wp.await(function(cb) cb() end)), 0)
  local n = select("#", wp.await(function(cb) wp.after(0.01, function() cb(nil, nil) end) end))
  T.eq(n, 2, "trailing nils kept")
end)

T.test("a callback that runs twice is logged and ignored, not a crash", function()
  T.eq(wp.await(function(cb) cb("first"); cb("second") end), "first")
  local saved
  T.eq(wp.await(function(cb)
    saved = cb
    wp.after(0.01, function() cb("late") end)
  end), "late")
  saved("again") -- logged as coroutine.error
  wp.sleep(0.01)
end)

T.test("an error in fn is raised by await; a later callback is ignored", function()
  local saved
  T.raises(function()
    wp.await(function(cb) saved = cb; error("fn failed") end)
  end, "fn failed")
  saved("ignored")
end)

T.test("a luv call that fails at once: await returns its error, no wait", function()
  local c = uv.new_tcp() -- never connected: write fails at once, no callback
  local err = wp.await(c.write, c, "x")
  T.eq(type(err), "string", "the error in the callback's first place")
  T.ok(err:find("EBADF", 1, true) or err:find("ENOTCONN", 1, true), err)
  -- In a spawned coroutine too (before, it hung there for ever).
  local t = wp.spawn(function() return wp.await(c.write, c, "y") end)
  local ok, e2 = t:join(5)
  T.ok(ok, tostring(e2))
  T.eq(type(e2), "string")
  -- A plain nil result (no message) is not a failure: await waits.
  T.eq(wp.await(function(cb) wp.after(0.01, function() cb("later") end) return nil end), "later")
  c:close()
end)

T.test("await outside a host coroutine raises a clear error", function()
  local ok, err = pcall(coroutine.wrap(function() return wp.await(print) end))
  T.eq(ok, false)
  T.ok(err:find("workerpool.await must be called from a host coroutine", 1, true), err)
  local t, msg = uv.new_timer(), nil
  t:start(1, 0, function()
    t:close()
    msg = select(2, pcall(wp.await, print))
  end)
  T.eventually(function() return msg end, 10, "the luv callback ran")
  T.ok(msg:find("must be called from a host coroutine", 1, true), msg)
  T.raises(function() wp.await(42) end, "bad argument #1 to 'await'")
end)

T.test("SIGTERM ends wpool run even with a luv server left listening", function()
  local src, ready = os.tmpname(), os.tmpname()
  os.remove(ready)
  local fh = assert(io.open(src, "w"))
  fh:write(string.format([[
local uv = require "luv"
local s = uv.new_tcp()
assert(s:bind("127.0.0.1", 0))
assert(s:listen(8, function() end))
io.open(%q, "w"):write("ready"):close()
require("workerpool").sleep(120) -- the signal comes while the script lives
]], ready))
  fh:close()
  -- The signal goes to wpool itself: timeout(1) would forward its own
  -- SIGTERM twice (to the child and to its process group).
  local ok, out = T.sh(string.format([[sh -c '
timeout -k 5 60 %s run %s & p=$!
n=0; while [ ! -s %s ] && [ $n -lt 600 ]; do sleep 0.05; n=$((n+1)); done
pkill -TERM -P $p; wait $p; echo "status $?"']], arg[-2], src, ready))
  os.remove(src)
  os.remove(ready)
  T.ok(ok, out)
  T.ok(out:find("status 0", 1, true), out)
end)

T.run_host()
