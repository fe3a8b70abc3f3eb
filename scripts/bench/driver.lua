-- driver.lua: runs the benchmark suite: W1-W6 on wpool (ours.lua) and W1-W4
-- on luv (luv.lua) in the same run, each workload in a fresh process,
-- repeated with the two engines alternating; prints one table of medians
-- (workload, ours, luv, ratio, target) and writes it with every sample as
-- JSON.  Optionally counts instructions per task under callgrind.
-- Run from the repository root (scripts/bench/run.sh does):
--   lua5.4 scripts/bench/driver.lua [--quick] [--reps N] [--build-dir DIR]
--          [--json FILE] [--callgrind | --no-callgrind] [--only W1,W3,...]
-- Exits 1 when a workload failed or a checksum did not match; a missed
-- target is reported, not an error.
local HERE = "scripts/bench"

local function usage(msg)
  io.stderr:write(msg, "\n", [[
usage: lua5.4 scripts/bench/driver.lua [options]
  --quick          small sizes, one repetition, no callgrind (the CI smoke run)
  --reps N         repetitions of each workload per engine (default 5, quick 1)
  --build-dir DIR  where workerpool.so is (default build)
  --json FILE      where to write the results (default DIR/bench/results.json)
  --callgrind      count instructions per task under callgrind (default: on
                   unless --quick)
  --no-callgrind   skip the instruction counts
  --only LIST      comma-separated workloads to run (W1,W2,W3,W4,W5,W6)
]])
  os.exit(2)
end

-- ---- options ----------------------------------------------------------

local opt = {quick = false, build = "build"}
do
  local i = 1
  while i <= #arg do
    local a = arg[i]
    local function value()
      i = i + 1
      if arg[i] == nil then usage(a .. " needs a value") end
      return arg[i]
    end
    if a == "--quick" then opt.quick = true
    elseif a == "--reps" then
      opt.reps = math.tointeger(tonumber(value()))
      if not opt.reps or opt.reps < 1 then usage("--reps needs a positive integer") end
    elseif a == "--build-dir" then opt.build = value()
    elseif a == "--json" then opt.json = value()
    elseif a == "--callgrind" then opt.callgrind = true
    elseif a == "--no-callgrind" then opt.callgrind = false
    elseif a == "--only" then
      opt.only = {}
      for w in value():gmatch("[^,]+") do opt.only[w] = true end
    elseif a == "-h" or a == "--help" then usage("")
    else usage("unknown option " .. a) end
    i = i + 1
  end
  opt.reps = opt.reps or (opt.quick and 1 or 5)
  if opt.callgrind == nil then opt.callgrind = not opt.quick end
  opt.json = opt.json or (opt.build .. "/bench/results.json")
end

-- Sizes: the issue's in full mode, small ones for the smoke run.
local SIZES = opt.quick and {
  W1 = {5000}, W2 = {16, 20000}, W3 = {500}, W4 = {500}, W5 = {5000}, W6 = {20, 8},
} or {
  W1 = {200000}, W2 = {400, 500000}, W3 = {20000}, W4 = {20000}, W5 = {200000},
  W6 = {300, 50},
}
SIZES.W1n, SIZES.W3n, SIZES.W4n = SIZES.W1, SIZES.W3, SIZES.W4

-- Callgrind sizes: two N per workload, differenced to cancel start-up.
local CG_SIZES = opt.quick and {W1 = {200, 1000}, W3 = {100, 500}}
  or {W1 = {4000, 20000}, W3 = {1000, 5000}}

-- ---- running processes ------------------------------------------------

