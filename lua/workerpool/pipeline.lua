-- workerpool.pipeline: config-driven pipelines (docs/pipelines.md).
--
--   pipeline.check(config)         -> true | nil, {error strings}
--   pipeline.run(config [, opts])  -> report | nil, message
--
-- A pipeline reads items from a source on the calling (host) state, passes
-- them through stages, each on its own pool "<pipeline>.<stage>", and hands
-- what comes out to a sink on the host.  The host moves batches of items
-- between stages: every stage keeps a FIFO of batches in flight whose
-- length is bounded by its `queue`, and a stage's outputs are only taken
-- when the next stage has room, so a slow stage holds back the ones before
-- it and finally the source (backpressure, bounded memory).  Batches leave
-- every stage in the order they entered it, so outputs keep source order
-- and the checkpoint is simply "everything before the oldest item still
-- inside".  Waiting is f:wait and workerpool.sleep, so under `wpool run`
-- only the calling coroutine waits; in plain lua5.4 the thread blocks.
--
-- Worker side: each stage pool's init loads the stage module and defines
-- the task functions of WORKER_CODE below; a map batch returns its outputs,
-- the index of the input each came from, and the per-item errors (caught
-- with xpcall and a traceback), so one bad item does not cost its batch.
-- A batch past its deadline (timeout x items) is split into single items
-- to find the one that hangs.

local workerpool = require "workerpool"
local RS = require "workerpool.redis_stream"
local json = workerpool.json
local null = json.null

local M = {}

local DICT = "wpool.pipeline"
local LOG = workerpool["pipeline.log"] -- log(level, event, fields), C side

-- ---- small helpers --------------------------------------------------------

local function log(level, event, fields)
  if LOG then LOG(level, event, fields) end
end

local function dirname(p)
  return p:match("^(.*)/[^/]*$") or "."
end

local function resolve(base, p)
  if p == "-" or p:sub(1, 1) == "/" or base == "." then return p end
  return base .. "/" .. p
end

local function file_exists(p)
  local f = io.open(p, "r")
  if f then f:close() return true end
  return false
end

