#!/usr/bin/env bash
# Soak the proxy: `bash tests/soak/run.sh [--seconds N] [--seed S] [--workers N]
# [--upgrade-every SECONDS] [--http-clients N]` (default 30 s, one process, no SIGUSR2).
# Prints a verdict table; exits 0 with a line `PASS` only when every check holds.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
# Reuse a .venv that already has the proxy installed; install it with the test extra otherwise.
if ! .venv/bin/python -c 'import upgradeproxy, h11, trio' 2>/dev/null; then
    .venv/bin/python -m pip install -q -e '.[test]'
fi
exec .venv/bin/python -m tests.soak.soak "$@"
