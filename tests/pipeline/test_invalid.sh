#!/usr/bin/env bash
# test_invalid.sh WPOOL: every folder of invalid/ holds a bad config.json
# and the exact text `wpool pipeline check` must print for it (error);
# check must exit 1 with nothing on stdout.  valid/ configs must pass with
# exit 0 and no output at all.  Adding a case is adding a folder.
set -u
wpool=$1
here=$(cd "$(dirname "$0")" && pwd)
fail=0
for dir in "$here"/invalid/*/; do
  name=$(basename "$dir")
  out=$(cd "$dir" && "$wpool" pipeline check config.json 2>/tmp/pipeline_err.$$)
  rc=$?
  if [ $rc -ne 1 ]; then echo "FAIL $name: exit $rc, want 1"; fail=1; fi
  if [ -n "$out" ]; then echo "FAIL $name: stdout not empty: $out"; fail=1; fi
  if ! diff -u "$dir/error" /tmp/pipeline_err.$$; then
    echo "FAIL $name: errors differ (above: - want, + got)"; fail=1
  else
    echo "ok   $name"
  fi
done
for cfg in "$here"/valid/*.json; do
  name=$(basename "$cfg")
  all=$(cd "$(dirname "$cfg")" && "$wpool" pipeline check "$name" 2>&1)
  rc=$?
  if [ $rc -ne 0 ] || [ -n "$all" ]; then
    echo "FAIL valid/$name: exit $rc, output: $all"; fail=1
  else
    echo "ok   valid/$name"
  fi
done
rm -f /tmp/pipeline_err.$$
exit $fail
