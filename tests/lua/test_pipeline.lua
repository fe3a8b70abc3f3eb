-- test_pipeline.lua: workerpool.pipeline through the Lua API in plain
-- lua5.4 (run blocks): JSON round trip, ordered output and fan-out,
-- reduce, dead letters with their exact fields, retries, skip and fail,
-- per-item timeouts, report counts that add up, lua sources and sinks,
-- check(), a completed checkpoint, and per-stage policies.

local T = require "harness"
local workerpool = require "workerpool"
local pipeline = workerpool.pipeline
local json = workerpool.json

-- Files live beside a fresh temporary name (no child process: under the
-- sanitizers a shell started by os.execute would load their runtime).
local base = os.tmpname()
local made = { base }
local function F(name) return base .. "_" .. name end

local function write(name, text)
  local f = assert(io.open(F(name), "wb"))
  f:write(text)
  f:close()
  made[#made + 1] = F(name)
  return F(name)
end
local function lines_of(name)
  local t = {}
  for l in io.lines(F(name)) do t[#t + 1] = l end
  return t
end

write("m.lua", [[
local M = {}
function M.id(x) return x end
function M.jitter(x)
  local n = tonumber(x)
  if n % 7 == 0 then require("workerpool").sleep(0.002) end
  if n % 3 == 0 then return end                -- drop
  if n % 5 == 0 then return n .. "a", n .. "b" end  -- fan out
  return x
end
local tried = {}
function M.flaky(x)
  tried[x] = (tried[x] or 0) + 1
  if x == "2" and tried[x] == 1 then error("flaky " .. x) end
  if x == "4" then error("always " .. x) end
  return x
end
function M.hang(x)
  if x == "3" then while true do end end
  return x
end
function M.zero() return 0 end
function M.add(a, x) return a + tonumber(x) end
function M.merge(a, b) return a + b end
function M.finish(a) return a, "total" end
function M.gen()
  local i = 0
  return function() i = i + 1; if i <= 5 then return { n = i } end end
end
M.seen = {}
function M.collect(x) M.seen[#M.seen + 1] = x end
function M.by_tenant(x) return x.id end
function M.fails(x) error("down") end
function M.no_bad(x)
  if x:find("bad", 1, true) then error("bad line") end
  return x
end
function M.add_count(a, x)
  if x == "7" then return nil end
  if x == "9" then error("nine") end
  return a + 1
end
function M.degraded(x) return "degraded " .. x.id end
function M.first_slow(x)
  if x == "1" then require("workerpool").sleep(0.4) end
  return x
end
return M
]])

local function numbers(n, name)
  local t = {}
  for i = 1, n do t[i] = tostring(i) end
  return write(name or "in.txt", table.concat(t, "\n") .. "\n")
end

local function cfg(t)
  t.name = t.name or "t"
  t.source = t.source or { type = "lines", path = F"in.txt" }
  t.sink = t.sink or { type = "lines", path = F"out.txt" }
  return t
end

local function stage(t)
  t.module = F"m.lua"
  return t
end

local function check_counts(rep)
  for _, s in ipairs(rep.stages) do
    T.eq(s["in"], s.ok + s.errors + s.abandoned, s.stage .. ": in = ok + errors + abandoned")
    T.eq(s.errors, s.dead_lettered + s.skipped + s.failed, s.stage .. ": errors add up")
  end
end

T.test("JSON values round-trip through a jsonl -> identity -> jsonl pipeline", function()
  local inputs = {
    '{"a": null, "b": [1, null, 2.5, "x"], "c": {"d": {}}, "e": []}',
    '[null, null]', 'null', '12', '12.0', '-0.5', '"s\\u00e9"', 'true',
    '{"big": 9007199254740993, "f": 1e-300}',
  }
  write("in.jsonl", table.concat(inputs, "\n") .. "\n")
  local rep = assert(pipeline.run(cfg{
    source = { type = "jsonl", path = F"in.jsonl" },
    -- two stages: the first hands its outputs to the second packed
    stages = { stage{ name = "id", handler = "id", workers = 2, batch = 2 },
               stage{ name = "id2", handler = "id", workers = 2, batch = 3 } },
    sink = { type = "jsonl", path = F"out.jsonl" }, ordered = true }))
  T.eq(rep.status, "done")
  local out = lines_of("out.jsonl")
  T.eq(#out, #inputs)
  for i, l in ipairs(out) do
    local want = json.decode(inputs[i])
    local got = json.decode(l)
    -- Compare through a canonical encoding: key order aside, same text.
    local function canon(v)
      if type(v) ~= "table" then return json.encode(v) end
      local keys = {}
      for k in pairs(v) do keys[#keys + 1] = k end
      table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
      local parts = {}
      for _, k in ipairs(keys) do parts[#parts + 1] = tostring(k) .. "=" .. canon(v[k]) end
      return "{" .. table.concat(parts, ",") .. "}"
    end
    T.eq(canon(got), canon(want), "line " .. i)
  end
  T.ok(out[1]:find('"a":null', 1, true), "null kept in an object")
  T.eq(out[4], "12")
  T.eq(out[5], "12.0")
end)

T.test("ordered output with drops and fan-out, several workers", function()
  numbers(3000)
  local rep = assert(pipeline.run(cfg{
    stages = { stage{ name = "j", handler = "jitter", workers = 3, batch = 7, queue = 50 },
               stage{ name = "id", handler = "id", workers = 2, batch = 3, queue = 20 } },
    ordered = true }))
  local want = {}
  for i = 1, 3000 do
    if i % 3 ~= 0 then
      if i % 5 == 0 then want[#want + 1] = i .. "a"; want[#want + 1] = i .. "b"
      else want[#want + 1] = tostring(i) end
    end
  end
  local out = lines_of("out.txt")
  T.eq(#out, #want)
  for i = 1, #want do if out[i] ~= want[i] then T.eq(out[i], want[i], "line " .. i) end end
  T.eq(rep.stages[1]["in"], 3000)
  T.eq(rep.stages[1].dropped, 1000)
  T.eq(rep.stages[1].out, #want)
  T.eq(rep.written, #want)
  check_counts(rep)
end)

T.test("reduce: per-worker accumulators merged, finish fans out", function()
  numbers(1000)
  local rep = assert(pipeline.run(cfg{
    stages = { stage{ name = "sum", kind = "reduce", init = "zero", add = "add",
                      merge = "merge", finish = "finish", workers = 3, batch = 10 } } }))
  T.eq(rep.status, "done")
  local out = lines_of("out.txt")
  T.eq(out[1], "500500")
  T.eq(out[2], "total")
  T.eq(rep.stages[1].ok, 1000)
  T.eq(rep.stages[1].out, 2)
end)

T.test("dead letters: exact fields, retries, attempts", function()
  numbers(5)
  local rep = assert(pipeline.run(cfg{
    stages = { stage{ name = "flaky", handler = "flaky", retries = 2, batch = 5 } },
    dead_letter = { type = "jsonl", path = F"dead.jsonl" } }))
  T.eq(rep.status, "done")
  T.eq(rep.exit_code, 0)
  local s = rep.stages[1]
  T.eq(s.dead_lettered, 1)
  T.eq(s.retried, 3) -- "2" once, "4" twice
  T.eq(s.ok, 4)
  check_counts(rep)
  local dead = lines_of("dead.jsonl")
  T.eq(#dead, 1)
  local d = json.decode(dead[1])
  local keys = {}
  for k in pairs(d) do keys[#keys + 1] = k end
  table.sort(keys)
  T.eq(table.concat(keys, ","), "attempts,error,item,pipeline,seq,stage")
  T.eq(d.pipeline, "t")
  T.eq(d.stage, "flaky")
  T.eq(d.seq, 4)
  T.eq(d.attempts, 3)
  T.eq(d.item, "4")
  T.ok(d.error:find("always 4", 1, true) and d.error:find("stack traceback", 1, true), d.error)
  T.eq(table.concat(lines_of("out.txt"), " "), "1 2 3 5")
end)

T.test("on_error skip and fail", function()
  numbers(5)
  local rep = assert(pipeline.run(cfg{
    stages = { stage{ name = "f", handler = "flaky", on_error = "skip" } } }))
  T.eq(rep.stages[1].skipped, 2)
  T.eq(rep.exit_code, 0)
  check_counts(rep)
  rep = assert(pipeline.run(cfg{
    stages = { stage{ name = "f", handler = "flaky", on_error = "fail" } } }))
  T.eq(rep.status, "failed")
  T.eq(rep.exit_code, 1)
  T.ok(rep.error:match("^stage f, item %d+: "), rep.error)
  -- without dead_letter, fail is the default
  rep = assert(pipeline.run(cfg{ stages = { stage{ name = "f", handler = "flaky" } } }))
  T.eq(rep.status, "failed")
end)

T.test("a lines source that cannot be read fails the run", function()
  -- A directory opens for reading, and every read of it fails.
  local rep = assert(pipeline.run(cfg{
    source = { type = "lines", path = base:match("^(.*)/") or "." },
    stages = { stage{ name = "id", handler = "id" } } }))
  T.eq(rep.status, "failed")
  T.eq(rep.exit_code, 1)
  T.ok(rep.error:match("^source: read error: "), rep.error)
end)

T.test("timeout: the pool's deadline stops a hanging item; the batch is split", function()
  numbers(6)
  local rep = assert(pipeline.run(cfg{
    stages = { stage{ name = "h", handler = "hang", timeout = 0.2 * T.time_scale, batch = 6 } },
    dead_letter = { type = "jsonl", path = F"dead.jsonl" }, ordered = true }))
  T.eq(rep.status, "done")
  T.eq(table.concat(lines_of("out.txt"), " "), "1 2 4 5 6")
  local d = json.decode(lines_of("dead.jsonl")[1])
  T.eq(d.seq, 3)
  T.ok(d.error:find("timeout", 1, true), d.error)
  check_counts(rep)
end)

T.test("bad jsonl lines and items the sink cannot write are dead-lettered", function()
  write("bad.jsonl", '1\n{"a":\n\n"x"\n{"t": 1}\n')
  local rep = assert(pipeline.run(cfg{
    source = { type = "jsonl", path = F"bad.jsonl" },
    stages = { stage{ name = "id", handler = "id" } },
    dead_letter = { type = "jsonl", path = F"dead.jsonl" }, ordered = true }))
  T.eq(rep.exit_code, 0)
  T.eq(rep.read, 4) -- the blank line is not an item
  T.eq(table.concat(lines_of("out.txt"), " "), "1 x")
  local dead = lines_of("dead.jsonl")
  T.eq(#dead, 2)
  local a, b = json.decode(dead[1]), json.decode(dead[2])
  T.eq(a.stage, "source")
  T.eq(a.seq, 2)
  T.eq(a.item, '{"a":')
  T.ok(a.error:match("^jsonl source: 1:%d+: "), a.error)
  T.eq(b.stage, "sink")
  T.eq(b.seq, 4)
  T.eq(b.item.t, 1)
  T.eq(rep.totals.source_errors, 1)
  T.eq(rep.totals.sink_errors, 1)
  T.eq(rep.totals.dead_lettered, 2)
end)

T.test("fused stages: one task per batch, per-stage counts, errors and retries", function()
  numbers(3000)
  local rep = assert(pipeline.run(cfg{
    stages = { stage{ name = "j", handler = "jitter", workers = 3, batch = 7, queue = 50 },
               stage{ name = "f", handler = "flaky", fuse = true, retries = 1 },
               stage{ name = "id", handler = "id", fuse = true } },
    dead_letter = { type = "jsonl", path = F"dead.jsonl" }, ordered = true }))
  T.eq(rep.status, "done")
  local want = {}
  for i = 1, 3000 do
    if i % 3 ~= 0 and i ~= 4 then
      if i % 5 == 0 then want[#want + 1] = i .. "a"; want[#want + 1] = i .. "b"
      else want[#want + 1] = tostring(i) end
    end
  end
  local out = lines_of("out.txt")
  T.eq(#out, #want)
  for i = 1, #want do if out[i] ~= want[i] then T.eq(out[i], want[i], "line " .. i) end end
  local j, f, id = rep.stages[1], rep.stages[2], rep.stages[3]
  T.eq(j["in"], 3000)
  T.eq(j.dropped, 1000)
  T.eq(f["in"], j.out)
  T.eq(f.dead_lettered, 1)   -- "4" fails twice
  T.eq(f.retried, 2)         -- "2" once (then ok), "4" once
  T.eq(id["in"], f.out)
  T.eq(id.out, #want)
  check_counts(rep)
  local d = json.decode(lines_of("dead.jsonl")[1])
  T.eq(d.stage, "f")
  T.eq(d.seq, 4)
  T.eq(d.attempts, 2)
  T.eq(d.item, "4")
  -- a fused reduce: the accumulators live in the first stage's workers
  numbers(1000)
  rep = assert(pipeline.run(cfg{
    stages = { stage{ name = "id", handler = "id", workers = 3, batch = 10 },
               stage{ name = "sum", kind = "reduce", fuse = true, init = "zero", add = "add",
                      merge = "merge", finish = "finish" } } }))
  T.eq(table.concat(lines_of("out.txt"), " "), "500500 total")
  T.eq(rep.stages[2]["in"], 1000)
  T.eq(rep.stages[2].ok, 1000)
  T.eq(rep.stages[2].out, 2)
  check_counts(rep)
  local ok, errs = pipeline.check(cfg{
    stages = { stage{ name = "a", handler = "id", fuse = true },
               stage{ name = "b", handler = "id", timeout = 1 },
               stage{ name = "c", handler = "id", fuse = true, workers = 2 } } })
  T.eq(ok, nil)
  T.eq(table.concat(errs, "\n"), table.concat({
    "config: /stages/0/fuse: the first stage has no stage before it to fuse with",
    "config: /stages/1/timeout: not supported on fused stages",
    "config: /stages/2/workers: a fused stage runs in the tasks of the stage before it " ..
      "(set it there)" }, "\n"))
end)

T.test("a stage module can require a sibling module", function()
  local name = F"helper":match("[^/]*$")
  write("helper.lua", "return { twice = function(s) return s .. s end }")
  write("uses.lua", string.format(
    "local h = require(%q)\nreturn { run = function(x) return h.twice(x) end }", name))
  numbers(3)
  local rep = assert(pipeline.run(cfg{
    stages = { { name = "u", module = F"uses.lua", handler = "run" } }, ordered = true }))
  T.eq(rep.status, "done")
  T.eq(table.concat(lines_of("out.txt"), " "), "11 22 33")
end)

T.test("lua source and lua sink run on the host", function()
  local rep = assert(pipeline.run(cfg{
    source = { type = "lua", module = F"m.lua", ["function"] = "gen" },
    stages = { stage{ name = "id", handler = "id" } },
    sink = { type = "lua", module = write("sink.lua", [[
      local M = {}
      M.items = {}
      function M.put(x) _G.PIPE_SEEN = _G.PIPE_SEEN or {}; table.insert(_G.PIPE_SEEN, x.n) end
      return M]]), ["function"] = "put" } }))
  T.eq(rep.written, 5)
  T.eq(table.concat(_G.PIPE_SEEN, ","), "1,2,3,4,5")
end)

T.test("packed hand-off: plain data packs, anything else falls back", function()
  local pack, unpack = workerpool["pipeline.pack"], workerpool["pipeline.unpack"]
  local v = { 1, 2.0, "s\0", true, json.null, { a = { false }, [3] = 4, [1.5] = "f" } }
  local back, n = unpack(assert(pack(v)))
  T.eq(n, 6)
  T.eq(math.type(back[1]), "integer")
  T.eq(math.type(back[2]), "float")
  T.eq(back[3], "s\0")
  T.ok(back[5] == json.null, "null")
  T.eq(back[6].a[1], false)
  T.eq(back[6][3], 4)
  T.eq(back[6][1.5], "f")
  local c = {}
  c.c = c
  T.eq(pack({ c }), nil)
  T.eq(pack({ print }), nil)
  T.raises(function() unpack("\3Tzz") end, "malformed")
  T.raises(function() unpack("\255\255\255\255\255\255\255\255\255\255") end, "malformed")
  -- a stage whose outputs cannot be packed still hands them on
  numbers(20)
  write("fn.lua", "return { f = function(x) return { x = x, fn = print } end,\n" ..
                  "         g = function(t) return t.x end }")
  local rep = assert(pipeline.run(cfg{
    stages = { { name = "f", module = F"fn.lua", handler = "f", batch = 4 },
               { name = "g", module = F"fn.lua", handler = "g", batch = 4 } }, ordered = true }))
  T.eq(rep.written, 20)
  T.eq(lines_of("out.txt")[20], "20")
end)

T.test("check returns every error; run refuses a bad config before reading", function()
  local ok, errs = pipeline.check{
    name = "x", stages = { { name = "a" }, { name = "a", wokers = 1 } },
    source = { type = "lines", path = "-" }, sink = { type = "nul" } }
  T.eq(ok, nil)
  T.ok(#errs >= 4, table.concat(errs, "\n"))
  T.ok(table.concat(errs, "\n"):find(
    'config: /stages/1: unknown key "wokers" (did you mean "workers"?)', 1, true))
  local rep, msg = pipeline.run{ name = "x" }
  T.eq(rep, nil)
  T.ok(msg:find('missing required key "stages"', 1, true), msg)
  T.eq(pipeline.check(cfg{ stages = { stage{ name = "a", handler = "id" } } }), true)
end)

T.test("a completed checkpoint makes resume a no-op", function()
  numbers(10)
  local c = cfg{ stages = { stage{ name = "id", handler = "id" } },
                 checkpoint = F"cp.json" }
  local rep = assert(pipeline.run(c))
  T.eq(rep.checkpoint.complete, true)
  T.eq(rep.checkpoint.seq, 10)
  rep = assert(pipeline.run(c, { resume = true }))
  T.eq(rep.already_complete, true)
  T.eq(rep.exit_code, 0)
  T.eq(#lines_of("out.txt"), 10)
end)

T.test("resume skips the checkpointed items and appends", function()
  numbers(10)
  write("cp2.json", '{"pipeline": "t", "seq": 6, "complete": false}\n')
  write("out.txt", "1\n2\n3\n4\n5\n6\n")
  local rep = assert(pipeline.run(cfg{ stages = { stage{ name = "id", handler = "id" } },
                                       checkpoint = F"cp2.json" }, { resume = true }))
  T.eq(rep.read, 4)
  T.eq(rep.resumed_from, 6)
  T.eq(table.concat(lines_of("out.txt"), " "), "1 2 3 4 5 6 7 8 9 10")
end)

T.test("the block helpers: lines, split and results", function()
  local lines, split = workerpool["pipeline.lines"], workerpool["pipeline.split"]
  local results = workerpool["pipeline.results"]
  local function blocks(text, k)
    write("blocks.txt", text)
    local fh = assert(io.open(F"blocks.txt", "rb"))
    local rd, got = lines(fh), {}
    while true do
      local b, c = rd(k)
      if b == nil then break end
      got[#got + 1] = b .. "#" .. c
    end
    T.eq(rd(k), nil) -- stays at the end
    fh:close()
    return table.concat(got, "|")
  end
  T.eq(blocks("a\nbb\nc", 2), "a\nbb\n#2|c#1")
  T.eq(blocks("a\nbb\nc\n", 2), "a\nbb\n#2|c\n#1")
  T.eq(blocks("a\n\n", 9), "a\n\n#2")
  T.eq(blocks("", 3), "")
  T.eq(blocks("\r\n\n", 1), "\r\n#1|\n#1")
  -- Lines longer than one read, and blocks across reads.
  local long = string.rep("x", 700000)
  T.eq(blocks(long .. "\n" .. long .. "\nend", 1),
       long .. "\n#1|" .. long .. "\n#1|end#1")
  local many = {}
  for i = 1, 100000 do many[i] = tostring(i) end
  write("many.txt", table.concat(many, "\n") .. "\n")
  local fh = assert(io.open(F"many.txt", "rb"))
  local rd, seen, nb = lines(fh), 0, 0
  while true do
    local b, c = rd(999)
    if not b then break end
    nb = nb + 1
    for l in b:gmatch("[^\n]+") do
      seen = seen + 1
      if l ~= tostring(seen) then error("line " .. seen .. " is " .. l) end
    end
    T.eq(c, nb <= 100 and 999 or 100000 - 100 * 999)
  end
  T.eq(seen, 100000)
  -- jsonl: blank lines are not items; lines that are not JSON are left
  -- out of the block and listed with json.decode's message.
  write("j.jsonl", '{"a": 1}\n\n  \r\n[1,\n"\\u00e9"\n\n2')
  fh = assert(io.open(F"j.jsonl", "rb"))
  rd = lines(fh, "jsonl")
  local b, c, bad = rd(2)
  T.eq(b, '{"a": 1}\n'); T.eq(c, 2)
  T.eq(#bad, 1); T.eq(bad[1][1], 2); T.eq(bad[1][2], "[1,")
  T.eq(bad[1][3], select(2, json.decode("[1,")))
  b, c, bad = rd(5)
  T.eq(b, '"\\u00e9"\n2'); T.eq(c, 2); T.eq(bad, nil) -- no blank lines in a block
  T.eq(rd(1), nil)
  fh:close()
  write("j2.jsonl", "1\n \n\n")
  fh = assert(io.open(F"j2.jsonl", "rb"))
  rd = lines(fh, "jsonl")
  b, c = rd(1)
  T.eq(b, "1\n"); T.eq(c, 1)
  T.eq(rd(1), nil) -- only blank lines were left
  T.eq(select(2, pcall(lines, fh, "xml")):match("invalid option 'xml'") ~= nil, true)
  -- Misuse.
  T.eq(select(2, pcall(lines, "x")):match("FILE%* expected") ~= nil, true)
  T.eq(select(2, pcall(rd, 0)):match("must be positive") ~= nil, true)
  fh:close()
  T.eq(select(2, pcall(rd, 1)):match("closed file") ~= nil, true)
  local t, n
  t, n = split("a\n\nb\r\nc")
  T.eq(n, 4); T.eq(table.concat(t, "|"), "a||b\r|c")
  t, n = split("a\n")
  T.eq(n, 1); T.eq(t[1], "a")
  t, n = split("")
  T.eq(n, 0); T.eq(#t, 0)
  n, t = results()
  T.eq(n, 0); T.eq(t, nil)
  n, t = results(nil)
  T.eq(n, 1); T.eq(t, nil)
  n, t = results(1, nil, 3)
  T.eq(n, 3); T.eq(t[1], 1); T.eq(t[2], nil); T.eq(t[3], 3)
end)

-- got and want, line by line (the first difference fails).
local function same_lines(got, want)
  for i = 1, math.max(#got, #want) do
    if got[i] ~= want[i] then T.eq(got[i], want[i], "line " .. i) end
  end
end

-- Runs a file through stage "first" (handler, 2 workers, batches of 7),
-- alone and then with a fused identity stage after it, in order, and
-- hands each report to check.
local function through_blocks(type_, path, handler, check)
  for _, fuse in ipairs{ false, true } do
    local stages = { stage{ name = "first", handler = handler, workers = 2, batch = 7,
                            queue = 30 } }
    if fuse then stages[2] = stage{ name = "then", handler = "id", fuse = true } end
    local rep = assert(pipeline.run(cfg{
      source = { type = type_, path = path }, stages = stages,
      dead_letter = { type = "jsonl", path = F"dead.jsonl" }, ordered = true }))
    check(rep)
    check_counts(rep)
  end
end

T.test("the jsonl reader tells JSON from the rest exactly as json.decode does", function()
  -- Random lines from JSON pieces, some cut short or with trailing bytes:
  -- the reader's quick check must never call a line good that jansson
  -- refuses, and the refused ones carry json.decode's message.
  local atoms = { "0", "-0", "12", "01", "1.5", "1.", ".5", "1e5", "1E+5", "1e-5", "1e400",
    "-1e309", "123456789012345678", "1234567890123456789", "99999999999999999999",
    "1.7976931348623157e308", "99999999999999999e280", "true", "false", "null", "nul",
    '"a"', '"a\\"b"', '"\\u00e9"', '"\\x"', '"\195\169"', '"\t"', '""', '"\\/"', '"a',
    "[]", "{}", "[1,]", "{,}", '{"a":1}', '{"a" 1}', "{1:2}", "[1 2]", "-", "+1", "NaN", " ",
    "\r", "\0", '"\\u0000"', "[[[[[[[[]]]]]]]]", string.rep("[", 70) .. string.rep("]", 70) }
  math.randomseed(7)
  local function gen(d)
    local r = math.random(10)
    if d > 4 or r <= 4 then return atoms[math.random(#atoms)] end
    local t = {}
    if r <= 7 then
      for i = 1, math.random(0, 4) do t[i] = gen(d + 1) end
      return "[" .. table.concat(t, math.random(10) == 1 and " " or ",") .. "]"
    end
    for i = 1, math.random(0, 4) do t[i] = '"k' .. i .. '":' .. gen(d + 1) end
    return "{" .. table.concat(t, ",") .. "}"
  end
  local src = {}
  for i = 1, 4000 do
    local l = gen(0)
    if math.random(20) == 1 then l = l .. " x" end
    if math.random(20) == 1 then l = l:sub(1, math.random(#l)) end
    src[i] = l
  end
  write("diff.jsonl", table.concat(src, "\n"))
  local fh = assert(io.open(F"diff.jsonl", "rb"))
  local rd, got = workerpool["pipeline.lines"](fh, "jsonl"), {}
  while true do
    local b, n, bad = rd(97)
    if not b then break end
    local good = workerpool["pipeline.split"](b)
    local bi, gi = 1, 1
    for i = 1, n do
      if bad and bad[bi] and bad[bi][1] == i then
        got[#got + 1] = { bad[bi][2], false, bad[bi][3] }
        bi = bi + 1
      else
        got[#got + 1] = { good[gi], true }
        gi = gi + 1
      end
    end
    T.eq(gi, #good + 1, "the block holds the good lines")
  end
  fh:close()
  local k, nbad = 0, 0
  for _, l in ipairs(src) do
    if not l:match("^%s*$") then
      k = k + 1
      local it = got[k]
      local v, e = json.decode(l)
      if not it or it[1] ~= l or it[2] ~= (v ~= nil) or (v == nil and it[3] ~= e) then
        T.eq(it and it[1], l, "line " .. k .. " as jansson judges it")
        T.eq(it and it[2], v ~= nil, "line " .. k .. ": " .. l)
      end
      if v == nil then nbad = nbad + 1 end
    end
  end
  T.eq(#got, k)
  T.ok(nbad > 500 and nbad < k - 500, "both kinds tested: " .. nbad .. " of " .. k)
end)

T.test("a jsonl file in raw blocks: exact items, source errors and seqs, resume", function()
  -- Blank lines (not items), CRLF, escapes, a line that is not JSON
  -- every 40 items, and no final newline.
  local t, items = {}, {}
  for i = 1, 400 do
    local l
    if i % 40 == 0 then l = '{"bad": ' .. i
    elseif i % 9 == 0 then l = '"v' .. i .. '\\u00e9"\r'
    else l = '"v' .. i .. '"' end
    items[i] = l
    t[#t + 1] = l
    if i % 13 == 0 then t[#t + 1] = "" end
    if i % 17 == 0 then t[#t + 1] = " \t\r" end
  end
  write("blk.jsonl", table.concat(t, "\n"))
  through_blocks("jsonl", F"blk.jsonl", "id", function(rep)
    T.eq(rep.read, 400)
    local want = {}
    for i = 1, 400 do
      if i % 40 ~= 0 then want[#want + 1] = "v" .. i .. (i % 9 == 0 and "\u{e9}" or "") end
    end
    same_lines(lines_of("out.txt"), want)
    local dead = lines_of("dead.jsonl")
    T.eq(#dead, 10)
    for j, l in ipairs(dead) do
      local d = json.decode(l)
      T.eq(d.seq, 40 * j); T.eq(d.item, items[40 * j]); T.eq(d.stage, "source")
      T.eq(d.error, "jsonl source: " .. select(2, json.decode(items[40 * j])))
    end
    T.eq(rep.totals.source_errors, 10)
  end)
  -- resume: the checkpoint ends inside the first block read
  write("cp4.json", '{"pipeline": "t", "seq": 123, "complete": false}\n')
  write("out.txt", "")
  write("dead.jsonl", "")
  local rep = assert(pipeline.run(cfg{
    source = { type = "jsonl", path = F"blk.jsonl" },
    stages = { stage{ name = "id", handler = "id", batch = 10 } },
    dead_letter = { type = "jsonl", path = F"dead.jsonl" },
    checkpoint = F"cp4.json", ordered = true }, { resume = true }))
  T.eq(rep.read, 277)
  local out = lines_of("out.txt")
  T.eq(#out, 277 - 7) -- items 160, 200, ..., 400 are not JSON
  T.eq(out[1], "v124"); T.eq(out[#out], "v399")
  T.eq(#lines_of("dead.jsonl"), 7)
end)

T.test("a lines file in raw blocks: exact lines and seqs, resume from inside a block", function()
  -- Blank lines, a CR, a bad line in every block and no final newline.
  local t = {}
  for i = 1, 500 do
    t[i] = i % 50 == 0 and ("bad " .. i) or i % 7 == 0 and "" or i % 11 == 0 and (i .. "\r")
           or tostring(i)
  end
  write("blk.txt", table.concat(t, "\n"))
  through_blocks("lines", F"blk.txt", "no_bad", function(rep)
    T.eq(rep.read, 500)
    local want = {}
    for i = 1, 500 do
      if i % 50 ~= 0 then want[#want + 1] = t[i] end
    end
    same_lines(lines_of("out.txt"), want)
    local dead = lines_of("dead.jsonl")
    T.eq(#dead, 10)
    for j, l in ipairs(dead) do
      local d = json.decode(l)
      T.eq(d.seq, 50 * j); T.eq(d.item, "bad " .. 50 * j); T.eq(d.stage, "first")
    end
  end)
  -- resume: the checkpoint ends inside the first block read
  write("cp3.json", '{"pipeline": "t", "seq": 123, "complete": false}\n')
  write("out.txt", "")
  local rep = assert(pipeline.run(cfg{
    source = { type = "lines", path = F"blk.txt" },
    stages = { stage{ name = "id", handler = "id", batch = 10 } },
    checkpoint = F"cp3.json", ordered = true }, { resume = true }))
  T.eq(rep.read, 377)
  local out = lines_of("out.txt")
  T.eq(#out, 377)
  T.eq(out[1], t[124]); T.eq(out[377], t[500])
end)

T.test("a fused chain: add returning nil or raising, retries counted per item", function()
  numbers(20)
  local rep = assert(pipeline.run(cfg{
    stages = { stage{ name = "id", handler = "id", workers = 2, batch = 4 },
               stage{ name = "n", kind = "reduce", fuse = true, init = "zero", add = "add_count",
                      merge = "merge", finish = "finish", retries = 2 } },
    dead_letter = { type = "jsonl", path = F"dead.jsonl" } }))
  T.eq(table.concat(lines_of("out.txt"), " "), "18 total")
  local n = rep.stages[2]
  T.eq(n["in"], 20); T.eq(n.ok, 18); T.eq(n.dead_lettered, 2); T.eq(n.retried, 4)
  local dead = lines_of("dead.jsonl")
  table.sort(dead)
  T.eq(#dead, 2)
  local a, b = json.decode(dead[1]), json.decode(dead[2])
  if a.seq > b.seq then a, b = b, a end
  T.eq(a.seq, 7); T.eq(a.attempts, 3); T.eq(a.item, "7")
  T.ok(a.error:find("add returned nil", 1, true), a.error)
  T.eq(b.seq, 9); T.eq(b.attempts, 3)
  T.ok(b.error:find("nine", 1, true), b.error)
  check_counts(rep)
end)

T.test("a slow oldest batch: the host sleeps while later ones are done", function()
  -- Batches after the first end first; the host waits for the oldest
  -- instead of spinning on a later one that is done already.  Process CPU
  -- time (the workers sleep or are done) stays far under the 0.4 s wait.
  numbers(40)
  local c0 = os.clock()
  local rep = assert(pipeline.run(cfg{
    stages = { stage{ name = "s", handler = "first_slow", workers = 2, batch = 1, queue = 16 } },
    ordered = true }))
  local cpu = os.clock() - c0
  T.eq(rep.status, "done")
  T.eq(#lines_of("out.txt"), 40)
  -- Under a sanitizer (its runtime preloaded) each of the host's 1 ms
  -- timed waits costs as much CPU as the spin did: the bound means
  -- nothing there.
  if not os.getenv("LD_PRELOAD") then
    T.ok(cpu < 0.2, string.format("the host spun: %.3f s of CPU", cpu))
  end
end)

T.test("policies: refused items wait and are retried; breaker fallback", function()
  local items = {}
  for i = 1, 30 do
    items[i] = json.encode{ id = tostring(i), customer = i % 2 == 0 and "a" or "b" }
  end
  write("t.jsonl", table.concat(items, "\n") .. "\n")
  local rep = assert(pipeline.run(cfg{
    name = "pol",
    source = { type = "jsonl", path = F"t.jsonl" },
    stages = { stage{ name = "limited", handler = "by_tenant", tenant = "customer", workers = 2,
                      policies = { { use = "tenant.bucket", rate = 200, burst = 5 },
                                   { use = "tenant.concurrency", limit = 1 } } } },
    ordered = true }))
  T.eq(rep.written, 30)
  local out = lines_of("out.txt")
  for i = 1, 30 do T.eq(out[i], tostring(i)) end
  rep = assert(pipeline.run(cfg{
    name = "brk",
    source = { type = "jsonl", path = F"t.jsonl" },
    stages = { stage{ name = "down", handler = "fails", queue = 1,
                      policies = { { use = "breaker", consecutive_failures = 3, open_timeout = 60,
                                     fallback = "degraded" } } } },
    dead_letter = { type = "jsonl", path = F"dead.jsonl" }, ordered = true }))
  -- Items admitted before the breaker saw 3 failures fail too; every
  -- later one goes to the fallback while the breaker is open.
  local dl = rep.stages[1].dead_lettered
  T.ok(dl >= 3 and dl < 30, "dead letters: " .. dl)
  out = lines_of("out.txt")
  T.eq(#out, 30 - dl)
  for _, l in ipairs(out) do T.ok(l:match("^degraded %d+$"), l) end
  check_counts(rep)
end)

T.run()
for _, f in ipairs(made) do os.remove(f) end
for _, f in ipairs{ "out.txt", "out.jsonl", "dead.jsonl", "cp.json", "cp2.json", "cp3.json",
                     "cp4.json" } do
  os.remove(F(f))
end
