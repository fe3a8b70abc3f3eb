-- workerpool-0.1.0-1.rockspec: builds the workerpool module (and the wpool
-- command) from a checkout with CMake: `luarocks --lua-version 5.4 make`.
rockspec_format = "3.0"
package = "workerpool"
version = "0.1.0-1"
source = {
   url = "git+file:///dev/null", -- no published source: build a checkout with `luarocks make`
}
description = {
   summary = "Lua 5.4 tasks on a pool of worker threads, each with its own Lua state",
   license = "MIT",
   detailed = [[
A C engine that runs Lua 5.4 tasks on a pool of worker threads, each worker
owning its own Lua state, with futures, policies and a libuv host runtime.
Needs the Debian packages liblua5.4-dev, libuv1-dev, libjansson-dev,
libhttp-parser-dev, lua-luv-dev and libhiredis-dev, plus cmake and pkg-config.]],
}
dependencies = {
   "lua >= 5.4, < 5.5",
}
build = {
   type = "cmake",
   variables = {
      CMAKE_BUILD_TYPE = "Release",
      BUILD_TESTING = "OFF",
      WPOOL_WERROR = "OFF",
   },
   install_pass = false,
   install = {
      lib = { workerpool = "build.luarocks/workerpool.so" },
      bin = { wpool = "build.luarocks/wpool" },
   },
}
