#!/usr/bin/env bash
# `make test`: the main suite and the FastVideo suite side by side, each in its own environment.
#
# Both mostly wait on real processes (workers rendering paced steps, Redis kept down for a set
# time, leases running out), so two cores serve both at once: the whole suite takes about the
# longer of the two instead of their sum. The main suite reports as it runs; the FastVideo suite's
# report (written to a file meanwhile) follows it. The exit status is the main suite's, or the
# FastVideo suite's where the main suite passed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

report="$(mktemp -t renderfarm-fastvideo-suite.XXXXXX)"
main_report="$(mktemp -t renderfarm-main-suite.XXXXXX)"
trap 'rm -f "$report" "$main_report"' EXIT

started=$SECONDS
make --no-print-directory test-fastvideo >"$report" 2>&1 </dev/null &
fastvideo=$!

make --no-print-directory test-main </dev/null 2>&1 | tee "$main_report"
main_status=${PIPESTATUS[0]}
echo "== main suite: exit $main_status after $((SECONDS - started)) s; waiting for the FastVideo suite"

wait "$fastvideo"
fastvideo_status=$?
echo "== FastVideo suite (ran beside the main suite): exit $fastvideo_status, $((SECONDS - started)) s in all"
cat "$report"

# Both verdicts last, where a reader of the end of the log looks.
echo "== main suite: exit $main_status"
grep -E '^(FAILED|ERROR) |^=+ .*(passed|failed|error).* =+$' "$main_report" || true
echo "== FastVideo suite: exit $fastvideo_status"
grep -E '^(FAILED|ERROR) |^=+ .*(passed|failed|error).* =+$' "$report" || true

if [ "$main_status" -ne 0 ]; then exit "$main_status"; fi
exit "$fastvideo_status"
