#!/usr/bin/env bash
# test_alerts.sh: the alert rules in docs/alerts/ pass `promtool check
# rules`, and each *_test.yml there passes `promtool test rules` (the
# per-tenant rejection and breaker-open alerts fire when they should).
set -u
cd "$(dirname "$0")/../../docs/alerts" || exit 2
unset LD_PRELOAD # promtool is not instrumented
if ! command -v promtool > /dev/null; then
  echo "$0: promtool is missing (scripts/setup.sh installs it)" >&2
  exit 2
fi
status=0
for f in *.yml; do
  case "$f" in *_test.yml) continue ;; esac
  promtool check rules "$f" || status=1
done
for t in *_test.yml; do
  promtool test rules "$t" || status=1
done
exit $status
