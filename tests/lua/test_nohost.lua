-- test_nohost.lua: the host-only functions outside a host.  In a stock
-- lua5.4 there is no event loop: workerpool.spawn, after, every,
-- on_shutdown and f:on_done raise an error that points to `wpool run`,
-- while the waiting calls block the thread as they always did.

local T = require "harness"
local wp = require "workerpool"

local function fn() end

local calls = {
  spawn = function() return wp.spawn(fn) end,
  after = function() return wp.after(0.01, fn) end,
  every = function() return wp.every(0.01, fn) end,
  on_shutdown = function() return wp.on_shutdown(fn) end,
}

for _, name in ipairs { "spawn", "after", "every", "on_shutdown" } do
  T.test("workerpool." .. name .. " raises without a host", function()
    local err = T.raises(calls[name], "wpool run")
    T.ok(err:find("workerpool." .. name, 1, true), "names the function: " .. err)
    T.ok(err:find("host event loop", 1, true), err)
  end)
end

T.test("f:on_done raises without a host; the future is unharmed", function()
  local pool <close> = wp.new { max_workers = 1 }
  local f = pool:submit(function() return "v" end)
  local err = T.raises(function() f:on_done(fn) end, "wpool run")
  T.ok(err:find("on_done", 1, true), err)
  local ok, v = f:wait(10)
  T.eq(ok, true)
  T.eq(v, "v")
  -- Also for a future that already ended.
  T.raises(function() f:on_done(fn) end, "wpool run")
end)

T.test("without a host, waiting calls block the thread, in coroutines too",
  function()
    local pool <close> = wp.new { max_workers = 1 }
    local t0 = wp.now()
    wp.sleep(0.05)
    T.ok(wp.now() - t0 >= 0.045, "sleep blocked")
    local co = coroutine.wrap(function()
      local v = pool:submit_wait(function() return "in a coroutine" end)
      local f = pool:submit(function()
        require("workerpool").sleep(0.3)
      end)
      local t1 = wp.now()
      local r, err = f:wait(0.05)
      return v, r, err, wp.now() - t1, f
    end)
    local v, r, err, waited, f = co()
    T.eq(v, "in a coroutine")
    T.eq(r, nil)
    T.eq(err, "timeout")
    T.ok(waited >= 0.045, "wait(timeout) blocked for the timeout")
    T.eq(f:wait(10), true)
  end)

T.run()
