#!/usr/bin/env bash
# example.sh: installs what is missing, builds, and runs the bundled
# examples with the wpool command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh build >/dev/null
echo "== wpool run scripts/examples/quickstart.lua"
build/wpool run scripts/examples/quickstart.lua
echo "== wpool run scripts/examples/loop.lua"
build/wpool run scripts/examples/loop.lua
echo "== wpool run scripts/examples/policies.lua"
build/wpool run scripts/examples/policies.lua
echo "== wpool pipeline run scripts/examples/pipeline/access.json (100,000 lines)"
(cd scripts/examples/pipeline && lua5.4 gen_access_log.lua 100000 access.log &&
  ../../../build/wpool pipeline run --no-progress access.json 2>/dev/null &&
  echo "out.jsonl: $(wc -l <out.jsonl) (status, path) groups" && head -n 3 out.jsonl)
echo "== build/embed_tick (a C program embedding wpool on its own loop)"
build/embed_tick