local function levenshtein(a, b)
  local prev, cur = {}, {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    cur[0] = i
    for j = 1, #b do
      local cost = a:byte(i) == b:byte(j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev, cur = cur, prev
  end
  return prev[#b]
end

local function suggest(key, known)
  local best, bestd
  for k in pairs(known) do
    local d = levenshtein(key, k)
    if d <= 2 and d < #k and (not bestd or d < bestd or (d == bestd and k < best)) then
      best, bestd = k, d
    end
  end
  return best
end

local function is_int(v) return math.type(v) == "integer" end
local function is_num(v)
  return type(v) == "number" and v == v and v ~= math.huge and v ~= -math.huge
end

-- ---- configuration ------------------------------------------------------

local TOP = { name = true, source = true, stages = true, sink = true, dead_letter = true,
              ordered = true, checkpoint = true, description = true }
local STAGE = { name = true, kind = true, module = true, handler = true, init = true, add = true,
                merge = true, finish = true, workers = true, queue = true, batch = true,
                timeout = true, retries = true, on_error = true, policies = true, tenant = true,
                fuse = true }
local REDUCE_FNS = { "init", "add", "merge", "finish" }
local SOURCES = { lines = { path = true }, jsonl = { path = true },
                  lua = { module = true, ["function"] = true },
                  ["redis-stream"] = RS.SOURCE_KEYS }
local SINKS = { lines = { path = true }, jsonl = { path = true },
                lua = { module = true, ["function"] = true }, null = {},
                ["redis-stream"] = RS.SINK_KEYS }
local DEAD = { jsonl = { path = true }, ["redis-stream"] = RS.SINK_KEYS }
local POLICIES = {
  ["tenant.bucket"] = { rate = true, burst = true, overrides = true, default = true,
                        capacity = true, redis = true, key_prefix = true,
                        on_unavailable = true },
  ["tenant.concurrency"] = { limit = true, overrides = true, capacity = true },
  breaker = { name = true, consecutive_failures = true, window = true, failure_rate = true,
              min_calls = true, slow_call_s = true, slow_call_rate = true, open_timeout = true,
              max_open_timeout = true, half_open_max = true, fallback = true, capacity = true },
}

-- Reads and decodes a config; returns the table, its folder and the name
-- used in messages, or nil and a list with the one syntax error.
local function load_config(config)
  if type(config) == "table" then return config, ".", "config" end
  if type(config) ~= "string" then
    error("bad argument #1 (config table or path to a JSON file expected)", 3)
  end
  local f, err = io.open(config, "rb")
  if not f then return nil, { string.format("%s: cannot open: %s", config, err) } end
  local text = f:read("a")
  f:close()
  local v, jerr = json.decode(text)
  if v == nil then return nil, { config .. ":" .. jerr } end
  return v, dirname(config), config
end

-- Validates cfg; returns a normalized plan or nil and the list of errors.
local function validate(cfg, base, fname)
  local errs = {}
  local function err(ptr, msg)
    if ptr == "" then
      errs[#errs + 1] = string.format("%s: %s", fname, msg)
    else
      errs[#errs + 1] = string.format("%s: %s: %s", fname, ptr, msg)
    end
  end
  local function keys(t, known, ptr)
    local list = {}
    for k in pairs(t) do list[#list + 1] = k end
    table.sort(list, function(a, b) return tostring(a) < tostring(b) end)
    for _, k in ipairs(list) do
      if not known[k] then
        local s = type(k) == "string" and suggest(k, known)
        err(ptr, string.format("unknown key %q%s", tostring(k),
          s and string.format(" (did you mean %q?)", s) or ""))
      end
    end
  end
  local function str(t, k, ptr, required)
    local v = t[k]
    if v == nil then
      if required then err(ptr, string.format("missing required key %q", k)) end
      return nil
    end
    if type(v) ~= "string" or v == "" then
      err(ptr .. "/" .. k, "must be a non-empty string")
      return nil
    end
    return v
  end
  local function posint(t, k, ptr, default, zero_ok)
    local v = t[k]
    local what = zero_ok and "must be a non-negative integer" or "must be a positive integer"
    if v == nil then return default end
    if not is_int(v) and not (is_num(v) and v == math.floor(v) and math.abs(v) < 2^53) then
      err(ptr .. "/" .. k, what)
      return default
    end
    v = math.tointeger(v)
    if v < (zero_ok and 0 or 1) then
      err(ptr .. "/" .. k, what)
      return default
    end
    return v
  end
  if type(cfg) ~= "table" or (cfg[1] ~= nil) then
    err("", "the config must be a JSON object")
    return nil, errs
  end
  keys(cfg, TOP, "")
  local plan = { base = base, file = fname, stages = {} }
  plan.name = str(cfg, "name", "", true)
  if plan.name and not plan.name:match("^[%w_%-]+$") then
    err("/name", "must be letters, digits, '_' or '-'")
  end
  if cfg.ordered ~= nil and type(cfg.ordered) ~= "boolean" then
    err("/ordered", "must be true or false")
  end
  plan.ordered = cfg.ordered == true
  if cfg.description ~= nil and type(cfg.description) ~= "string" then
    err("/description", "must be a string")
  end
  local cp = str(cfg, "checkpoint", "", false)
  plan.checkpoint = cp and resolve(base, cp)
  local function endpoint(t, ptr, types, what, required)
    if t == nil then
      if required then err("", string.format("missing required key %q", what)) end
      return nil
    end
    if type(t) ~= "table" or t[1] ~= nil or (next(t) == nil and false) then
      err(ptr, "must be an object") return nil
    end
    local ty = t.type
    if ty == nil then err(ptr, 'missing required key "type"') return nil end
    if type(ty) ~= "string" or not types[ty] then
      local names = {}
      for k in pairs(types) do names[#names + 1] = k end
      table.sort(names)
      local s = type(ty) == "string" and suggest(ty, types)
      err(ptr .. "/type", string.format("unknown %s type %q (one of %s)%s", what, tostring(ty),
        table.concat(names, ", "), s and string.format(' (did you mean %q?)', s) or ""))
      return nil
    end
    local known = { type = true }
    for k in pairs(types[ty]) do known[k] = true end
    keys(t, known, ptr)
    local e = { type = ty }
    if ty == "redis-stream" then RS.check(what, t, ptr, err, e, str) end
    if types[ty].path then
      local p = str(t, "path", ptr, true)
      e.path = p and resolve(base, p)
    end
    if types[ty].module then
      local m = str(t, "module", ptr, true)
      e.fn = str(t, "function", ptr, true)
      e.module = m and resolve(base, m)
      if e.module and not file_exists(e.module) then
        err(ptr .. "/module", string.format("cannot read module file %q", e.module))
        e.module = nil
      end
    end
    return e
  end
  plan.source = endpoint(cfg.source, "/source", SOURCES, "source", true)
  plan.sink = endpoint(cfg.sink, "/sink", SINKS, "sink", true)
  plan.dead_letter = endpoint(cfg.dead_letter, "/dead_letter", DEAD, "dead_letter", false)
  local stages = cfg.stages
  if stages == nil then
    err("", 'missing required key "stages"')
  elseif type(stages) ~= "table" or (next(stages) ~= nil and stages[1] == nil) then
    err("/stages", "must be an array of stage objects")
  elseif stages[1] == nil then
    err("/stages", "must not be empty")
  else
    local seen = {}
    for i, s in ipairs(stages) do
      local ptr = "/stages/" .. (i - 1)
      if type(s) ~= "table" or s[1] ~= nil then
        err(ptr, "must be an object")
      else
        keys(s, STAGE, ptr)
        local st = { index = i, ptr = ptr }
        st.name = str(s, "name", ptr, true)
        if st.name then
          if not st.name:match("^[%w_%-]+$") then
            err(ptr .. "/name", "must be letters, digits, '_' or '-'")
          elseif seen[st.name] then
            err(ptr .. "/name", string.format("duplicate stage name %q (also /stages/%d)",
              st.name, seen[st.name] - 1))
          end
          seen[st.name] = seen[st.name] or i
        end
        st.kind = s.kind or "map"
        if st.kind ~= "map" and st.kind ~= "reduce" then
          err(ptr .. "/kind", string.format('must be "map" or "reduce", got %q', tostring(s.kind)))
          st.kind = "map"
        end
        local m = str(s, "module", ptr, true)
        st.module = m and resolve(base, m)
        if st.module and not file_exists(st.module) then
          err(ptr .. "/module", string.format("cannot read module file %q", st.module))
          st.module_missing = true
        end
        if st.kind == "map" then
          st.handler = str(s, "handler", ptr, true)
          for _, k in ipairs(REDUCE_FNS) do
            if s[k] ~= nil then err(ptr .. "/" .. k, 'only reduce stages take "' .. k .. '"') end
          end
        else
          if s.handler ~= nil then
            err(ptr .. "/handler",
              'a reduce stage takes init, add, merge and finish, not "handler"')
          end
          for _, k in ipairs(REDUCE_FNS) do
            if s[k] == nil then
              err(ptr, string.format('a reduce stage needs "%s"', k))
            else
              st[k] = str(s, k, ptr, true)
            end
          end
          if s.policies ~= nil then err(ptr .. "/policies", "policies apply to map stages only") end
        end
        st.workers = posint(s, "workers", ptr, 1)
        if st.workers > 10000 then err(ptr .. "/workers", "must be at most 10000") end
        st.queue = posint(s, "queue", ptr, 1024)
        st.batch = posint(s, "batch", ptr, 1)
        st.retries = posint(s, "retries", ptr, 0, true)
        if s.timeout ~= nil then
          if not is_num(s.timeout) or s.timeout <= 0 then
            err(ptr .. "/timeout", "must be a positive number of seconds")
          else
            st.timeout = s.timeout + 0.0
          end
        end
        local oe = s.on_error
        if oe == nil then
          st.on_error = cfg.dead_letter ~= nil and "dead_letter" or "fail"
        elseif oe ~= "dead_letter" and oe ~= "skip" and oe ~= "fail" then
          err(ptr .. "/on_error", string.format('must be "dead_letter", "skip" or "fail", got %s',
            json.encode(oe) or tostring(oe)))
        elseif oe == "dead_letter" and cfg.dead_letter == nil then
          err(ptr .. "/on_error", '"dead_letter" needs a top-level "dead_letter"')
        else
          st.on_error = oe
        end
        if s.tenant ~= nil then st.tenant = str(s, "tenant", ptr, false) end
        if s.policies ~= nil and st.kind == "map" then
          if type(s.policies) ~= "table" or (next(s.policies) ~= nil and s.policies[1] == nil) then
            err(ptr .. "/policies", "must be an array of policy objects")
          else
            st.policies = {}
            for j, p in ipairs(s.policies) do
              local pp = ptr .. "/policies/" .. (j - 1)
              if type(p) ~= "table" or p[1] ~= nil then
                err(pp, "must be an object")
              elseif type(p.use) ~= "string" or not POLICIES[p.use] then
                local s2 = type(p.use) == "string" and suggest(p.use, POLICIES)
                err(pp .. "/use", string.format(
                  'unknown policy %s (one of "tenant.bucket", "tenant.concurrency", "breaker")%s',
                  p.use == nil and "(missing)" or string.format("%q", tostring(p.use)),
                  s2 and string.format(' (did you mean %q?)', s2) or ""))
              else
                local known = { use = true }
                for k in pairs(POLICIES[p.use]) do known[k] = true end
                keys(p, known, pp)
                local opts = {}
                for k, v in pairs(p) do if k ~= "use" and known[k] then opts[k] = v end end
                if p.use == "breaker" then
                  if opts.fallback ~= nil and type(opts.fallback) ~= "string" then
                    err(pp .. "/fallback", "must be the name of a function of the stage module")
                  end
                  st.fallback = type(opts.fallback) == "string" and opts.fallback or nil
                  opts.fallback = nil
                  opts.name = opts.name or ((plan.name or "pipeline") .. "." .. (st.name or i))
                end
                -- Build it once now, so that bad options show up here.
                local mod = p.use == "breaker" and workerpool.breaker or workerpool.tenant
                local ctor = p.use == "breaker" and mod.new or
                  (p.use == "tenant.bucket" and mod.bucket or mod.concurrency)
                local ok, e = pcall(ctor, opts)
                if not ok then
                  err(pp, (tostring(e):gsub("^[^:]*:%d+: ", "")))
                else
                  st.policies[#st.policies + 1] = { use = p.use, opts = opts }
                end
              end
            end
            if st.tenant == nil then
              for _, p in ipairs(st.policies) do
                if p.use:match("^tenant%.") then
                  err(ptr, '"' .. p.use .. '" needs "tenant", the item field that holds the tenant')
                  break
                end
              end
            end
          end
        end
        if s.fuse ~= nil and type(s.fuse) ~= "boolean" then
          err(ptr .. "/fuse", "must be true or false")
        end
        st.fuse = s.fuse == true
        st.raw = s
        plan.stages[i] = st
      end
    end
    -- Fusion: a stage with "fuse" runs in the tasks of the stage before it.
    for i, st in ipairs(plan.stages) do
      local prev = plan.stages[i - 1]
      if st.fuse then
        if not prev then
          err(st.ptr .. "/fuse", "the first stage has no stage before it to fuse with")
        elseif prev.kind ~= "map" then
          err(st.ptr .. "/fuse", "cannot fuse with a reduce stage")
        elseif prev.policies or st.policies then
          err(st.ptr .. "/fuse", "stages with policies cannot be fused")
        end
        for _, k in ipairs{ "workers", "queue", "batch" } do
          if st.raw[k] ~= nil then
            err(st.ptr .. "/" .. k, "a fused stage runs in the tasks of the stage before it " ..
              "(set it there)")
          end
        end
      end
      local next_st = plan.stages[i + 1]
      if (st.fuse or (next_st and next_st.fuse)) and st.raw.timeout ~= nil then
        err(st.ptr .. "/timeout", "not supported on fused stages")
      end
      st.raw = nil
    end
  end
  if plan.source and plan.source.type == "redis-stream" then
    if cfg.checkpoint ~= nil then
      err("/checkpoint", "not used with a redis-stream source (the consumer group keeps " ..
        "the position)")
    end
    for _, st in ipairs(plan.stages) do
      if st.kind == "reduce" then
        err(st.ptr .. "/kind", "a reduce stage never finishes on a redis-stream source " ..
          "(it has no end)")
      end
    end
  end
  if #errs > 0 then return nil, errs end
  return plan
end

-- The code each stage pool's init runs after loading the module into
-- __wp_m (the task functions; see the header).
local WORKER_CODE = [==[
local wp = require "workerpool"
local m, tb, select, xpcall = __wp_m, debug.traceback, select, xpcall
local pack, unpack, split = wp["pipeline.pack"], wp["pipeline.unpack"], wp["pipeline.split"]
local decode = wp.json.decode
local outs, from, errs, no
-- The items of a task: a list as it is, a string packed by the stage
-- before, or (raw) a block of source lines to split, JSON ones to decode
-- (the host checked that each decodes) when raw is "json".
local function items_in(items, raw)
  if type(items) ~= "string" then return items end
  if not raw then return (unpack(items)) end
  local t, n = split(items)
  if raw == "json" then
    for i = 1, n do
      local v, e = decode(t[i])
      if v == nil then error("jsonl source: " .. tostring(e), 0) end
      t[i] = v
    end
  end
  return t
end
local function put(i, ok, ...)
  if not ok then
    errs = errs or {}
    errs[i] = tostring((...))
    return
  end
  local n = select("#", ...)
  if n == 1 then
    local v = ...
    if v ~= nil then no = no + 1; outs[no] = v; from[no] = i end
  else
    for k = 1, n do
      local v = select(k, ...)
      if v ~= nil then no = no + 1; outs[no] = v; from[no] = i end
    end
  end
end
-- items and raw: see items_in.  Returns the
-- outputs (packed when packout and they are plain data), the index of the
-- input each came from (nil when it is output k from input k, all kept),
-- and the errors by input index.
function __wp_map(name, items, packout, raw)
  items = items_in(items, raw)
  local h = m[name]
  local n = #items
  outs, from, errs, no = {}, {}, nil, 0
  for i = 1, n do put(i, xpcall(h, tb, items[i])) end
  local o, f, e = outs, from, errs
  outs, from, errs = nil, nil, nil
  if no == n then
    local same = true
    for k = 1, n do if f[k] ~= k then same = false break end end
    if same then f = nil end
  end
  if packout then o = pack(o, no) or o end
  return o, f, e
end
function __wp_one(name, item)
  return table.pack(m[name](item))
end
local acc
function __wp_add(items, key, raw)
  items = items_in(items, raw)
  local add, e = m[__wp_fns.add], nil
  local d = key and wp.shared("wpool.pipeline")
  if acc == nil then acc = m[__wp_fns.init]() end
  for i = 1, #items do
    local ok, r = xpcall(add, tb, acc, items[i])
    if not ok then
      e = e or {}
      e[i] = tostring(r)
    elseif r == nil then
      e = e or {}
      e[i] = "add returned nil (it must return the accumulator)"
    else
      acc = r
    end
    if d then d:set(key, i) end
  end
  return e
end
-- A fused group (docs/pipelines.md, Fusion): every item goes through the
-- stages __wp_chain_def[1..n] (modules __wp_mods[j]) in this task, with
-- the retries of each stage; a reduce at the end adds into the chain's
-- accumulator.  Returns the outputs of the last map stage (packed when
-- packout), the input index each came from, the failures {j, i, attempts,
-- error, item} and counts per stage {in, out, ok, dropped, retried}.
--
-- The runner is Lua code generated for the group's stages when the first
-- batch comes (CHAIN below, with `fast` written out stage by stage): a
-- batch runs under one xpcall, not one per item, with the counts of the
-- common path in a flat array.  When a stage raises, cur_i, cur_j and
-- cur_v say which item, stage and input, and feed takes over from that
-- failed first attempt with the stage's retries, then fast goes on with
-- the next item; a fan-out (more than one result) goes on through feed.
local results = wp["pipeline.results"]
local CHAIN = [=[
local def, mods, results, tb, xpcall, tostring, error = ...
local last = #def
local fn = {}
for j = 1, last do fn[j] = mods[j][def[j].reduce and def[j].add or def[j].handler] end
local acc, o, f, no, recs, counts
local cur_i, cur_j, cur_v, pend
local K = {}
local feed
-- spread(j, i, n, x): stage j's n results for item i (x: the one, or a
-- list of n) go on to stage j + 1 or out; nils are dropped.
local function spread(j, i, n, x)
  local c, made = counts[j], 0
  for k = 1, n do
    local y = x
    if n > 1 then y = x[k] end
    if y ~= nil then
      made = made + 1
      if j == last then
        no = no + 1
        o[no], f[no] = y, i
      else
        feed(j + 1, i, y)
      end
    end
  end
  c[2] = c[2] + made
  if made == 0 then c[4] = c[4] + 1 end
end
local function finished(j, i, ok, ...)
  if not ok then return false, (...) end
  counts[j][3] = counts[j][3] + 1
  spread(j, i, results(...))
  return true
end
-- feed(j, i, v [, e1]): item i's value v into stage j, with its retries;
-- e1: stage j already counted v in and its first attempt raised e1.
feed = function(j, i, v, e1)
  local d, c = def[j], counts[j]
  local attempts, e, ok = 0, nil, nil
  if e1 ~= nil then
    attempts, e = 1, e1
  else
    c[1] = c[1] + 1
  end
  while attempts == 0 or attempts <= d.retries do
    if attempts > 0 then c[5] = c[5] + 1 end
    attempts = attempts + 1
    if d.reduce then
      if acc == nil then acc = mods[j][d.init]() end -- unprotected
      local r
      ok, r = xpcall(fn[j], tb, acc, v)
      if ok and r == nil then
        ok, r = false, "add returned nil (it must return the accumulator)"
      end
      if ok then
        acc = r
        c[3] = c[3] + 1
        return
      end
      e = r
    else
      ok, e = finished(j, i, xpcall(fn[j], tb, v))
      if ok then return end
    end
  end
  recs = recs or {}
  recs[#recs + 1] = { j, i, attempts, tostring(e), v }
end
local fast
@FAST@
local function batch(items)
  local n = #items
  counts = {}
  for j = 1, last do counts[j] = { 0, 0, 0, 0, 0 } end
  for q = 1, 4 * last do K[q] = 0 end
  o, f, no, recs = {}, {}, 0, nil
  local i = 1
  while i <= n do
    cur_j, pend = nil, nil
    local ok, r = xpcall(fast, tb, items, i, n)
    if not ok then
      if cur_j == nil then error(r, 0) end -- not a stage's error
      feed(cur_j, cur_i, cur_v, r)
      i = cur_i + 1
    elseif r then -- item r needs feed: the reduce's init, or add gave nil
      local p = pend
      pend = nil
      if p == "init" then feed(cur_j, r, cur_v) else feed(cur_j, r, cur_v, p) end
      i = r + 1
    else
      break
    end
  end
  for j = 1, last do
    local c, b = counts[j], 4 * (j - 1)
    c[1], c[2] = c[1] + K[b + 1], c[2] + K[b + 2]
    c[3], c[4] = c[3] + K[b + 3], c[4] + K[b + 4]
  end
  local oo, ff, rr, nn = o, f, recs, no
  o, f, recs = nil, nil, nil
  return oo, ff, rr, counts, nn
end
local function take_acc()
  local a = acc
  acc = nil
  return a
end
return batch, take_acc
]=]
-- The source of fast(items, i, n): items i..n through the chain, the
-- counts of stage j in K[4j-3 .. 4j] (in, out, ok, dropped).  Returns
-- nothing at the end, or the index of an item the reduce could not take
-- here (pend says why); raises a stage's error with cur_* set.
local function chain_fast(def)
  local b = { "fast = function(items, i, n)", "local F = fn", "local v, x, k",
              "while i <= n do", "v = items[i]", "cur_i = i" }
  local function add(fmt, ...) b[#b + 1] = string.format(fmt, ...) end
  for j = 1, #def do
    local q = 4 * (j - 1)
    add("K[%d] = K[%d] + 1", q + 1, q + 1)
    add("cur_j, cur_v = %d, v", j)
    if def[j].reduce then
      add("if acc == nil then K[%d] = K[%d] - 1 pend = 'init' return i end", q + 1, q + 1)
      add("x = F[%d](acc, v)", j)
      add("if x == nil then pend = %q return i end",
          "add returned nil (it must return the accumulator)")
      add("acc = x")
      add("K[%d] = K[%d] + 1", q + 3, q + 3)
      add("goto next")
    else
      add("k, x = results(F[%d](v))", j)
      add("K[%d] = K[%d] + 1", q + 3, q + 3)
      add("if k > 1 then cur_j = nil spread(%d, i, k, x) goto next end", j)
      add("if x == nil then K[%d] = K[%d] + 1 goto next end", q + 4, q + 4)
      add("K[%d] = K[%d] + 1", q + 2, q + 2)
      if j == #def then
        add("no = no + 1")
        add("o[no], f[no] = x, i")
      else
        add("v = x")
      end
    end
  end
  b[#b + 1] = "::next::"
  b[#b + 1] = "i = i + 1"
  b[#b + 1] = "end"
  b[#b + 1] = "end"
  return table.concat(b, "\n")
end
local chain_batch, chain_acc
function __wp_chain(items, packout, raw)
  items = items_in(items, raw)
  if not chain_batch then
    local src = CHAIN:gsub("@FAST@", function() return chain_fast(__wp_chain_def) end)
    -- (the group's init has its own local `load`)
    chain_batch, chain_acc = assert(_ENV.load(src, "=(pipeline chain)"))(
      __wp_chain_def, __wp_mods, results, tb, xpcall, tostring, error)
  end
  local o, f, recs, counts, no = chain_batch(items)
  if packout then o = pack(o, no) or o end
  return o, f, recs, counts
end
function __wp_collect(key, n)
  local d = wp.shared("wpool.pipeline")
  d:incr(key, 1, 0)
  local t0 = wp.now()
  while (d:get(key) or 0) < n do
    if wp.now() - t0 > 60 then error("reduce: not every worker reported its accumulator", 0) end
    wp.sleep(0.0005)
  end
  if chain_acc then return chain_acc() end
  local a = acc
  acc = nil
  return a
end
function __wp_finish(accs)
  local a = accs[1]
  if a == nil then a = m[__wp_fns.init]() end
  for i = 2, #accs do a = m[__wp_fns.merge](a, accs[i]) end
  return table.pack(m[__wp_fns.finish](a))
end
function __wp_fields()
  local t = {}
  for k, v in pairs(m) do
    if type(k) == "string" and type(v) == "function" then t[k] = true end
  end
  return t
end
]==]

local function init_code(plan, module, fns)
  local dir = dirname(module)
  return string.format([[
package.path = %q .. package.path
local f, err = loadfile(%q)
if not f then error(err, 0) end
__wp_m = f()
if type(__wp_m) ~= "table" then
  error(%q .. ": the module must return a table of functions", 0)
end
__wp_fns = %s
]], dir .. "/?.lua;" .. dir .. "/?/init.lua;" .. plan.base .. "/?.lua;", module, module,
    "{" .. (fns or "") .. "}") .. WORKER_CODE
end

-- The init of a fused group's pool: every module of the group, the chain,
-- and the reduce at its end (if any) as __wp_m / __wp_fns.
local function group_init_code(plan, group)
  local dirs, loads, defs = {}, {}, {}
  for j, st in ipairs(group) do
    local dir = dirname(st.module)
    dirs[#dirs + 1] = dir .. "/?.lua;" .. dir .. "/?/init.lua;"
    loads[j] = string.format("load(%q)", st.module)
    if st.kind == "reduce" then
      defs[j] = string.format("{ reduce = true, init = %q, add = %q, retries = %d }",
        st.init, st.add, st.retries)
    else
      defs[j] = string.format("{ handler = %q, retries = %d }", st.handler, st.retries)
    end
  end
  local tail = group[#group]
  return string.format([[
package.path = %q .. package.path
local function load(path)
  local f, err = loadfile(path)
  if not f then error(err, 0) end
  local m = f()
  if type(m) ~= "table" then error(path .. ": the module must return a table of functions", 0) end
  return m
end
__wp_mods = { %s }
__wp_chain_def = { %s }
__wp_m = __wp_mods[#__wp_mods]
__wp_fns = { %s }
]], table.concat(dirs) .. plan.base .. "/?.lua;", table.concat(loads, ", "),
    table.concat(defs, ", "), tail.kind == "reduce" and string.format(
      "init=%q, add=%q, merge=%q, finish=%q", tail.init, tail.add, tail.merge, tail.finish) or "")
    .. WORKER_CODE
end

local function fns_literal(st)
  if st.kind ~= "reduce" then return "" end
  return string.format("init=%q, add=%q, merge=%q, finish=%q", st.init, st.add, st.merge, st.finish)
end

-- Loads every stage module in a scratch pool and checks the names.
-- keep: a list that takes the scratch pools instead of stopping them (a
-- stopped pool would make /readyz answer 503 for the whole run).
local function check_modules(plan, errs, keep)
  local cache = {}
  local function fields_of(module)
    if cache[module] == nil then
      local ok, p = pcall(workerpool.new, { max_workers = 1, init = init_code(plan, module) })
      if not ok then
        local msg = tostring(p):gsub("^workerpool.new: init failed: ", ""):gsub("\n.*", "")
        cache[module] = { err = msg }
      else
        local ok2, t = pcall(p.submit_wait, p, "__wp_fields")
        if keep then keep[#keep + 1] = p else p:stop() end
        cache[module] = ok2 and { fields = t } or { err = tostring(t) }
      end
    end
    return cache[module]
  end
  local function need(ptr, module, name, key)
    local r = fields_of(module)
    if r.err then return false end
    if not r.fields[name] then
      errs[#errs + 1] = string.format("%s: %s/%s: the module %q defines no function %q",
        plan.file, ptr, key, module, name)
    end
    return true
  end
  for _, st in ipairs(plan.stages) do
    if st.module and not st.module_missing then
      local r = fields_of(st.module)
      if r.err then
        errs[#errs + 1] = string.format("%s: %s/module: cannot load: %s", plan.file, st.ptr, r.err)
      elseif st.kind == "map" then
        need(st.ptr, st.module, st.handler, "handler")
        if st.fallback then need(st.ptr, st.module, st.fallback, "policies") end
      else
        for _, k in ipairs(REDUCE_FNS) do need(st.ptr, st.module, st[k], k) end
      end
    end
  end
end

-- Loads a host-side module (lua source or sink): its function, or nil, err.
local function host_function(plan, e, ptr)
  local dir = dirname(e.module)
  local saved = package.path
  package.path = dir .. "/?.lua;" .. plan.base .. "/?.lua;" .. package.path
  local ok, m = pcall(dofile, e.module)
  package.path = saved
  if not ok then
    return nil, string.format("%s: %s/module: cannot load: %s", plan.file, ptr, tostring(m))
  end
  if type(m) ~= "table" then
    return nil, string.format("%s: %s/module: the module must return a table of functions",
      plan.file, ptr)
  end
  if type(m[e.fn]) ~= "function" then
    return nil, string.format("%s: %s/function: the module %q defines no function %q",
      plan.file, ptr, e.module, e.fn)
  end
  return m[e.fn]
end

local function prepare(config, keep)
  local cfg, base, fname = load_config(config)
  if cfg == nil then return nil, base end -- a JSON false is a config too (a bad one)
  local plan, errs = validate(cfg, base, fname)
  errs = errs or {}
  if plan then
    check_modules(plan, errs, keep)
    for _, k in ipairs{ "source", "sink" } do
      local e = plan[k]
      if e and e.type == "lua" and e.module then
        local fn, ferr = host_function(plan, e, "/" .. k)
        if fn then e.call = fn else errs[#errs + 1] = ferr end
      end
    end
  end
  if #errs > 0 then return nil, errs end
  return plan
end

function M.check(config)
  local plan, errs = prepare(config)
  if not plan then return nil, errs end
  return true
end

-- ---- sources and sinks -----------------------------------------------------

-- The seqs of a raw block: seqs[i] is seq0 + i - 1, computed on use.
local SEQS = { __index = function(t, i) return rawget(t, "seq0") + i - 1 end }

local function open_source(plan, skip)
  local src = plan.source
  if src.type == "redis-stream" then return RS.source(src) end
  if src.type == "lua" then
    local ok, it = pcall(src.call)
    if not ok then return nil, "source: " .. tostring(it) end
    if type(it) ~= "function" then
      return nil, "source: the function must return an iterator function"
    end
    local n = 0
    local function read()
      local ok2, v = pcall(it)
      if not ok2 then error("source: " .. tostring(v), 0) end
      if v ~= nil then n = n + 1 end
      return v
    end
    for _ = 1, skip do if read() == nil then break end end
    return { read = read, close = function() end }
  end
  local fh, err
  if src.path == "-" then fh = io.stdin else fh, err = io.open(src.path, "rb") end
  if not fh then return nil, "cannot open source: " .. tostring(err) end
  local jsonl = src.type == "jsonl"
  if src.path ~= "-" then
    -- A file goes to stage 1 in raw blocks of whole lines (see
    -- read_source): block(k) -> the next k lines as one string and their
    -- count (fewer at the end), or nil at the end of the file; it raises
    -- on a read error.  For jsonl, k items: blank lines are left out, and
    -- so are lines that are not JSON, listed in a third result.
    local block = workerpool["pipeline.lines"](fh, jsonl and "jsonl" or "lines")
    local left = skip
    while left > 0 do
      local ok, b, n = pcall(block, math.min(left, 65536))
      if not ok then
        fh:close()
        return nil, "source: " .. tostring(b)
      end
      if not b then break end
      left = left - n
    end
    return { block = block, jsonl = jsonl, close = function() fh:close() end }
  end
  local function rawline()
    local l = fh:read("l")
    if jsonl then
      while l and l:match("^%s*$") do l = fh:read("l") end
    end
    return l
  end
  for _ = 1, skip do if rawline() == nil then break end end
  return {
    read = rawline, jsonl = jsonl,
    close = function() if fh ~= io.stdin then fh:close() end end,
  }
end

local function open_writer(path, append)
  if path == "-" then return io.stdout end
  return io.open(path, append and "ab" or "wb")
end

-- ---- the runner ------------------------------------------------------------

local function new_counts()
  return { ["in"] = 0, out = 0, ok = 0, dropped = 0, errors = 0, retried = 0,
           dead_lettered = 0, skipped = 0, failed = 0, abandoned = 0, redelivered = 0 }
end

local function read_checkpoint(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local v = json.decode(f:read("a") or "")
  f:close()
  if type(v) ~= "table" or not is_int(v.seq) then return nil end
  return v
end

local function write_checkpoint(path, name, seq, complete)
  local tmp = path .. ".tmp"
  local f = io.open(tmp, "wb")
  if not f then return false end
  f:write(json.encode{ pipeline = name, seq = seq, complete = complete }, "\n")
  f:close()
  return os.rename(tmp, path)
end

function M.run(config, opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("bad argument #2 to 'run' (table expected)", 2) end
  local scratch = {} -- the pools check_modules used, stopped at the end
  local plan, errs = prepare(config, scratch)
  if not plan then return nil, table.concat(errs, "\n"), errs end
  local P = plan.name
  local shared = workerpool.shared(DICT)
  local interrupted = opts.interrupted -- internal hook of `wpool pipeline run`
  if not interrupted then
    local flag = 0
    if workerpool.in_host() then workerpool.on_shutdown(function() flag = flag + 1 end) end
    interrupted = function() return flag end
  end
  local drain_timeout = opts.drain_timeout or 25
  local now = workerpool.now

  -- Checkpoint and resume.
  local skip = 0
  if opts.resume then
    if not plan.checkpoint then
      return nil, plan.file .. ': --resume needs "checkpoint" in the config'
    end
    local c = read_checkpoint(plan.checkpoint)
    if c and c.complete then
      local rep = { pipeline = P, status = "done", exit_code = 0, resumed_from = c.seq,
                    already_complete = true, read = 0, written = 0, wall_s = 0.0, stages = {} }
      log("info", "pipeline.done", rep)
      return rep
    end
    skip = c and c.seq or 0
  end

  if plan.checkpoint and not write_checkpoint(plan.checkpoint, P, skip, false) then
    return nil, "cannot write checkpoint " .. plan.checkpoint
  end

  -- Sinks first: an unwritable sink fails before any input is read.
  local append = opts.resume and skip > 0
  local sink = plan.sink
  local out_fh, dl_fh, ferr, rsink, rdl
  if sink.type == "jsonl" or sink.type == "lines" then
    out_fh, ferr = open_writer(sink.path, append)
    if not out_fh then return nil, "cannot open sink: " .. tostring(ferr) end
  elseif sink.type == "redis-stream" then
    rsink = RS.sink(sink)
  end
  if plan.dead_letter and plan.dead_letter.type == "redis-stream" then
    rdl = RS.sink(plan.dead_letter)
  elseif plan.dead_letter then
    dl_fh, ferr = open_writer(plan.dead_letter.path, append)
    if not dl_fh then return nil, "cannot open dead_letter: " .. tostring(ferr) end
  end
  local source, serr = open_source(plan, skip)
  if not source then return nil, serr end
  local stream = source.stream and plan.source -- a redis-stream source

  -- Pools.
  local stages = plan.stages
  local nst = #stages
  local made = {}
  local function stop_all(discard)
    for _, p in ipairs(made) do
      if discard then p:stop() else p:stop_wait() end
    end
  end
  -- Fused groups: a head stage and the "fuse" stages after it share the
  -- head's pool and tasks; outputs of the group leave from the head.
  for si, st in ipairs(stages) do
    st.out_k = si + 1
    if st.fuse then
      local head = stages[si - 1].head or stages[si - 1]
      st.head = head
      head.group = head.group or { head }
      head.group[#head.group + 1] = st
      head.out_k = si + 1
      if st.kind == "reduce" then head.group_reduce = true end
    end
  end
  for _, st in ipairs(stages) do
    st.c = new_counts()
    st.units = {}
    st.h, st.t = 1, 0           -- FIFO of batches in flight: units[h..t]
    st.chunks, st.ch, st.ct = {}, 1, 0 -- what waits to enter: chunks[ch..ct]
    st.np = 0                          -- items in those chunks
    if st.policies then st.batch = 1 end -- one item per task: one tenant
    st.queue = math.max(st.queue, st.batch)
    st.cap = math.max(1, (st.queue + st.batch - 1) // st.batch) + st.workers
    -- Outputs cross to the next stage packed (one string the host does
    -- not open) unless the host needs the items: the sink, or a stage
    -- whose policies read the tenant.
    local nxt = stages[st.out_k]
    st.pack_out = nxt ~= nil and nxt.policies == nil
    local keep = st.kind == "reduce" or st.group_reduce -- accumulators live in the workers
    local ok, pool = true, nil
    if not st.head then
      ok, pool = pcall(workerpool.new, {
        name = P .. "." .. st.name, max_workers = st.workers,
        min_workers = keep and st.workers or 0,
        idle_timeout = keep and -1 or nil,
        init = st.group and group_init_code(plan, st.group) or
               init_code(plan, st.module, fns_literal(st)),
      })
    end
    if st.head then
      st.pool, st.workers = st.head.pool, st.head.workers
    elseif not ok then
      stop_all(true)
      source.close()
      return nil, string.format("stage %s: %s", st.name, tostring(pool))
    end
    if pool then
      made[#made + 1] = pool
      st.pool = pool
    end
    if st.policies then
      for _, p in ipairs(st.policies) do
        local o = {}
        for k, v in pairs(p.opts) do o[k] = v end
        if p.use == "breaker" then
          st.breaker = workerpool.breaker.new(o)
          pool:use(st.breaker)
        elseif p.use == "tenant.bucket" then
          pool:use(workerpool.tenant.bucket(o))
        else
          pool:use(workerpool.tenant.concurrency(o))
        end
      end
      if st.fallback then
        local fok, fb = pcall(workerpool.new, {
          name = P .. "." .. st.name .. ".fallback", max_workers = st.workers,
          init = init_code(plan, st.module, "") })
        if not fok then
          stop_all(true)
          source.close()
          return nil, string.format("stage %s: fallback: %s", st.name, tostring(fb))
        end
        made[#made + 1] = fb
        st.fbpool = fb
      end
    end
  end

  local t0 = now()
  local next_seq = skip + 1     -- seq of the next item read from the source
  local eof = false
  local stop_reading = false
  local failure                  -- message when on_error "fail" triggered
  local abort = false            -- hard stop: stop everything now
  local written, sink_c = 0, new_counts()
  local last_cp = now()
  local dl_count = 0
  local drain_start
  -- A redis-stream source: the entry id and delivery count of each seq,
  -- and the seqs not to acknowledge (left pending for another delivery).
  local ids, dlv, noack, acked, last_ack = {}, {}, {}, skip, now()
  -- Whether a write that waits for Redis should stop waiting.
  local function give_up()
    return abort or interrupted() >= 2
      or (drain_start ~= nil and now() - drain_start > drain_timeout)
  end

  local function dead_letter(stage, seq, attempts, msg, item)
    dl_count = dl_count + 1
    if rdl then
      local text = json.encode(item)
      local rec = { pipeline = P, stage = stage, seq = seq or 0, attempts = attempts,
                    error = msg, item = text or "null", item_text = not text and tostring(item)
                    or nil, id = stream and ids[seq] or nil,
                    deliveries = stream and dlv[seq] or nil }
      local r = rdl.write({ (rdl.command(rec)) }, give_up)
      if not r then
        if seq then noack[seq] = true end
      elseif type(r[1]) == "table" and r[1].error then
        failure = failure or "cannot write a dead letter: " .. r[1].error
        if seq then noack[seq] = true end
      elseif stream and ids[seq] then
        source.dead(ids[seq])
      end
      return
    end
    if stream and ids[seq] then source.dead(ids[seq]) end
    local id, nd = stream and ids[seq] or nil, stream and dlv[seq] or nil
    local line = json.encode{ pipeline = P, stage = stage, seq = seq or null,
                              attempts = attempts, error = msg, item = item,
                              id = id, deliveries = nd }
    if not line then
      line = json.encode{ pipeline = P, stage = stage, seq = seq or null, attempts = attempts,
                          error = msg, item = null, item_text = tostring(item),
                          id = id, deliveries = nd }
    end
    if not dl_fh:write(line, "\n") then failure = failure or "cannot write a dead letter" end
  end

  -- An item failed for good: on_error decides.
  local function item_failed(st, c, seq, attempts, msg, item)
    c.errors = c.errors + 1
    local how = st.on_error
    if stream and ids[seq] and how ~= "skip" then
      noack[seq] = true
      if how == "dead_letter" and (dlv[seq] or 1) < stream.max_deliveries then
        -- Left pending: delivered again (here or elsewhere) after claim_idle.
        c.redelivered = c.redelivered + 1
        source.redeliver(ids[seq], msg)
        return
      end
      if how == "dead_letter" then noack[seq] = nil end
    end
    if how == "dead_letter" then
      c.dead_lettered = c.dead_lettered + 1
      dead_letter(st.name, seq, attempts, msg, item)
    elseif how == "skip" then
      c.skipped = c.skipped + 1
    else
      c.failed = c.failed + 1
      if not failure then
        failure = string.format("stage %s, item %s: %s", st.name, tostring(seq), msg)
      end
    end
  end

  local sink_st = { name = "sink", on_error = plan.dead_letter and "dead_letter" or "fail" }
  local source_st = { name = "source", on_error = sink_st.on_error }
  -- Stream entries delivered too often, without a dead letter: dropped.
  if stream and not plan.dead_letter then source_st.on_error = "skip" end
  local function to_sink(items, seqs, n)
    sink_c["in"] = sink_c["in"] + n
    local t = sink.type
    if rsink then
      local cmds, idx = {}, {}
      for i = 1, n do
        local cmd, e = rsink.command(items[i])
        if cmd then
          cmds[#cmds + 1] = cmd
          idx[#idx + 1] = i
        else
          item_failed(sink_st, sink_c, seqs[i], 1, e, items[i])
        end
      end
      local r = rsink.write(cmds, give_up)
      for k, i in ipairs(idx) do
        local rep = r and r[k]
        if not r then
          noack[seqs[i]] = true -- gave up: left pending, delivered again elsewhere
        elseif type(rep) == "table" and rep.error then
          item_failed(sink_st, sink_c, seqs[i], 1, "XADD: " .. rep.error, items[i])
        else
          sink_c.ok = sink_c.ok + 1
          written = written + 1
        end
      end
      return
    end
    if t == "null" then
      sink_c.ok = sink_c.ok + n
      written = written + n
      return
    end
    for i = 1, n do
      local v = items[i]
      local line, e
      if t == "jsonl" then
        line, e = json.encode(v)
      elseif t == "lines" then
        local ty = type(v)
        if ty == "string" then line = v
        elseif ty == "number" then line = tostring(v)
        else e = "the lines sink takes strings and numbers, got a " .. ty end
      else
        local ok, r = pcall(sink.call, v)
        if not ok then e = tostring(r) else line = true end
      end
      if line then
        if t ~= "lua" and not out_fh:write(line, "\n") then
          failure = failure or "cannot write to the sink"
          return
        end
        sink_c.ok = sink_c.ok + 1
        written = written + 1
      else
        item_failed(sink_st, sink_c, seqs[i], 1, e, v)
      end
    end
  end

  -- Everything before the oldest item still inside has left the pipeline.
  local reduce_holds = false
  local function watermark()
    if reduce_holds then return skip end
    local m = next_seq
    for _, st in ipairs(stages) do
      if st.t >= st.h then
        local u = st.units[st.h]
        if u.seqs[1] < m then m = u.seqs[1] end
      end
      if st.ct >= st.ch then
        local q = st.chunks[st.ch]
        if q.seqs[1] < m then m = q.seqs[1] end
      end
    end
    return m - 1
  end

  -- Acknowledges the entries of a redis-stream source below the watermark
  -- (everything they produced reached the sink or the dead letter), after
  -- flushing the files; at most every 50 ms unless forced.
  local function ack_step(force, until_fn)
    local wm = watermark()
    if wm <= acked and not force then return end
    if not force and now() - last_ack < 0.05 and wm - acked < 512 then return end
    if out_fh then out_fh:flush() end
    if dl_fh then dl_fh:flush() end
    local list = {}
    for s = acked + 1, wm do
      local id = ids[s]
      if id then
        if not noack[s] then list[#list + 1] = id end
        ids[s], dlv[s], noack[s] = nil, nil, nil
      end
    end
    acked = math.max(acked, wm)
    last_ack = now()
    source.ack(list, until_fn)
  end

  local function checkpoint(complete)
    if not plan.checkpoint then return end
    if out_fh then out_fh:flush() end
    if dl_fh then dl_fh:flush() end
    write_checkpoint(plan.checkpoint, P, complete and (next_seq - 1) or watermark(), complete)
    last_cp = now()
  end

  -- Submitting a part of a unit (a batch or a subset of it).
  local unpack, split = workerpool["pipeline.unpack"], workerpool["pipeline.split"]
  local function items_of(u)
    if not u.items and u.raw then
      local t, n = split(u.raw)
      if u.json then
        for i = 1, n do t[i] = assert(json.decode(t[i])) end -- checked on reading
      end
      u.items = t
    elseif not u.items then
      u.items = unpack(u.blob)
    end
    return u.items
  end

  local function submit_part(st, u, idx)
    local items
    if idx then
      items = {}
      local all = items_of(u)
      for k = 1, #idx do items[k] = all[idx[k]] end
    else
      items = u.raw or u.blob or u.items
    end
    local raw = false -- or a raw block: true for lines, "json" for jsonl
    if items == u.raw then raw = u.json and "json" or true end
    local n = idx and #idx or u.n
    local f, e
    if st.kind == "reduce" then
      local key
      if st.timeout then
        key = "p:" .. P .. ":" .. st.name .. ":" .. tostring(u) .. ":" .. tostring(idx)
        shared:set(key, 0)
      end
      f, e = st.pool:submit({ handler = "__wp_add", timeout = st.timeout and st.timeout * n },
                            items, key, raw)
      if f then return { fut = f, idx = idx, key = key, n = n } end
    elseif st.group then
      f, e = st.pool:submit({ handler = "__wp_chain" }, items, st.pack_out, raw)
      if f then return { fut = f, idx = idx, n = n } end
    elseif st.policies then
      local item = items_of(u)[idx and idx[1] or 1]
      local tenant = type(item) == "table" and item[st.tenant] or nil
      tenant = tenant ~= nil and tostring(tenant) or nil
      local desc = { handler = "__wp_one", timeout = st.timeout, tenant = tenant }
      local ename
      f, e, ename = st.pool:submit(desc, st.handler, item)
      if not f and st.fbpool and ename == "EBREAKER_OPEN" then
        f, e, ename = st.fbpool:submit({ handler = "__wp_one", timeout = st.timeout },
                                       st.fallback, item)
      end
      if not f and ename ~= "ESTOPPED" then
        return nil, e -- refused: the caller retries later
      end
      if f then return { fut = f, idx = idx, n = n, one = true } end
    else
      f, e = st.pool:submit({ handler = "__wp_map", timeout = st.timeout and st.timeout * n },
                            st.handler, items, st.pack_out, raw)
      if f then return { fut = f, idx = idx, n = n } end
    end
    abort = true
    return nil, e
  end

  -- A unit: seqs[i] and items[i] for i = 1..n, parts in flight, results.
  local function make_unit(st, q)
    local u = { items = q.items, blob = q.blob, raw = q.raw, json = q.json, seqs = q.seqs,
                n = q.n, parts = {} }
    st.c["in"] = st.c["in"] + u.n
    local part, e = submit_part(st, u, nil)
    if part then
      u.parts[1] = part
    elseif not abort then
      u.refused = e
      u.retry_at = now() + 0.01
    end
    st.t = st.t + 1
    st.units[st.t] = u
    return u
  end

  local function item_res(u)
    if not u.res then
      u.res = {}
      u.att = {}
    end
    return u.res
  end

  -- Records the outcome of one part; returns true when it was consumed.
  local function take_part(st, u, part)
    local c = st.c
    local ok, a, b, e3, e4 = part.fut:wait(0)
    if ok == nil then return false end
    local idx = part.idx
    if ok and st.group then
      -- A fused group: its workers counted and caught errors per stage.
      for j, cs in ipairs(e4) do
        local gc = st.group[j].c
        if j > 1 then gc["in"] = gc["in"] + cs[1] end
        gc.out, gc.ok, gc.dropped = gc.out + cs[2], gc.ok + cs[3], gc.dropped + cs[4]
        gc.retried = gc.retried + cs[5]
      end
      for _, r in ipairs(e3 or {}) do
        local g = st.group[r[1]]
        local i = idx and idx[r[2]] or r[2]
        item_failed(g, g.c, u.seqs[i], r[3], r[4], r[5])
      end
      if not idx and not u.res and #u.parts == 1 then
        u.fast, u.fouts, u.ffrom = true, a, b
        return true
      end
      local res = item_res(u)
      local outs = type(a) == "string" and unpack(a) or a
      for k = 1, part.n do
        local i = idx and idx[k] or k
        res[i] = res[i] or {}
      end
      for k = 1, #outs do
        local r = res[idx and idx[b[k]] or b[k]]
        r[#r + 1] = outs[k]
      end
      return true
    end
    if ok and not idx and not u.res and not part.one and #u.parts == 1 then
      -- The common case: the whole batch ran, no item failed.
      if st.kind == "reduce" and a == nil then
        u.fast = true
        return true
      elseif st.kind == "map" and e3 == nil then
        u.fast, u.fouts, u.ffrom = true, a, b
        return true
      end
    end
    local function gi(k) return idx and idx[k] or k end
    local res = item_res(u)
    local att = u.att
    local function err_item(i, msg)
      att[i] = (att[i] or 0) + 1
      if att[i] <= st.retries then
        c.retried = c.retried + 1
        u.retry = u.retry or {}
        u.retry[#u.retry + 1] = i
      else
        res[i] = false
        item_failed(st, c, u.seqs[i], att[i], msg, items_of(u)[i])
      end
    end
    if ok then
      if st.kind == "reduce" then
        for k = 1, part.n do
          local i = gi(k)
          if a and a[k] then err_item(i, a[k]) else res[i] = true end
        end
      elseif part.one then
        local i = gi(1)
        local r = {}
        for k = 1, a.n do if a[k] ~= nil then r[#r + 1] = a[k] end end
        res[i] = r
      else
        local outs, from, ierrs = a, b, e3
        if type(outs) == "string" then outs = unpack(outs) end
        for k = 1, part.n do
          local i = gi(k)
          if ierrs and ierrs[k] then err_item(i, ierrs[k]) else res[i] = res[i] or {} end
        end
        for k = 1, #outs do
          local r = res[gi(from and from[k] or k)]
          r[#r + 1] = outs[k]
        end
      end
    elseif a == "discarded" or a == "cancelled" then
      for k = 1, part.n do res[gi(k)] = "abandoned" end
    elseif a == "timeout" and part.n > 1 then
      -- Find the item that hangs: the rest go again one by one (a reduce
      -- batch goes on after the items its worker already added).
      local from_k = 1
      if st.kind == "reduce" then
        from_k = (math.tointeger(shared:get(part.key)) or 0) + 1
        for k = 1, from_k - 1 do res[gi(k)] = true end
      end
      u.split = u.split or {}
      for k = from_k, part.n do u.split[#u.split + 1] = gi(k) end
    else
      local msg = a == "timeout" and string.format("timeout (%gs per item)", st.timeout)
                  or tostring(a)
      for k = 1, part.n do err_item(gi(k), msg) end
    end
    if part.key then shared:set(part.key, nil) end
    return true
  end

  -- Polls the head unit of a stage; true once all its parts ended.
  local function unit_done(st, u)
    if u.refused then
      if abort or now() < u.retry_at then return false end
      local part, e = submit_part(st, u, u.refused_idx)
      if not part then
        u.retry_at = now() + 0.01
        u.refused = e
        return false
      end
      u.refused = nil
      u.parts[#u.parts + 1] = part
    end
    local i = 1
    while i <= #u.parts do
      if take_part(st, u, u.parts[i]) then
        table.remove(u.parts, i)
      else
        i = i + 1
      end
    end
    if u.split then
      for _, k in ipairs(u.split) do
        local part = submit_part(st, u, { k })
        if part then u.parts[#u.parts + 1] = part end
      end
      u.split = nil
    end
    if u.retry then
      local r = u.retry
      u.retry = nil
      if st.policies then
        for _, k in ipairs(r) do
          local part, e = submit_part(st, u, { k })
          if part then u.parts[#u.parts + 1] = part
          elseif not abort then u.refused, u.refused_idx, u.retry_at = e, { k }, now() + 0.01 end
        end
      else
        local part = submit_part(st, u, r)
        if part then u.parts[#u.parts + 1] = part end
      end
    end
    return #u.parts == 0 and not u.refused
  end

  -- Outputs of a finished unit, in item order.
  local function unit_outputs(st, u)
    local c, res = st.c, u.res
    local counted = st.group ~= nil -- a group's workers counted ok, out, dropped
    if u.fast then
      if not counted then c.ok = c.ok + u.n end
      if st.kind == "reduce" then return nil, nil, 0 end
      local outs, from, useqs = u.fouts, u.ffrom, u.seqs
      if not from then -- output k from input k, none dropped
        c.out = c.out + u.n
        return outs, useqs, u.n
      end
      local n, seqs, distinct, last = #from, {}, 0, nil
      for k = 1, n do
        local i = from[k]
        seqs[k] = useqs[i]
        if i ~= last then distinct, last = distinct + 1, i end
      end
      if not counted then
        c.dropped = c.dropped + u.n - distinct
        c.out = c.out + n
      end
      return outs, seqs, n
    end
    local outs, seqs, n = {}, {}, 0
    for i = 1, u.n do
      local r = res[i]
      if r == "abandoned" then
        c.abandoned = c.abandoned + 1
      elseif r ~= false then
        if not counted then c.ok = c.ok + 1 end
        if st.kind == "map" then
          if #r == 0 and not counted then c.dropped = c.dropped + 1 end
          for k = 1, #r do n = n + 1; outs[n] = r[k]; seqs[n] = u.seqs[i] end
        end
      end
    end
    if not counted then c.out = c.out + n end
    return outs, seqs, n
  end

  -- Hands outputs to stage k (or the sink when k > nst).
  local function push(k, outs, seqs, n)
    if n == 0 then return end
    if k > nst then
      if type(outs) == "string" then outs = unpack(outs) end
      return to_sink(outs, seqs, n)
    end
    local st = stages[k]
    local q = { n = n, seqs = seqs }
    if type(outs) == "string" then q.blob = outs else q.items = outs end
    st.ct = st.ct + 1
    st.chunks[st.ct] = q
    st.np = st.np + n
  end

  local function room(k)
    if k > nst then return true end
    local st = stages[k]
    return st.np < st.queue
  end

  -- Moves waiting chunks of stage k into units while it has room: a
  -- packed chunk as it is, a list cut into batches.
  local function feed(k)
    local st = stages[k]
    while st.ct >= st.ch and (st.t - st.h + 1) < st.cap and not abort do
      local q = st.chunks[st.ch]
      if q.blob or q.raw or q.n <= st.batch then
        st.chunks[st.ch] = nil
        st.ch = st.ch + 1
      else
        local b = st.batch
        local rest = { n = q.n - b, items = table.move(q.items, b + 1, q.n, 1, {}),
                       seqs = table.move(q.seqs, b + 1, q.n, 1, {}) }
        st.chunks[st.ch] = rest
        q = { n = b, items = table.move(q.items, 1, b, 1, {}),
              seqs = table.move(q.seqs, 1, b, 1, {}) }
      end
      st.np = st.np - q.n
      make_unit(st, q)
    end
  end

  -- Reads source items into stage 1's pending list: from a lines or jsonl
  -- file, blocks of up to `batch` raw lines that stage 1's workers split
  -- (and decode), with the seq of line i computed from the block's first
  -- (no Lua value per line on the host; a stage with policies splits them
  -- on the host); from other sources, one item at a time.
  local src_c = new_counts()
  local quiet_until = 0
  -- A redis-stream source: XREADGROUP (blocking only while the pipeline is
  -- empty), claims, and entries delivered too often to the dead letter.
  local function read_stream(want)
    local idle = true
    for _, s in ipairs(stages) do
      if s.t >= s.h or s.ct >= s.ch then idle = false break end
    end
    if want <= 0 or (not idle and now() < quiet_until) then return 0 end
    ack_step(idle)
    local list, wait = source.fetch(want, idle)
    if #list == 0 then
      if wait then workerpool.sleep(math.min(wait, 0.1))
      elseif not idle then quiet_until = now() + 0.02 end
      return 0
    end
    local items, seqs, got = {}, {}, 0
    for _, en in ipairs(list) do
      local seq = next_seq
      next_seq = next_seq + 1
      src_c["in"] = src_c["in"] + 1
      ids[seq], dlv[seq] = en.id, en.deliveries
      if en.dead then
        item_failed(source_st, src_c, seq, en.deliveries, en.error, en.item)
      else
        got = got + 1
        items[got], seqs[got] = en.item, seq
      end
    end
    if got > 0 then push(1, items, seqs, got) end
    return #list
  end
  local function read_source()
    local st = stages[1]
    local want = (st.queue - st.np) // st.batch * st.batch
    local got = 0
    if stream then return read_stream(want) end
    if source.block then
      while got < want do
        local ok, b, n, bad = pcall(source.block, math.min(st.batch, want - got))
        if not ok then failure = failure or ("source: " .. tostring(b)); eof = true; return got end
        if b == nil then eof = true; break end
        local seq0, nok = next_seq, n
        local seqs = bad and {} or setmetatable({ seq0 = seq0 }, SEQS)
        next_seq = next_seq + n
        src_c["in"] = src_c["in"] + n
        got = got + n
        if bad then -- jsonl lines that are not JSON: item errors of the source
          nok = 0
          local bi = 1
          for i = 1, n do
            local e = bad[bi]
            if e and e[1] == i then
              item_failed(source_st, src_c, seq0 + i - 1, 1, "jsonl source: " .. e[3], e[2])
              bi = bi + 1
            else
              nok = nok + 1
              seqs[nok] = seq0 + i - 1
            end
          end
        end
        if nok > 0 then
          st.ct = st.ct + 1
          st.chunks[st.ct] = { n = nok, raw = b, json = source.jsonl or nil, seqs = seqs }
          st.np = st.np + nok
        end
      end
      return got
    end
    local items, seqs = {}, {}
    while got < want do
      local ok, v = pcall(source.read)
      if not ok then failure = failure or tostring(v); eof = true; return got end
      if v == nil then eof = true; break end
      local seq = next_seq
      next_seq = next_seq + 1
      src_c["in"] = src_c["in"] + 1
      if source.jsonl then
        local d, e = json.decode(v)
        if d == nil then
          item_failed(source_st, src_c, seq, 1, "jsonl source: " .. e, v)
          goto continue
        end
        v = d
      end
      got = got + 1
      items[got] = v
      seqs[got] = seq
      ::continue::
    end
    if got > 0 then push(1, items, seqs, got) end
    return got
  end

  local function upstream_idle(k)
    if k == 1 then return eof or stop_reading end
    for j = 1, k - 1 do
      local s = stages[j]
      if s.t >= s.h or s.ct >= s.ch or s.kind == "reduce" and not s.finished then return false end
    end
    return eof or stop_reading
  end

  -- Reduce: once everything before it has left, gather the accumulators
  -- (one collect task per worker: each waits for all, so every worker
  -- takes exactly one) and run merge and finish.
  local function finish_reduce(st, k)
    st.finished = true
    local key = "c:" .. P .. ":" .. st.name .. ":" .. tostring(st)
    shared:set(key, 0)
    local fs = {}
    for w = 1, st.workers do fs[w] = st.pool:submit("__wp_collect", key, st.workers) end
    local accs = {}
    for w = 1, st.workers do
      local ok, a = fs[w]:wait()
      if not ok then
        failure = failure or string.format("stage %s: %s", st.name, tostring(a))
        return
      end
      if a ~= nil then accs[#accs + 1] = a end
    end
    shared:set(key, nil)
    local ok, r = st.pool:submit("__wp_finish", accs):wait()
    if not ok then
      failure = failure or string.format("stage %s: finish: %s", st.name, tostring(r))
      return
    end
    local outs, seqs, n = {}, {}, 0
    for i = 1, r.n do
      if r[i] ~= nil then n = n + 1; outs[n] = r[i]; seqs[n] = next_seq - 1 end
    end
    st.c.out = st.c.out + n
    push(k + 1, outs, seqs, n)
  end

  -- Progress: live lines on a terminal, or a log line every 10 s.
  local progress = opts.progress
  local drawn, last_draw, last_log = 0, 0, now()
  local function stage_stats(st, dt)
    return { stage = st.name, ["in"] = st.c["in"], out = st.c.out, errors = st.c.errors,
             items_per_s = dt > 0 and st.c["in"] / dt or 0.0,
             queue = (st.t - st.h + 1) * st.batch + st.np,
             queue_cap = st.queue + st.cap * st.batch }
  end
  local function show_progress(final)
    local t = now()
    local dt = t - t0
    if progress == true then
      if not final and t - last_draw < 0.25 then return end
      last_draw = t
      local lines = {}
      if drawn > 0 then lines[1] = string.format("\27[%dF", drawn) end
      for _, st in ipairs(stages) do
        local s = stage_stats(st, dt)
        lines[#lines + 1] = string.format(
          "\27[K%-12s in %10d  out %10d  %9.0f/s  errors %6d  queue %5d/%d\n",
          s.stage, s["in"], s.out, s.items_per_s, s.errors, s.queue, s.queue_cap)
      end
      io.stderr:write(table.concat(lines))
      drawn = #stages
    elseif progress == nil and t - last_log >= 10 then
      last_log = t
      local ss = {}
      for i, st in ipairs(stages) do ss[i] = stage_stats(st, dt) end
      log("info", "pipeline.progress", { pipeline = P, elapsed_s = dt, read = next_seq - 1 - skip,
                                         written = written, stages = ss })
    end
  end

  -- The main loop.
  local hard = false
  while true do
    local irq = interrupted()
    if irq >= 1 and not stop_reading and not drain_start then
      if not eof then
        stop_reading = true
        drain_start = now()
        log("info", "pipeline.draining", { pipeline = P, reason = "signal",
                                           read = next_seq - 1 - skip, deadline_s = drain_timeout })
      end
    end
    if irq >= 2 or (drain_start and now() - drain_start > drain_timeout) then
      hard = true
      log("warn", "pipeline.drain_deadline", {
        pipeline = P, reason = irq >= 2 and "second signal" or "deadline",
        deadline_s = drain_timeout })
      break
    end
    if failure or abort then break end
    local progressed = false
    -- Completed heads, last stage first, while the next stage has room.
    for k = nst, 1, -1 do
      local st = stages[k]
      while st.t >= st.h and room(st.out_k) do
        local u = st.units[st.h]
        if not unit_done(st, u) then break end
        st.units[st.h] = nil
        st.h = st.h + 1
        local outs, seqs, n = unit_outputs(st, u)
        if st.kind == "reduce" or st.group_reduce then reduce_holds = true end
        push(st.out_k, outs, seqs, n)
        progressed = true
      end
      if failure then break end
    end
    if failure or abort then break end
    -- Pending items into units.
    for k = 1, nst do
      local st = stages[k]
      local before = st.t
      feed(k)
      if st.t ~= before then progressed = true end
      if st.kind == "reduce" and not st.finished and st.t < st.h and st.ct < st.ch
         and upstream_idle(k) and not stop_reading then
        finish_reduce(st, k)
        progressed = true
      end
    end
    if failure then break end
    -- The source.
    if not eof and not stop_reading and stages[1].np < stages[1].queue then
      if read_source() > 0 then progressed = true end
      feed(1)
    end
    -- Done?
    local busy = false
    for _, st in ipairs(stages) do
      if st.t >= st.h or st.ct >= st.ch
         or (st.kind == "reduce" and not st.finished and not stop_reading) then
        busy = true
        break
      end
    end
    if not busy and (eof or stop_reading) then break end
    if failure then break end
    if progress ~= false then show_progress(false) end
    if plan.checkpoint and now() - last_cp >= 1 then checkpoint(false) end
    if stream then
      ack_step(false)
      source.tick()
    end
    if not progressed then
      -- Wait for the most downstream stage with batches running: for the
      -- middle one of them, so that one wake-up collects half of them and
      -- refills as many (units end in about the order they were queued);
      -- for the oldest when the middle one is done already (waiting for
      -- it would return at once, and the loop would spin).
      local waited = false
      for k = nst, 1, -1 do
        local st = stages[k]
        if st.t >= st.h then
          local u = st.units[st.h + (st.t - st.h) // 2]
          if not u.parts[1] or u.parts[1].fut:done() then u = st.units[st.h] end
          if u.parts[1] and room(st.out_k) then
            u.parts[1].fut:wait(0.001)
            waited = true
            break
          end
        end
      end
      if not waited then workerpool.sleep(0.002) end
    end
  end

  -- Ending: a failure or a hard stop discards what is left, and cancels
  -- what runs (a running task is interrupted at its next instruction), so
  -- that stopping the pools cannot wait on a handler that never returns.
  local function cancel_all()
    for _, st in ipairs(stages) do
      for h = st.h, st.t do
        for _, part in ipairs(st.units[h].parts) do part.fut:cancel() end
      end
    end
  end
  if stream then
    -- What completed is acknowledged; the rest stays pending for others.
    local t_end = now()
    ack_step(true, function()
      return interrupted() >= 2 or now() - t_end > math.max(1, drain_timeout)
    end)
  end
  local status, exit_code = "done", 0
  if failure or hard or abort then cancel_all() end
  if failure then
    status, exit_code = "failed", 1
    stop_all(true)
  elseif hard or abort then
    status, exit_code = "interrupted", 3
    stop_all(true)
  else
    stop_all(false)
    -- A stream has no end: a drained stop is how its run ends.
    if stop_reading and not stream then status, exit_code = "interrupted", 3 end
  end
  -- Whatever is still inside was abandoned.
  for _, st in ipairs(stages) do
    for h = st.h, st.t do
      local u = st.units[h]
      local done = 0
      if u.res then for i = 1, u.n do if u.res[i] ~= nil then done = done + 1 end end end
      st.c.abandoned = st.c.abandoned + u.n - done
      st.units[h] = nil
    end
    if st.kind == "reduce" and not st.finished then
      st.c.abandoned = st.c.abandoned + st.c.ok
    end
  end
  local complete = status == "done"
  if plan.checkpoint then
    if not complete and status ~= "failed" then
      checkpoint(false)
    elseif complete then
      checkpoint(true)
    end
  end
  for _, p in ipairs(scratch) do p:stop() end
  source.close()
  if rsink then rsink.close() end
  if rdl then rdl.close() end
  if out_fh then
    out_fh:flush()
    if out_fh ~= io.stdout then out_fh:close() end
  end
  if dl_fh then
    dl_fh:flush()
    if dl_fh ~= io.stdout then dl_fh:close() end
  end
  if progress == true then show_progress(true) end

  local wall = now() - t0
  local rep = { pipeline = P, status = status, exit_code = exit_code, error = failure,
                read = next_seq - 1 - skip, resumed_from = skip > 0 and skip or nil,
                written = written, wall_s = wall, stages = {}, totals = new_counts() }
  rep.totals.source_errors = src_c.errors
  rep.totals.sink_errors = sink_c.errors
  for i, st in ipairs(stages) do
    local c = st.c
    local s = { stage = st.name, kind = st.kind, items_per_s = wall > 0 and c["in"] / wall or 0.0 }
    for k, v in pairs(c) do s[k] = v; rep.totals[k] = rep.totals[k] + v end
    rep.stages[i] = s
  end
  rep.totals["in"] = rep.read
  rep.totals.out = written
  rep.totals.dead_lettered = rep.totals.dead_lettered + src_c.dead_lettered + sink_c.dead_lettered
  rep.totals.skipped = rep.totals.skipped + src_c.skipped + sink_c.skipped
  rep.totals.redelivered = rep.totals.redelivered + src_c.redelivered + sink_c.redelivered
  rep.totals.errors = rep.totals.errors + src_c.errors + sink_c.errors
  if plan.checkpoint then rep.checkpoint = read_checkpoint(plan.checkpoint) end
  if stop_reading or hard then
    log(exit_code == 3 and "warn" or "info", "pipeline.drained", {
      pipeline = P, clean = not hard, checkpoint = rep.checkpoint and rep.checkpoint.seq,
      abandoned = rep.totals.abandoned, elapsed_s = drain_start and now() - drain_start or 0.0 })
  end
  log(exit_code == 0 and "info" or (exit_code == 1 and "error" or "warn"), "pipeline.done", rep)
  return rep
end

return M
