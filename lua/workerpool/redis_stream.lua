-- workerpool.redis_stream: the redis-stream source, sink and dead letter of
-- pipelines (docs/scale-out.md), used by workerpool.pipeline.
--
-- Source: one consumer of a consumer group.  Entries come from XREADGROUP
-- (new ones) and from XAUTOCLAIM (pending longer than claim_idle on any
-- consumer, a crashed process).  The runner acknowledges an entry (ack)
-- once everything it produced reached the sink or the dead letter; an
-- entry whose item failed is left pending instead (redeliver), with its
-- error kept in the hash "<stream>:<group>:errors", until its delivery
-- count reaches max_deliveries.  A claimed entry delivered more often than
-- that comes back marked dead, with the error kept for it.
--
-- Sink and dead letter: XADD of one entry per item (MAXLEN ~ maxlen).
--
-- Every Redis call goes through workerpool.redis clients (reconnecting,
-- async on the host loop); the reading connection is its own, since an
-- XREADGROUP BLOCK holds the connection it runs on.
local workerpool = require "workerpool"
local redis = require "workerpool.redis"

local M = {}

M.SOURCE_KEYS = { url = true, stream = true, group = true, consumer = true,
                  claim_idle = true, max_deliveries = true, count = true, block = true,
                  start = true }
M.SINK_KEYS = { url = true, stream = true, maxlen = true }

local function is_num(v)
  return type(v) == "number" and v == v and v ~= math.huge and v ~= -math.huge
end

-- M.check(kind, t, ptr, err, e, check_str): checks the redis-stream keys
-- of the endpoint t (kind "source", "sink" or "dead_letter") and puts them
-- in e; each problem is reported with err(pointer, message).  check_str is
-- the pipeline's own string check: check_str(t, key, ptr, required).
function M.check(kind, t, ptr, err, e, check_str)
  local function str(k, required, default)
    local v = check_str(t, k, ptr, required)
    if v == nil then return default end
    return v
  end
  local function int(k, default, max)
    local v = t[k]
    if v == nil then return default end
    if not is_num(v) or v ~= math.floor(v) or v < 1 or v > max then
      err(ptr .. "/" .. k, string.format("must be an integer from 1 to %d", max))
      return default
    end
    return math.tointeger(v)
  end
  local function secs(k, default, zero_ok)
    local v = t[k]
    if v == nil then return default end
    if not is_num(v) or v < 0 or (v == 0 and not zero_ok) or v > 86400 then
      err(ptr .. "/" .. k, zero_ok and "must be a number of seconds from 0 to 86400"
                                  or "must be a positive number of seconds (at most 86400)")
      return default
    end
    return v + 0.0
  end
  local url = str("url", true)
  if url then
    local u, uerr = redis.parse_url(url)
    if not u then err(ptr .. "/url", uerr) else e.url = url end
  end
  e.stream = str("stream", true)
  if kind == "source" then
    e.group = str("group", false, "wpool")
    e.consumer = str("consumer", false, nil)
    e.claim_idle = secs("claim_idle", 30.0)
    e.max_deliveries = int("max_deliveries", 5, 1000000)
    e.count = int("count", 128, 100000)
    e.block = secs("block", 2.0, true)
    local s = t.start
    if s ~= nil and s ~= "$" and s ~= "0" then
      err(ptr .. "/start", string.format(
        'must be "$" (new entries) or "0" (the whole stream), got %s',
        workerpool.json.encode(s) or tostring(s)))
    end
    e.start = s == "0" and "0" or "$"
  else
    e.maxlen = int("maxlen", nil, math.maxinteger)
  end
end

local function sleep_retry(c)
  workerpool.sleep(math.max(0.01, math.min(c:retry_in(), 0.1)))
end

-- ---- source ---------------------------------------------------------------

