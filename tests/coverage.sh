#!/usr/bin/env bash
# The test suite under coverage: branch coverage of upgradeproxy, counting the subprocesses the
# e2e tests start (`upgradeproxy run`, workers, the demo). Prints the per-file table and the
# total. Arguments go to pytest (e.g. `bash tests/coverage.sh tests/unit`). Takes a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m coverage erase
.venv/bin/python -m coverage run -m pytest "$@"
status=$?
.venv/bin/python -m coverage combine -q
.venv/bin/python -m coverage report
# The total above weighs lines and branches together; the branch figure on its own:
.venv/bin/python -m coverage json -q -o .coverage.json
.venv/bin/python - <<'PY'
import json

t = json.load(open(".coverage.json"))["totals"]
lines = 100 * t["covered_lines"] / t["num_statements"]
branches = 100 * t["covered_branches"] / t["num_branches"]
print(f"lines {lines:.1f}%  branches {t['covered_branches']}/{t['num_branches']} = {branches:.1f}%")
PY
exit "$status"
