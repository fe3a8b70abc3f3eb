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
  --reps N         repetitions of each workload per engine (default 7, quick 1)
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
  opt.reps = opt.reps or (opt.quick and 1 or 7)
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
SIZES.W1n, SIZES.W1m, SIZES.W3n, SIZES.W4n = SIZES.W1, SIZES.W1, SIZES.W3, SIZES.W4

-- Callgrind sizes: two N per workload, differenced to cancel start-up.
local CG_SIZES = opt.quick and {W1 = {200, 1000}, W3 = {100, 500}, W4 = {50, 250}}
  or {W1 = {4000, 20000}, W3 = {1000, 5000}, W4 = {500, 2500}}

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
local function run_workload(engine, w, sizes, prefix, interp)
  local cmd = string.format("%s %s %s %s/%s.lua %s %s 2>&1", ENV[engine], prefix or "",
                            interp or "lua5.4", HERE, engine, w, table.concat(sizes, " "))
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
  {w = "W1", luv = "W1"}, {w = "W1n", luv = "W1"}, {w = "W1m", luv = "W1"},
  {w = "W2", luv = "W2"},
  {w = "W3", luv = "W3"}, {w = "W3n", luv = "W3"},
  {w = "W4", luv = "W4"}, {w = "W4n", luv = "W4"},
  {w = "W5"}, {w = "W6"},
}

local function selected(w) return not opt.only or opt.only[w:sub(1, 2)] end

-- engine -> workload -> list of {rep = k, metrics = {name -> number}}
local runs = {ours = {}, luv = {}, plain = {}}

local function record(engine, w, rep, m)
  runs[engine][w] = runs[engine][w] or {}
  table.insert(runs[engine][w], {rep = rep, metrics = m})
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
if (tonumber(load_before:match("^%S+")) or 0) >= 1 then
  io.stderr:write("bench: warning: the machine is busy (load average above 1); "
                  .. "timings will be noisy, ratios less so\n")
end

