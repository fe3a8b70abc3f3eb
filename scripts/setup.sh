#!/usr/bin/env bash
# setup.sh: installs the Debian packages wpool needs to build and test.
# Safe to run again: packages already present are left alone.  Needs root
# (or sudo) only when something is missing.
set -euo pipefail

packages=(build-essential cmake pkg-config lua5.4 liblua5.4-dev libuv1-dev
          libjansson-dev libcriterion-dev libhttp-parser-dev lua-check
          clang-format curl wrk prometheus python3 lua-luv valgrind
          clang-14 libclang-rt-14-dev)

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
