-- workerpool.exposition: appends the output of the Lua metric collectors
-- (workerpool.metrics_collector) to the engine's Prometheus text, keeping
-- the whole exposition valid: a collector whose output is malformed, or
-- reuses a metric family already present, is dropped with a logged error.
local workerpool = require "workerpool"

local M = {}

local TYPES = { counter = true, gauge = true, histogram = true, summary = true,
                untyped = true }
local SUFFIXES = { "_bucket", "_sum", "_count", "_total", "_created" }

local function valid_name(n)
  return n ~= nil and n:match("^[a-zA-Z_:][a-zA-Z0-9_:]*$") ~= nil
end

local function valid_value(v)
  if v == "+Inf" or v == "-Inf" or v == "NaN" then return true end
  return tonumber(v) ~= nil and not v:find("^0[xX]") and not v:find("[%s_]")
end

-- Parses the label set `s` (without braces); returns a canonical form or
-- nil and why.
local function parse_labels(s)
  local i, names, out = 1, {}, {}
  while i <= #s do
    local name, after = s:match("^([a-zA-Z_][a-zA-Z0-9_]*)=\"()", i)
    if not name then return nil, "bad label near '" .. s:sub(i, i + 20) .. "'" end
    if names[name] then return nil, "duplicate label '" .. name .. "'" end
    names[name] = true
    local j = after
    while true do
      local c = s:sub(j, j)
      if c == "" then return nil, "unterminated label value" end
      if c == "\\" then
        local e = s:sub(j + 1, j + 1)
        if e ~= "\\" and e ~= '"' and e ~= "n" then return nil, "bad escape in label value" end
        j = j + 2
      elseif c == '"' then
        break
      else
        j = j + 1
      end
    end
    if not utf8.len(s:sub(after, j - 1)) then return nil, "label value is not UTF-8" end
    out[#out + 1] = s:sub(i, j)
    i = j + 1
    if s:sub(i, i) == "," then i = i + 1 elseif i <= #s then return nil, "expected ','" end
  end
  table.sort(out)
  return table.concat(out, ",")
end

-- The family a sample named n belongs to, given the families declared.
local function family_of(n, declared)
  if declared[n] then return n end
  for _, suf in ipairs(SUFFIXES) do
    if n:sub(-#suf) == suf and declared[n:sub(1, -#suf - 1)] then return n:sub(1, -#suf - 1) end
  end
  return n
end

-- Scans text; `used` maps family names already in the exposition to
-- true. Returns the families text declares or uses, or nil and why.
function M.check(text, used)
  if type(text) ~= "string" then return nil, "returned " .. type(text) .. ", not a string" end
  local declared, mine, series, current, closed = {}, {}, {}, nil, {}
  local lineno = 0
  local function enter(fam)
    if fam ~= current then
      if closed[fam] then return nil, "samples of '" .. fam .. "' are not together" end
      if current then closed[current] = true end
      current = fam
    end
    if used[fam] then return nil, "metric family '" .. fam .. "' already exists" end
    mine[fam] = true
    return true
  end
  for line in text:gmatch("([^\n]*)\n") do
    lineno = lineno + 1
    local ok, why = true, nil
    if line:sub(1, 1) == "#" then
      local kind, name, rest = line:match("^#%s+(%u+)%s+(%S+)%s*(.*)$")
      if kind == "TYPE" or kind == "HELP" then
        if not valid_name(name) then
          ok, why = nil, "bad metric name '" .. tostring(name) .. "'"
        elseif kind == "TYPE" then
          if not TYPES[rest] then
            ok, why = nil, "bad type '" .. rest .. "'"
          elseif declared[name] then
            ok, why = nil, "second TYPE for '" .. name .. "'"
          else
            declared[name] = true
            ok, why = enter(name)
          end
        else
          if not utf8.len(rest) then ok, why = nil, "HELP is not UTF-8" end
          if ok then ok, why = enter(name) end
        end
      end
    elseif line ~= "" then
      local name, labels, rest = line:match("^([a-zA-Z_:][a-zA-Z0-9_:]*){(.-)}%s+(.*)$")
      if not name then
        name, rest = line:match("^([a-zA-Z_:][a-zA-Z0-9_:]*)%s+(.*)$")
        labels = ""
      end
      if not name then
        ok, why = nil, "not a sample"
      else
        local value, ts = rest:match("^(%S+)%s*(%S*)$")
        local canon
        canon, why = parse_labels(labels)
        if not canon then
          ok = nil
        elseif not value or not valid_value(value) then
          ok, why = nil, "bad value '" .. rest .. "'"
        elseif ts ~= "" and not ts:match("^%-?%d+$") then
          ok, why = nil, "bad timestamp '" .. ts .. "'"
        else
          local key = name .. "{" .. canon .. "}"
          if series[key] then
            ok, why = nil, "duplicate series " .. key
          else
            series[key] = true
            ok, why = enter(family_of(name, declared))
          end
        end
      end
    else
      ok, why = nil, "empty line"
    end
    if not ok then return nil, string.format("line %d: %s", lineno, why) end
  end
  if #text > 0 and text:sub(-1) ~= "\n" then return nil, "does not end with a newline" end
  return mine
end

-- The families in the engine's own text.
local function families(text)
  local used = {}
  for name in text:gmatch("# TYPE (%S+)") do used[name] = true end
  return used
end

-- append(text, collectors) -> text with each collector's valid output
-- (collectors run in name order).
function M.append(text, collectors)
  local names = {}
  for name in pairs(collectors) do names[#names + 1] = name end
  table.sort(names, function(a, b) return tostring(a) < tostring(b) end)
  local used = families(text)
  local out = { text }
  for _, name in ipairs(names) do
    local ok, got = pcall(collectors[name])
    local fams, why
    if ok then
      fams, why = M.check(got, used)
    else
      why = "raised: " .. tostring(got)
    end
    if fams then
      for f in pairs(fams) do used[f] = true end
      out[#out + 1] = got
    else
      workerpool.log("error", "metrics collector dropped",
        { collector = tostring(name), error = why })
    end
  end
  return table.concat(out)
end

return M