-- M.source(e) -> source: fetch(want, may_block), ack(ids, give_up),
-- redeliver(id, error), dead(id), tick(), close().  e is the checked endpoint.
function M.source(e)
  local rd = redis.client(e.url, { timeout = e.block + 10 })
  local ctl = redis.client(e.url)
  local consumer = e.consumer or workerpool["redis.consumer_name"]()
  local errkey = e.stream .. ":" .. e.group .. ":errors"
  local err_ttl = math.floor(e.claim_idle * (e.max_deliveries + 2) + 3600)
  local claim_every = math.max(0.05, e.claim_idle / 4)
  local S = { stream = true, consumer = consumer, inflight = {} }
  local group_ready, cursor, next_claim = false, "0-0", 0
  local backlog, errs, dead_ids = {}, {}, {}

  local function ensure_group()
    if group_ready then return true end
    local r, err, kind = ctl:call("XGROUP", "CREATE", e.stream, e.group, e.start, "MKSTREAM")
    if r or (kind == "reply" and tostring(err):find("BUSYGROUP", 1, true)) then
      group_ready = true
      return true
    end
    return false
  end

  local function entry(id, fields, deliveries)
    local item = {}
    if type(fields) == "table" then
      for k = 1, #fields - 1, 2 do item[fields[k]] = fields[k + 1] end
    end
    item._id = id
    S.inflight[id] = true
    return { id = id, item = item, deliveries = deliveries }
  end

  -- Reclaims entries idle past claim_idle; appends them to out.
  local function claim(out)
    local r = ctl:call("XAUTOCLAIM", e.stream, e.group, consumer,
                       math.floor(e.claim_idle * 1000), cursor, "COUNT", e.count)
    if type(r) ~= "table" then return end
    cursor = type(r[1]) == "string" and r[1] or "0-0"
    if cursor ~= "0-0" then next_claim = 0 end -- more to look at: go on soon
    local ents, cmds = {}, {}
    for _, ent in ipairs(type(r[2]) == "table" and r[2] or {}) do
      -- an entry this process still holds only had its idle time reset
      if type(ent) == "table" and type(ent[1]) == "string" and not S.inflight[ent[1]] then
        ents[#ents + 1] = ent
        cmds[#cmds + 1] = { "XPENDING", e.stream, e.group, ent[1], ent[1], 1 }
      end
    end
    if #ents == 0 then return end
    local pr = ctl:pipeline(cmds) or {}
    local dead, hcmds = {}, {}
    for i, ent in ipairs(ents) do
      local p = pr[i]
      local n = type(p) == "table" and type(p[1]) == "table" and math.tointeger(p[1][4]) or 1
      local en = entry(ent[1], ent[2], n)
      if n > e.max_deliveries then
        en.dead = true
        dead[#dead + 1] = en
        hcmds[#hcmds + 1] = { "HGET", errkey, en.id }
      end
      out[#out + 1] = en
    end
    if #dead > 0 then
      local hr = ctl:pipeline(hcmds) or {}
      for i, en in ipairs(dead) do
        local msg = type(hr[i]) == "string" and hr[i] or nil
        en.error = string.format("delivered %d times (max_deliveries %d)%s", en.deliveries,
          e.max_deliveries, msg and (": last error: " .. msg) or "")
      end
    end
  end

  -- fetch(want, may_block) -> list of {id, item, deliveries [, dead, error]},
  -- and when nothing came because Redis is unreachable, seconds to wait.
  function S.fetch(want, may_block)
    local out = {}
    if not ensure_group() then return out, math.max(0.01, ctl:retry_in()) end
    if workerpool.now() >= next_claim then
      next_claim = workerpool.now() + claim_every
      claim(out)
    end
    want = math.min(want - #out, e.count)
    if want <= 0 then return out end
    local args = { "XREADGROUP", "GROUP", e.group, consumer, "COUNT", want }
    if may_block and #out == 0 and e.block > 0 then
      args[#args + 1] = "BLOCK"
      args[#args + 1] = math.max(1, math.floor(e.block * 1000))
    end
    args[#args + 1] = "STREAMS"
    args[#args + 1] = e.stream
    args[#args + 1] = ">"
    local r, err, kind = rd:call(table.unpack(args))
    if r == nil then
      if kind == "reply" and tostring(err):find("NOGROUP", 1, true) then group_ready = false end
      return out, kind == "io" and math.max(0.01, rd:retry_in()) or 0.1
    end
    if type(r) == "table" then
      for _, s in ipairs(r) do
        for _, ent in ipairs(type(s[2]) == "table" and s[2] or {}) do
          out[#out + 1] = entry(ent[1], ent[2], 1)
        end
      end
    end
    return out
  end

  -- The entry failed and goes back for another delivery: not acknowledged,
  -- its error kept for the consumer that sees it last.
  function S.redeliver(id, msg)
    S.inflight[id] = nil
    errs[#errs + 1] = { id, msg }
  end

  function S.dead(id) dead_ids[#dead_ids + 1] = id end

  -- ack(ids, give_up): XACK ids (and what an earlier call could not),
  -- record errors of entries left pending.  Returns true, or false when
  -- Redis was unreachable (kept for the next call); with give_up, retries
  -- until done or give_up() is true.
  function S.ack(ids, give_up)
    for _, id in ipairs(ids) do
      backlog[#backlog + 1] = id
      S.inflight[id] = nil
    end
    while true do
      if #backlog == 0 and #errs == 0 and #dead_ids == 0 then return true end
      local cmds = {}
      for i = 1, #backlog, 1000 do
        local cmd = { "XACK", e.stream, e.group }
        for k = i, math.min(i + 999, #backlog) do cmd[#cmd + 1] = backlog[k] end
        cmds[#cmds + 1] = cmd
      end
      if #errs > 0 then
        local cmd = { "HSET", errkey }
        for _, p in ipairs(errs) do cmd[#cmd + 1] = p[1]; cmd[#cmd + 1] = p[2] end
        cmds[#cmds + 1] = cmd
        cmds[#cmds + 1] = { "EXPIRE", errkey, err_ttl }
      end
      if #dead_ids > 0 then
        local cmd = { "HDEL", errkey }
        for _, id in ipairs(dead_ids) do cmd[#cmd + 1] = id end
        cmds[#cmds + 1] = cmd
      end
      if ctl:pipeline(cmds) then
        backlog, errs, dead_ids = {}, {}, {}
        return true
      end
      if not give_up or give_up() then return false end
      sleep_retry(ctl)
    end
  end

  -- Every claim_idle / 3, resets the idle time of the entries this
  -- process still holds (XCLAIM ... JUSTID keeps their delivery count),
  -- so that other consumers reclaim only the entries of a dead one even
  -- when an entry takes longer than claim_idle to go through.
  local next_beat = workerpool.now() + e.claim_idle / 3
  function S.tick()
    local t = workerpool.now()
    if t < next_beat then return end
    next_beat = t + e.claim_idle / 3
    local cmd = { "XCLAIM", e.stream, e.group, consumer, 0 }
    for id in pairs(S.inflight) do
      cmd[#cmd + 1] = id
      if #cmd >= 4000 then break end -- lredis.c takes 4096 arguments
    end
    if #cmd == 5 then return end
    cmd[#cmd + 1] = "JUSTID"
    ctl:call(table.unpack(cmd))
  end

  function S.close()
    rd:close()
    ctl:close()
  end
  return S
end

-- ---- sink and dead letter --------------------------------------------------

local function field_value(v)
  if math.type(v) == "float" then return string.format("%.17g", v) end
  return tostring(v)
end

-- M.sink(e) -> sink: command(item) -> XADD command | nil, error;
-- write(cmds, give_up) -> replies | nil, message; close().
function M.sink(e)
  local c = redis.client(e.url)
  local W = {}
  function W.command(item)
    if type(item) ~= "table" then
      return nil, "the redis-stream sink takes tables of string or number fields, got a "
        .. type(item)
    end
    local keys = {}
    for k, v in pairs(item) do
      if type(k) ~= "string" then
        return nil, "the redis-stream sink takes string field names, got a " .. type(k)
      end
      local tv = type(v)
      if tv ~= "string" and tv ~= "number" then
        return nil, string.format("field %q is a %s (the redis-stream sink takes strings "
          .. "and numbers)", k, tv)
      end
      keys[#keys + 1] = k
    end
    if #keys == 0 then return nil, "the redis-stream sink cannot write an item with no fields" end
    table.sort(keys)
    local cmd = { "XADD", e.stream }
    if e.maxlen then
      cmd[3], cmd[4], cmd[5] = "MAXLEN", "~", e.maxlen
    end
    cmd[#cmd + 1] = "*"
    for _, k in ipairs(keys) do
      cmd[#cmd + 1] = k
      cmd[#cmd + 1] = field_value(item[k])
    end
    return cmd
  end
  -- Retries while Redis is unreachable, until give_up() says stop.
  function W.write(cmds, give_up)
    while true do
      local r, err = c:pipeline(cmds)
      if r then return r end
      if give_up() then return nil, err end
      sleep_retry(c)
    end
  end
  function W.close() c:close() end
  return W
end

return M
