# assertions.cmake: the assertion build (-DWPOOL_ASSERTIONS=ON,
# docs/testing.md).  Every assert of the project is on (no NDEBUG, so
# wp__pool_check_locked and the stack checks of worker.c run), and Lua is
# one built with LUA_USE_APICHECK by scripts/lua-apicheck.sh, which makes
# Lua's own API assert its arguments: a push past the stack, an index
# out of range, a pop of what is not there.  That Lua (WPOOL_LUA_APICHECK_DIR:
# lib/liblua.a, include/, bin/lua) replaces the system's liblua5.4 in
# everything linked, and its bin/lua runs the lua.* suites.
# Included by CMakeLists.txt before the tests, after every target.
option(WPOOL_ASSERTIONS "Assertions on, and Lua with LUA_USE_APICHECK" OFF)
if(NOT WPOOL_ASSERTIONS)
  return()
endif()
if(WPOOL_SANITIZE OR WPOOL_FUZZ)
  message(FATAL_ERROR "WPOOL_ASSERTIONS is a build of its own: no "
                      "WPOOL_SANITIZE, no WPOOL_FUZZ")
endif()
set(WPOOL_LUA_APICHECK_DIR "${PROJECT_SOURCE_DIR}/.cache/lua-apicheck"
    CACHE PATH "Lua built by scripts/lua-apicheck.sh")
set(apicheck ${WPOOL_LUA_APICHECK_DIR})
if(NOT EXISTS ${apicheck}/lib/liblua.a OR NOT EXISTS ${apicheck}/bin/lua)
  message(FATAL_ERROR "no Lua with API checks in ${apicheck}: run "
                      "scripts/lua-apicheck.sh first")
endif()

# No NDEBUG in any configuration.
foreach(config DEBUG RELEASE RELWITHDEBINFO MINSIZEREL)
  string(REPLACE "-DNDEBUG" "" CMAKE_C_FLAGS_${config}
                 "${CMAKE_C_FLAGS_${config}}")
endforeach()

# Lua: ours instead of the system's, in every target that names it.
# lua5.4-luv's pkg-config file names -llua5.4 too: dropped, so that only
# one Lua is loaded.
set(lua_apicheck_libs ${apicheck}/lib/liblua.a m dl)
foreach(t PkgConfig::LUA PkgConfig::wpool_lua)
  set_target_properties(${t} PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES ${apicheck}/include
    INTERFACE_LINK_LIBRARIES "${lua_apicheck_libs}"
    INTERFACE_LINK_OPTIONS "" INTERFACE_LINK_DIRECTORIES "")
endforeach()
get_target_property(luv_libs PkgConfig::wpool_luv INTERFACE_LINK_LIBRARIES)
list(FILTER luv_libs EXCLUDE REGEX "liblua5\\.4\\.(so|a)$")
set_target_properties(PkgConfig::wpool_luv PROPERTIES
  INTERFACE_LINK_LIBRARIES "${luv_libs}")
# The Lua headers: ours first (the same release as the system's).
foreach(t wpoolcore wpoolbind wpool_core_objs)
  target_include_directories(${t} BEFORE PUBLIC ${apicheck}/include)
endforeach()
set(LUA_INTERP ${apicheck}/bin/lua CACHE FILEPATH "lua.* suites' Lua" FORCE)
