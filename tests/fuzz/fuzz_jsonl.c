/*
 * fuzz_jsonl.c: libFuzzer target for the jsonl reader of the pipeline
 * (workerpool["pipeline.lines"](fh, "jsonl"), bindings/lpack.c).
 *
 * Each input is written to a file and read back in blocks by the reader;
 * every non-blank line must come out exactly once and in order, in the
 * block when json.decode (jansson) decodes it and in the list of bad
 * lines, with json.decode's message, when it does not.  The reader's
 * quick scan may leave a line to jansson, but must never call a line
 * good that jansson refuses: the workers decode the block without a way
 * back.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>

int luaopen_workerpool(lua_State *L);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char path[4096];

static const char check[] =
    "local path, k = ...\n"
    "local wp = require 'workerpool'\n"
    "local decode, split = wp.json.decode, wp['pipeline.split']\n"
    "local f = assert(io.open(path, 'rb'))\n"
    "local text = f:read('a')\n"
    "f:close()\n"
    "local want = {}\n"
    "for l in (text .. '\\n'):gmatch('(.-)\\n') do\n"
    "  if not l:match('^%s*$') then want[#want + 1] = l end\n"
    "end\n"
    "local fh = assert(io.open(path, 'rb'))\n"
    "local rd, n = wp['pipeline.lines'](fh, 'jsonl'), 0\n"
    "while true do\n"
    "  local b, c, bad = rd(k)\n"
    "  if not b then break end\n"
    "  local good, bi, gi = split(b), 1, 1\n"
    "  for i = 1, c do\n"
    "    n = n + 1\n"
    "    local l = want[n]\n"
    "    local v, e = decode(l or '')\n"
    "    if bad and bad[bi] and bad[bi][1] == i then\n"
    "      assert(bad[bi][2] == l, 'a bad line is not the input line')\n"
    "      assert(v == nil, 'called bad, but jansson decodes it')\n"
    "      assert(bad[bi][3] == e, 'not json.decode\\'s message')\n"
    "      bi = bi + 1\n"
    "    else\n"
    "      assert(good[gi] == l, 'a good line is not the input line')\n"
    "      assert(v ~= nil, 'called good, but jansson refuses it')\n"
    "      gi = gi + 1\n"
    "    end\n"
    "  end\n"
    "  assert(gi == #good + 1, 'more lines in the block than good items')\n"
    "end\n"
    "fh:close()\n"
    "assert(n == #want, 'items lost or added')\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L;
  FILE *f;
  if (path[0] == '\0') {
    char dir[] = "/tmp/wpool-fuzz-jsonl.XXXXXX";
    if (mkdtemp(dir) == NULL) __builtin_trap();
    snprintf(path, sizeof path, "%s/in.jsonl", dir);
  }
  if ((f = fopen(path, "wb")) == NULL) __builtin_trap();
  if (size && fwrite(data, 1, size, f) != size) __builtin_trap();
  fclose(f);
  if ((L = luaL_newstate()) == NULL) return 0;
  luaL_openlibs(L);
  luaL_requiref(L, "workerpool", luaopen_workerpool, 1);
  lua_pop(L, 1);
  if (luaL_loadstring(L, check) != LUA_OK) __builtin_trap();
  lua_pushstring(L, path);
  /* Blocks of 1 to 4 items, from the first byte: cuts fall everywhere. */
  lua_pushinteger(L, size ? 1 + data[0] % 4 : 1);
  if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
    fprintf(stderr, "jsonl: %s\n", lua_tostring(L, -1));
    __builtin_trap();
  }
  lua_close(L);
  return 0;
}
