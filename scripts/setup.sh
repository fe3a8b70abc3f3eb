#!/usr/bin/env bash
# setup.sh: installs the Debian packages wpool needs to build and test.
# Safe to run again: packages already present are left alone.  Needs root
# (or sudo) only when something is missing.  Benchmark-only tools
# (valgrind) are installed by scripts/bench/run.sh itself.
set -euo pipefail

# Building: the compiler, cmake, pkg-config and the libraries.
packages=(build-essential cmake pkg-config lua5.4 liblua5.4-dev libuv1-dev libhiredis-dev
          libjansson-dev libhttp-parser-dev lua-luv-dev)
# Testing: Criterion, the linters, the HTTP tests' curl, wrk, promtool and
# python3, luv for the benchmark smoke test, luarocks and man for the
# install tests.
packages+=(libcriterion-dev lua-check clang-format curl wrk prometheus python3
           lua-luv luarocks man-db)
# Redis: the server the redis-stream tests, examples and benchmarks start
# on a free loopback port (docs/scale-out.md).
packages+=(redis-server)
# Fuzzing (scripts/fuzz.sh): clang with libFuzzer and the sanitizer runtimes.
packages+=(clang-14 libclang-rt-14-dev)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "setup: installing ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
