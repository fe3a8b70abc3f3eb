-- workerpool.policy: how a pool's policies travel between states (the Lua
-- half of pool:use, pool:policies and admission; bindings/policy.c is the
-- C half).
--
-- A pool carries, process-wide, an encoded list of items, one per
-- attached policy: {id =, module =, fn =, opts =, name =} for a policy any
-- state can rebuild, {id =, name =, ["local"] = true} for one that only
-- the attaching state has. Each state keeps, per pool, a table
-- st = {version =, list = {...}, objs = {[id] = policy}} and rebuilds
-- st.list when the pool's version changes. `prim` holds the C primitives:
-- read(p) -> version, items | 0, nil; store(p, version, items) -> true
-- (stored) | false (changed meanwhile); encodable(v) -> true | false, err.
local policy = {}

local next_id = 0

-- A policy from its spec: require(module)[fn](opts), or without fn
-- require(module)(opts) / require(module).new(opts).
function policy.build(spec)
  local m = require(spec.module)
  local ctor
  if spec.fn ~= nil then
    ctor = type(m) == "table" and m[spec.fn]
  elseif type(m) == "function" or (getmetatable(m) or {}).__call then
    ctor = m
  elseif type(m) == "table" then
    ctor = m.new
  end
  if type(ctor) ~= "function" and not (getmetatable(ctor) or {}).__call then
    error(string.format("policy module '%s' has no %s", spec.module,
      spec.fn and ("function '" .. spec.fn .. "'") or "constructor (a function or .new)"), 0)
  end
  local p = ctor(spec.opts)
  if type(p) ~= "table" or type(p.admit) ~= "function" then
    error(string.format("policy module '%s' built %s, not a policy (a table with admit)",
      spec.module, type(p)), 0)
  end
  return p
end

local function display(obj, spec)
  if type(obj.name) == "string" then return obj.name end
  if spec then return spec.fn and (spec.module .. "." .. spec.fn) or spec.module end
  return tostring(obj)
end

-- pool:use(policy) or pool:use("module", opts): attaches to the pool p
-- (a light userdata) for every state. Returns the policy object.
function policy.use(p, st, prim, arg, opts)
  local obj, spec
  if type(arg) == "string" then
    spec = { module = arg, opts = opts }
    obj = policy.build(spec)
  else
    obj = arg
    spec = type(obj.spec) == "table" and type(obj.spec.module) == "string" and obj.spec or nil
  end
  next_id = next_id + 1
  local id = string.format("%s:%d", prim.token, next_id)
  local item = { id = id, name = display(obj, spec) }
  if spec then
    item.module, item.fn, item.opts = spec.module, spec.fn, spec.opts
    if not prim.encodable(item) then -- options that cannot cross states
      item.module, item.fn, item.opts = nil, nil, nil
      spec = nil
    end
  end
  if not spec then item["local"] = true end
  st.objs[id] = obj
  while true do
    local version, items = prim.read(p)
    items = items or {}
    items[#items + 1] = item
    if prim.store(p, version, items) then break end
  end
  return obj
end

-- Rebuilds st.list from the pool's items, reusing the policies this
-- state already has.
function policy.refresh(st, items)
  local list = {}
  for _, it in ipairs(items or {}) do
    local o = st.objs[it.id]
    if o == nil and not it["local"] then
      local ok, built = pcall(policy.build, it)
      if not ok then
        error(string.format("policy '%s' of pool '%s' cannot be built in this state: %s",
          it.name, st.pool_name, tostring(built)), 0)
      end
      o = built
      st.objs[it.id] = o
    end
    if o ~= nil then list[#list + 1] = o end
  end
  st.list = list
  return list
end

-- pool:policies() -> {{name =, module =, fn =, ["local"] = bool}, ...}
function policy.list(p, prim)
  local _, items = prim.read(p)
  local out = {}
  for i, it in ipairs(items or {}) do
    out[i] = { name = it.name, module = it.module, fn = it.fn,
               ["local"] = it["local"] and true or false }
  end
  return out
end

return policy
