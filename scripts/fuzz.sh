#!/usr/bin/env bash
# Runs every Go fuzz target in the module for a bounded budget each.
#
# The budget is a count of executions (100000x) rather than a duration: with
# a duration, Go's fuzzing coordinator can fail a target with "context
# deadline exceeded" at the deadline while a worker is busy (go.dev/issue/75804),
# which made CI red once with no failing input. Minimization of a new input is
# bounded too, and each target by a wall-clock guard.
set -euo pipefail
fuzztime=${1:-100000x}
found=0
while IFS= read -r file; do
  pkg="./$(dirname "$file")"
  for target in $(grep -oE '^func (Fuzz[A-Za-z0-9_]+)' "$file" | awk '{print $2}'); do
    found=1
    echo ">> fuzz $pkg $target for $fuzztime"
    timeout 300 go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" -fuzzminimizetime 10s "$pkg"
  done
done < <(git ls-files '*_test.go' 2>/dev/null || find . -name '*_test.go')
[ "$found" = 1 ] || echo ">> no fuzz targets yet"