local function shq(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function sh(cmd)
  local p = assert(io.popen(cmd, "r"))
  local out = p:read("a")
  local ok, _, code = p:close()
  return out, ok and 0 or code
end

local function sh1(cmd) return (sh(cmd):gsub("%s+$", "")) end

local ENV = {
  ours = "LUA_CPATH=" .. shq(opt.build .. "/?.so;;"),
  luv = "UV_THREADPOOL_SIZE=2",
}

local failures = {}

-- Runs one workload in a fresh process.  Returns its metrics (name -> number)
-- or nil after recording a failure.
local function run_workload(engine, w, sizes, prefix)
  local cmd = string.format("%s %s lua5.4 %s/%s.lua %s %s 2>&1", ENV[engine], prefix or "",
                            HERE, engine, w, table.concat(sizes, " "))
  local out, code = sh(cmd)
  local m, bad = {}, {}
  for line in out:gmatch("[^\n]+") do
    local name, v = line:match("^metric (%S+) (%S+)$")
    if name then m[name] = tonumber(v) end
    local cname, rest = line:match("^check (%S+) (.*)$")
    if cname and rest ~= "ok" then bad[#bad + 1] = cname .. " " .. rest end
  end
  if code ~= 0 or #bad > 0 then
    local why = #bad > 0 and table.concat(bad, "; ") or ("exit " .. tostring(code))
    failures[#failures + 1] = string.format("%s %s: %s\n%s", engine, w, why, out)
    io.stderr:write(string.format("  %-4s %-4s FAILED: %s\n", engine, w, why))
    return nil
  end
  return m
end

-- ---- the timed runs ---------------------------------------------------

-- Workloads in run order; luv = the luv workload compared against.
local PLAN = {
  {w = "W1", luv = "W1"}, {w = "W1n", luv = "W1"},
  {w = "W2", luv = "W2"},
  {w = "W3", luv = "W3"}, {w = "W3n", luv = "W3"},
  {w = "W4", luv = "W4"}, {w = "W4n", luv = "W4"},
  {w = "W5"}, {w = "W6"},
}

local function selected(w) return not opt.only or opt.only[w:sub(1, 2)] end

local samples = {ours = {}, luv = {}} -- engine -> workload -> metric -> list

local function record(engine, w, m)
  local t = samples[engine][w] or {}
  samples[engine][w] = t
  for k, v in pairs(m) do
    t[k] = t[k] or {}
    table.insert(t[k], v)
  end
end

local function brief(m)
  local keys, parts = {}, {}
  for k in pairs(m) do keys[#keys + 1] = k end
  table.sort(keys)
  for _, k in ipairs(keys) do parts[#parts + 1] = string.format("%s=%.4g", k, m[k]) end
  return table.concat(parts, " ")
end

local function loadavg() return sh1("cut -d' ' -f1-3 /proc/loadavg") end

local started = os.time()
local load_before = loadavg()
io.stderr:write(string.format("bench: %s mode, %d repetition(s), build %s, load %s\n",
                              opt.quick and "quick" or "full", opt.reps, opt.build, load_before))

for rep = 1, opt.reps do
  local luv_done = {}
  for _, item in ipairs(PLAN) do
    if selected(item.w) then
      -- Alternate which engine goes first, so drift hits both alike.
      local order = rep % 2 == 1 and {"ours", "luv"} or {"luv", "ours"}
      for _, engine in ipairs(order) do
        local w = engine == "ours" and item.w or item.luv
        if w and not (engine == "luv" and luv_done[w]) then
          if engine == "luv" then luv_done[w] = true end
          local m = run_workload(engine, w, SIZES[w])
          if m then
            record(engine, w, m)
            io.stderr:write(string.format("  rep %d %-4s %-4s %s\n", rep, engine, w, brief(m)))
          end
        end
      end
    end
  end
end

-- ---- instruction counts -----------------------------------------------

local cg = {} -- engine -> workload -> {n1, i1, n2, i2, per_task}
local cg_dir = opt.build .. "/bench/callgrind"

local function callgrind_total(file)
  local f = io.open(file, "r")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return tonumber(s:match("\nsummary:%s*(%d+)") or s:match("\ntotals:%s*(%d+)"))
end

if opt.callgrind then
  if sh1("command -v valgrind") == "" then
    io.stderr:write("bench: valgrind not found; skipping instruction counts\n")
    opt.callgrind = false
  end
end
if opt.callgrind then
  sh("mkdir -p " .. shq(cg_dir))
  io.stderr:write("bench: instruction counts under callgrind\n")
  local CG_PLAN = {
    {"ours", "W1", "W1"}, {"ours", "W1n", "W1"}, {"luv", "W1", "W1"},
    {"ours", "W3", "W3"}, {"ours", "W3n", "W3"}, {"luv", "W3", "W3"},
  }
  for _, it in ipairs(CG_PLAN) do
    local engine, w, size_key = it[1], it[2], it[3]
    if selected(w) then
      local r = {}
      for k, n in ipairs(CG_SIZES[size_key]) do
        local file = string.format("%s/%s.%s.%d.out", cg_dir, w, engine, n)
        local prefix = "valgrind --tool=callgrind --callgrind-out-file=" .. shq(file)
        if run_workload(engine, w, {n}, prefix) then
          r["n" .. k], r["instr" .. k], r["file" .. k] = n, callgrind_total(file), file
        end
      end
      if r.instr1 and r.instr2 then
        r.per_task = (r.instr2 - r.instr1) / (r.n2 - r.n1)
        cg[engine] = cg[engine] or {}
        cg[engine][w] = r
        io.stderr:write(string.format("  %-4s %-4s %.0f instructions per task\n", engine, w,
                                      r.per_task))
      end
    end
  end
  -- Where W1's instructions go (ours, Lua-function task), for the docs.
  local f = cg.ours and cg.ours.W1 and cg.ours.W1.file2
  if f then
    for _, incl in ipairs{"no", "yes"} do
      sh(string.format("callgrind_annotate --inclusive=%s %s > %s 2>&1", incl, shq(f),
                       shq(string.format("%s/W1.ours.%s.txt", cg_dir,
                                         incl == "yes" and "inclusive" or "self"))))
    end
  end
end

-- ---- the table --------------------------------------------------------

local C = dofile(HERE .. "/common.lua")

local function med(engine, w, metric)
  local t = samples[engine][w]
  return t and t[metric] and C.median(t[metric]) or nil
end

-- label, ours (workload, metric), luv (workload, metric), unit, target
-- (kind: "ratio_ge"/"ratio_le" against luv, "abs_ge"/"abs_le" on ours).
local ROWS = {
  {"W1 tiny tasks, Lua function", "W1", "tasks_per_s", "W1", "tasks/s", "ratio_ge", 3},
  {"W1 tiny tasks, named handler", "W1n", "tasks_per_s", "W1", "tasks/s", "ratio_ge", 3},
  {"W2 parallel efficiency", "W2", "efficiency", "W2", "", "abs_ge", 0.97},
  {"W3 round trip, Lua function", "W3", "us_per_rt", "W3", "us", "ratio_le", 1 / 3},
  {"W3 round trip, named handler", "W3n", "us_per_rt", "W3", "us", "ratio_le", 1 / 3},
  {"W4 100-field table, Lua function", "W4", "tasks_per_s", "W4", "tasks/s", "ratio_ge", 5},
  {"W4 100-field table, named handler", "W4n", "tasks_per_s", "W4", "tasks/s", "ratio_ge", 5},
  {"W5 submit, future kept", "W5", "ns_per_submit_keep", nil, "ns", "abs_le", 200},
  {"W5 submit, future discarded", "W5", "ns_per_submit_discard", nil, "ns", "abs_le", 200},
  {"W6 new + 1 task + stop_wait", "W6", "startup_us", nil, "us", "abs_le", 1000},
  {"W6 RSS per idle worker", "W6", "rss_kib_per_idle_worker", nil, "KiB", "abs_le", 300 / 1.024},
  {"W6 RSS per worker after a task", "W6", "rss_kib_per_used_worker", nil, "KiB", "abs_le",
   300 / 1.024},
}

local function fmt(v)
  if v == nil then return "-" end
  local a = math.abs(v)
  if a >= 1e5 then return string.format("%.0f", v) end
  if a >= 100 then return string.format("%.0f", v) end
  if a >= 10 then return string.format("%.1f", v) end
  if a >= 1 then return string.format("%.2f", v) end
  return string.format("%.3f", v)
end

local function target_text(kind, x)
  if kind == "ratio_ge" then return string.format(">= %gx luv", x) end
  if kind == "ratio_le" then return string.format("<= %.2fx luv", x) end
  if kind == "abs_ge" then return string.format(">= %g", x) end
  return string.format("<= %g", x)
end

local results = {rows = {}, instructions = {}}
local lines = {}
local function out(s) lines[#lines + 1] = s end

out("| workload | unit | ours | luv | ratio ours/luv | target | met |")
out("|---|---|---:|---:|---:|---|---|")
for _, r in ipairs(ROWS) do
  local label, w, metric, lw, unit, kind, x = table.unpack(r)
  if selected(w) then
    local o = med("ours", w, metric)
    local l = lw and med("luv", lw, metric) or nil
    local ratio = (o and l and l ~= 0) and o / l or nil
    local met
    if kind == "ratio_ge" then met = ratio and ratio >= x
    elseif kind == "ratio_le" then met = ratio and ratio <= x
    elseif kind == "abs_ge" then met = o and o >= x
    else met = o and o <= x end
    local tt = target_text(kind, x)
    if unit == "KiB" then tt = "< 300 KB" end
    out(string.format("| %s | %s | %s | %s | %s | %s | %s |", label, unit, fmt(o), fmt(l),
                      ratio and string.format("%.2f", ratio) or "-", tt,
                      met == nil and "-" or (met and "yes" or "NO")))
    results.rows[#results.rows + 1] = {
      workload = w, label = label, metric = metric, unit = unit, ours = o, luv = l,
      ratio = ratio, target = tt, met = met, luv_workload = lw,
    }
  end
end

if opt.callgrind and next(cg) then
  out("")
  out("| instructions per task (callgrind) | ours | luv | ratio ours/luv |")
  out("|---|---:|---:|---:|")
  for _, it in ipairs{{"W1", "W1", "W1 tiny task, Lua function"},
                      {"W1n", "W1", "W1 tiny task, named handler"},
                      {"W3", "W3", "W3 round trip, Lua function"},
                      {"W3n", "W3", "W3 round trip, named handler"}} do
    local w, lw, label = it[1], it[2], it[3]
    local o = cg.ours and cg.ours[w]
    local l = cg.luv and cg.luv[lw]
    if o or l then
      local ov, lv = o and o.per_task, l and l.per_task
      out(string.format("| %s | %s | %s | %s |", label, ov and string.format("%.0f", ov) or "-",
                        lv and string.format("%.0f", lv) or "-",
                        (ov and lv) and string.format("%.2f", ov / lv) or "-"))
      results.instructions[#results.instructions + 1] = {
        workload = w, label = label, ours = ov, luv = lv, ours_runs = o, luv_runs = l,
      }
    end
  end
end

local table_text = table.concat(lines, "\n")
print(table_text)

-- ---- JSON -------------------------------------------------------------

local function json(v, ind)
  ind = ind or ""
  local t = type(v)
  if t == "nil" then return "null" end
  if t == "boolean" then return tostring(v) end
  if t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return "null" end
    if math.type(v) == "integer" then return tostring(v) end
    return string.format("%.17g", v)
  end
  if t == "string" then
    return '"' .. v:gsub('[%c"\\]', function(c)
      local map = {['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\t"] = "\\t"}
      return map[c] or string.format("\\u%04x", c:byte())
    end) .. '"'
  end
  local inner = ind .. "  "
  if #v > 0 or next(v) == nil then
    local parts = {}
    for i = 1, #v do parts[i] = inner .. json(v[i], inner) end
    if #parts == 0 then return "[]" end
    return "[\n" .. table.concat(parts, ",\n") .. "\n" .. ind .. "]"
  end
  local keys, parts = {}, {}
  for k in pairs(v) do keys[#keys + 1] = tostring(k) end
  table.sort(keys)
  for _, k in ipairs(keys) do
    parts[#parts + 1] = inner .. json(k) .. ": " .. json(v[k], inner)
  end
  return "{\n" .. table.concat(parts, ",\n") .. "\n" .. ind .. "}"
end

local function cpu_model()
  local f = io.open("/proc/cpuinfo", "r")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s:match("model name%s*:%s*([^\n]+)")
end

results.mode = opt.quick and "quick" or "full"
results.repetitions = opt.reps
results.sizes = SIZES
results.callgrind_sizes = opt.callgrind and CG_SIZES or nil
results.samples = samples
results.table = table_text
results.failures = failures
results.machine = {
  cpu = cpu_model(),
  cpus = tonumber(sh1("nproc")),
  kernel = sh1("uname -sr"),
  memory = sh1("free -h | awk '/^Mem:/{print $2}'"),
  lua = sh1("lua5.4 -v 2>&1"),
  luv = sh1("lua5.4 -e 'print(require(\"luv\").version_string())' 2>&1"),
  compiler = sh1("cc --version 2>/dev/null | head -1"),
  build_type = sh1("sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' " .. shq(opt.build .. "/CMakeCache.txt")
                   .. " 2>/dev/null"),
  commit = sh1("git rev-parse --short HEAD 2>/dev/null"),
  dirty = sh1("git status --porcelain -- core bindings 2>/dev/null | head -1") ~= "",
  load_before = load_before,
  load_after = loadavg(),
  date = os.date("!%Y-%m-%dT%H:%M:%SZ", started),
  seconds = os.time() - started,
}

sh("mkdir -p " .. shq(opt.json:match("^(.*)/[^/]*$") or "."))
local f = assert(io.open(opt.json, "w"))
f:write(json(results), "\n")
f:close()
io.stderr:write("bench: results written to " .. opt.json .. "\n")

if #failures > 0 then
  io.stderr:write(string.format("bench: %d run(s) FAILED:\n", #failures))
  for _, s in ipairs(failures) do io.stderr:write(s, "\n") end
  os.exit(1)
end
