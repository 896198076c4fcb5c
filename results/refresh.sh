#!/usr/bin/env bash
# Rewrites the Targets and Findings of every saved report from its own summary.json, with
# the code at this commit (`chimera.compare --refresh`): each report's saved command, into
# its own folder. Their runs are not on this machine, so the tables and plots stay as
# trained. A report whose command no longer builds the same study is named and left alone.
# Run from the repository root: bash results/refresh.sh
set -uo pipefail
for summary in results/*/summary.json; do
  dir="$(dirname "$summary")"
  command="$(python -c 'import json, sys
s = json.load(open(sys.argv[1]))
if "targets" in s:  # older reports have no Targets: nothing to refresh
  print(" ".join(a for a in s["command"].split()[3:]
                 if a != "--report_only" and not a.startswith("--out=")))' "$summary")"
  [ -n "$command" ] || { echo "$dir: written before targets; left alone"; continue; }
  # shellcheck disable=SC2086  # the saved command's flags, one word each
  python -m chimera.compare $command --out="$dir" --refresh 2>&1 | tail -1 \
    || echo "$dir: not refreshed"
done
