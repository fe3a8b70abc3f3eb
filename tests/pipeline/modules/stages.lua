-- stages.lua: stage functions shared by the pipeline test configs.
local M = {}
function M.id(x) return x end
function M.upper(s) return s:upper() end
function M.zero() return 0 end
function M.add(a, x) return a + x end
function M.merge(a, b) return a + b end
function M.finish(a) return a end
return M
