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
echo "== build/embed_tick (a C program embedding wpool on its own loop)"
build/embed_tick