-- W2's ceiling: the same loops with no engine, one plain process over each
-- half (before and after) against two plain processes at once.
local function run_ceiling(rep)
  local n, iters = SIZES.W2[1], SIZES.W2[2]
  local half = n // 2
  local function plain(first, last)
    return string.format("lua5.4 %s/plain.lua %d %d %d", HERE, first, last, iters)
  end
  local m = {}
  local function collect(cmd, tag)
    local out, code = sh(cmd .. " 2>&1")
    for name, v in out:gmatch("metric (%S+) (%S+)") do m[tag .. name] = tonumber(v) end
    if code ~= 0 then
      failures[#failures + 1] = "plain W2 ceiling: exit " .. tostring(code) .. "\n" .. out
    end
  end
  collect(plain(1, half), "a_")
  collect(plain(1, half) .. " & " .. plain(half + 1, n) .. " & wait", "p_")
  collect(plain(half + 1, n), "b_")
  local serial = (m["a_seconds_1"] or 0) + (m["b_seconds_" .. (half + 1)] or 0)
  local p1, p2 = m["p_seconds_1"], m["p_seconds_" .. (half + 1)]
  if not (p1 and p2 and serial > 0) then return end
  local r = {serial_s = serial, parallel_s = math.max(p1, p2),
             efficiency = serial / (2 * math.max(p1, p2))}
  record("plain", "W2", rep, r)
  io.stderr:write(string.format("  rep %d %-5s %-4s %s\n", rep, "plain", "W2", brief(r)))
end

for rep = 1, opt.reps do
  local luv_done = {}
  for _, item in ipairs(PLAN) do
    if selected(item.w) then
      if item.w == "W2" then run_ceiling(rep) end
      -- Alternate which engine goes first, so drift hits both alike.
      local order = rep % 2 == 1 and {"ours", "luv"} or {"luv", "ours"}
      for _, engine in ipairs(order) do
        local w = engine == "ours" and item.w or item.luv
        if w and not (engine == "luv" and luv_done[w]) then
          if engine == "luv" then luv_done[w] = true end
          local m = run_workload(engine, w, SIZES[w])
          if m then
            record(engine, w, rep, m)
            io.stderr:write(string.format("  rep %d %-5s %-4s %s\n", rep, engine, w, brief(m)))
          end
        end
      end
    end
  end
end

-- ---- instruction counts -----------------------------------------------

local cg = {} -- engine -> workload -> {n1, instr1, n2, instr2, per_task}
local cg_dir = opt.build .. "/bench/callgrind"
local cg_interp = "lua5.4"

local function callgrind_total(file)
  local f = io.open(file, "r")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return tonumber(s:match("\nsummary:%s*(%d+)") or s:match("\ntotals:%s*(%d+)"))
end

-- Builds luahost.c against the static liblua5.4.a, whose symbols let
-- callgrind name Lua's internal functions.  Falls back to lua5.4.
local function build_luahost()
  local exe = opt.build .. "/bench/luahost"
  local cflags = sh1("pkg-config --cflags lua5.4 2>/dev/null")
  local libdir = sh1("pkg-config --variable=libdir lua5.4 2>/dev/null")
  if libdir == "" then libdir = "/usr/lib/x86_64-linux-gnu" end
  local cmd = string.format("cc -O2 -g %s %s/luahost.c -o %s -Wl,-E -Wl,--whole-archive "
                            .. "%s/liblua5.4.a -Wl,--no-whole-archive -lm -ldl 2>&1",
                            cflags, HERE, shq(exe), shq(libdir))
  local out, code = sh(cmd)
  if code == 0 then return exe end
  io.stderr:write("bench: could not build luahost (Lua's functions stay unnamed):\n", out)
  return "lua5.4"
end

if opt.callgrind then
  if sh1("command -v valgrind") == "" then
    io.stderr:write("bench: valgrind not found; skipping instruction counts\n")
    opt.callgrind = false
  end
end
if opt.callgrind then
  sh("mkdir -p " .. shq(cg_dir))
  cg_interp = build_luahost()
  io.stderr:write("bench: instruction counts under callgrind\n")
  local CG_PLAN = {
    {"ours", "W1", "W1"}, {"ours", "W1n", "W1"}, {"luv", "W1", "W1"},
    {"ours", "W3", "W3"}, {"ours", "W3n", "W3"}, {"luv", "W3", "W3"},
    {"ours", "W4", "W4"}, {"ours", "W4n", "W4"}, {"luv", "W4", "W4"},
  }
  for _, it in ipairs(CG_PLAN) do
    local engine, w, size_key = it[1], it[2], it[3]
    if selected(w) then
      local r = {}
      for k, n in ipairs(CG_SIZES[size_key]) do
        local file = string.format("%s/%s.%s.%d.out", cg_dir, w, engine, n)
        local prefix = "BENCH_WARM_ROUNDS=0 valgrind --tool=callgrind --callgrind-out-file="
          .. shq(file)
        if run_workload(engine, w, {n}, prefix, shq(cg_interp)) then
          r["n" .. k], r["instr" .. k], r["file" .. k] = n, callgrind_total(file), file
        end
      end
      if r.instr1 and r.instr2 then
        r.per_task = (r.instr2 - r.instr1) / (r.n2 - r.n1)
        cg[engine] = cg[engine] or {}
        cg[engine][w] = r
        io.stderr:write(string.format("  %-5s %-4s %.0f instructions per task\n", engine, w,
                                      r.per_task))
      end
    end
  end
  -- Where the instructions go: callgrind_annotate of the larger run, and
  -- a per-task profile, each function's cost differenced between the two
  -- runs and divided by the difference in tasks (start-up cancels out).
  local function annotate(file, incl)
    local out = sh(string.format("callgrind_annotate --auto=no --threshold=100 --inclusive=%s %s",
                                 incl, shq(file)))
    local t = {}
    for line in out:gmatch("[^\n]+") do
      local num, fn = line:match("^%s*([%d,]+) %(%s*[%d.]+%%%)%s+(.+)$")
      -- Inclusive listings name some functions twice, once without their
      -- object file: keep the one with it.
      if num and not fn:find("PROGRAM TOTALS", 1, true)
         and (incl == "no" or fn:find("%]$")) then
        fn = fn:gsub("%[[^%]]*/([^/%]]+)%]$", "[%1]") -- object file without its path
        t[fn] = (t[fn] or 0) + tonumber((num:gsub(",", "")))
      end
    end
    return t, out
  end
  for engine, ws in pairs(cg) do
    for w, r in pairs(ws) do
      for _, incl in ipairs{"no", "yes"} do
        local kind = incl == "yes" and "inclusive" or "self"
        local a = annotate(r.file1, incl)
        local b, text = annotate(r.file2, incl)
        local f = assert(io.open(string.format("%s/%s.%s.%s.txt", cg_dir, w, engine, kind), "w"))
        f:write(text)
        f:close()
        local rows = {}
        for fn, v in pairs(b) do rows[#rows + 1] = {fn, (v - (a[fn] or 0)) / (r.n2 - r.n1)} end
        table.sort(rows, function(x, y) return x[2] > y[2] end)
        f = assert(io.open(string.format("%s/%s.%s.pertask-%s.txt", cg_dir, w, engine, kind), "w"))
        f:write(string.format("# %s %s: %s instructions per task by function (callgrind, N=%d "
                              .. "minus N=%d)\n", engine, w, kind, r.n2, r.n1))
        for i = 1, math.min(60, #rows) do
          f:write(string.format("%10.1f  %s\n", rows[i][2], rows[i][1]))
        end
        f:close()
      end
    end
  end
end

-- ---- the table --------------------------------------------------------

local C = dofile(HERE .. "/common.lua")

-- rep -> value of one metric; spec = {engine, workload, metric [, per =
-- spec]}, where per divides each repetition's value by another's.
local function series(spec)
  local t = {}
  if not spec then return t end
  for _, run in ipairs(runs[spec[1]][spec[2]] or {}) do t[run.rep] = run.metrics[spec[3]] end
  if spec.per then
    local d = series(spec.per)
    for rep, v in pairs(t) do t[rep] = d[rep] and d[rep] ~= 0 and v / d[rep] or nil end
  end
  return t
end

local function values(t)
  local l = {}
  for _, v in pairs(t) do l[#l + 1] = v end
  return l
end

-- The ratio of two series: the median of their per-repetition ratios (a
-- pair ran minutes apart at most), which drift in the machine's speed
-- disturbs less than a ratio of medians.
local function paired_ratio(o, l)
  local r = {}
  for rep, v in pairs(o) do
    if l[rep] and l[rep] ~= 0 then r[#r + 1] = v / l[rep] end
  end
  return C.median(r)
end

-- W2 best of the repetitions: min serial / (2 x min parallel).  Noise on a
-- shared machine only ever adds time, so this estimates what the engine
-- gives on a quiet machine; stored as a pseudo-run numbered 0.
for _, engine in ipairs{"ours", "luv", "plain"} do
  local serial, parallel
  for _, run in ipairs(runs[engine].W2 or {}) do
    local m = run.metrics
    serial = math.min(serial or math.huge, m.serial_s)
    parallel = math.min(parallel or math.huge, m.parallel_s)
  end
  if serial and parallel > 0 then
    runs[engine].W2best = {{rep = 0, metrics = {efficiency = serial / (2 * parallel),
                                                 serial_s = serial, parallel_s = parallel}}}
  end
end

local OURS_W2 = {"ours", "W2", "efficiency"}
local LUV_W2 = {"luv", "W2", "efficiency"}
local PLAIN_W2 = {"plain", "W2", "efficiency"}
local KB300 = 300 / 1.024 -- 300 KB in KiB

-- label, ours spec, luv spec, unit, target kind, target value; kinds:
-- ratio_ge / ratio_le compare the paired ratio, abs_ge / abs_le ours.
local ROWS = {
  {"W1 tiny tasks, Lua function", {"ours", "W1", "tasks_per_s"}, {"luv", "W1", "tasks_per_s"},
   "tasks/s", "ratio_ge", 3},
  {"W1 tiny tasks, named handler", {"ours", "W1n", "tasks_per_s"}, {"luv", "W1", "tasks_per_s"},
   "tasks/s", "ratio_ge", 3},
  {"W1 items through pool:map (batched)", {"ours", "W1m", "tasks_per_s"},
   {"luv", "W1", "tasks_per_s"}, "tasks/s", nil},
  {"W1 Lua function, first round (cold heap)", {"ours", "W1", "tasks_per_s_cold"},
   {"luv", "W1", "tasks_per_s_cold"}, "tasks/s", nil},
  {"W1 named handler, first round (cold heap)", {"ours", "W1n", "tasks_per_s_cold"},
   {"luv", "W1", "tasks_per_s_cold"}, "tasks/s", nil},
  {"W2 parallel efficiency", OURS_W2, LUV_W2, "", "abs_ge", 0.97},
  {"W2 efficiency, best of the repetitions", {"ours", "W2best", "efficiency"},
   {"luv", "W2best", "efficiency"}, "", nil},
  {"W2 ceiling: 2 plain lua5.4 processes", PLAIN_W2, nil, "", nil},
  {"W2 ceiling, best of the repetitions", {"plain", "W2best", "efficiency"}, nil, "", nil},
  {"W2 efficiency / ceiling", {"ours", "W2", "efficiency", per = PLAIN_W2},
   {"luv", "W2", "efficiency", per = PLAIN_W2}, "", nil},
  {"W3 round trip, Lua function", {"ours", "W3", "us_per_rt"}, {"luv", "W3", "us_per_rt"}, "us",
   "ratio_le", 1 / 3},
  {"W3 round trip, named handler", {"ours", "W3n", "us_per_rt"}, {"luv", "W3", "us_per_rt"},
   "us", "ratio_le", 1 / 3},
  {"W4 100-field table, Lua function", {"ours", "W4", "tasks_per_s"},
   {"luv", "W4", "tasks_per_s"}, "tasks/s", "ratio_ge", 5},
  {"W4 100-field table, named handler", {"ours", "W4n", "tasks_per_s"},
   {"luv", "W4", "tasks_per_s"}, "tasks/s", "ratio_ge", 5},
  {"W4 Lua function, first round (cold heap)", {"ours", "W4", "tasks_per_s_cold"},
   {"luv", "W4", "tasks_per_s_cold"}, "tasks/s", nil},
  {"W4 named handler, first round (cold heap)", {"ours", "W4n", "tasks_per_s_cold"},
   {"luv", "W4", "tasks_per_s_cold"}, "tasks/s", nil},
  {"W5 submit, future kept", {"ours", "W5", "ns_per_submit_keep"}, nil, "ns", "abs_le", 200},
  {"W5 submit, future discarded", {"ours", "W5", "ns_per_submit_discard"}, nil, "ns", "abs_le",
   200},
  {"W5 post (no future)", {"ours", "W5", "ns_per_post"}, nil, "ns", "abs_le", 200},
  {"W5 submit, future kept, cold heap", {"ours", "W5", "ns_per_submit_cold"}, nil, "ns", nil},
  {"W6 new + 1 task + stop_wait", {"ours", "W6", "startup_us"}, nil, "us", "abs_le", 1000},
  {"W6 RSS per idle worker", {"ours", "W6", "rss_kib_per_idle_worker"}, nil, "KiB", "abs_le",
   KB300},
  {"W6 RSS per worker after a task", {"ours", "W6", "rss_kib_per_used_worker"}, nil, "KiB",
   "abs_le", KB300},
}

local function fmt(v)
  if v == nil then return "-" end
  local a = math.abs(v)
  if a >= 100 then return string.format("%.0f", v) end
  if a >= 10 then return string.format("%.1f", v) end
  if a >= 1 then return string.format("%.2f", v) end
  return string.format("%.3f", v)
end

local function target_text(kind, x)
  if kind == nil then return "-" end
  if x == KB300 then return "< 300 KB" end
  if kind == "ratio_ge" then return string.format(">= %gx luv", x) end
  if kind == "ratio_le" then return string.format("<= %.2fx luv", x) end
  if kind == "abs_ge" then return string.format(">= %g", x) end
  return string.format("<= %g", x)
end

local function spec_name(spec)
  if not spec then return nil end
  local n = table.concat(spec, ".")
  return spec.per and n .. " / " .. spec_name(spec.per) or n
end

local results = {rows = {}, instructions = {}}
local lines = {}
local function out(s) lines[#lines + 1] = s end

out("| workload | unit | ours | luv | ratio ours/luv | target | met |")
out("|---|---|---:|---:|---:|---|---|")
for _, row in ipairs(ROWS) do
  local label, ospec, lspec, unit, kind, x = table.unpack(row, 1, 6)
  if selected(ospec[2]) then
    local os_, ls = series(ospec), series(lspec)
    local o, l = C.median(values(os_)), C.median(values(ls))
    local ratio = lspec and paired_ratio(os_, ls) or nil
    local met
    if kind == "ratio_ge" then met = ratio and ratio >= x
    elseif kind == "ratio_le" then met = ratio and ratio <= x
    elseif kind == "abs_ge" then met = o and o >= x
    elseif kind == "abs_le" then met = o and o <= x end
    local tt = target_text(kind, x)
    out(string.format("| %s | %s | %s | %s | %s | %s | %s |", label, unit, fmt(o), fmt(l),
                      ratio and string.format("%.2f", ratio) or "-", tt,
                      met == nil and "-" or (met and "yes" or "NO")))
    results.rows[#results.rows + 1] = {
      label = label, ours_source = spec_name(ospec), luv_source = spec_name(lspec), unit = unit,
      ours = o, luv = l,
      ratio = ratio, target = tt, met = met, ours_samples = values(os_), luv_samples = values(ls),
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
                      {"W3n", "W3", "W3 round trip, named handler"},
                      {"W4", "W4", "W4 100-field table, Lua function"},
                      {"W4n", "W4", "W4 100-field table, named handler"}} do
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
results.runs = runs
results.callgrind_interpreter = opt.callgrind and cg_interp or nil
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
