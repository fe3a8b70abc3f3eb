-- luacheck configuration for wpool's Lua code and tests.
std = "lua54"
max_line_length = 100
-- Tasks run in worker states whose init scripts define global handlers.
allow_defined_top = true
