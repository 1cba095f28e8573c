#!/usr/bin/env bash
# The scale run: N idle WebSocket tunnels through the proxy on this machine, planned to its
# descriptor and port limits, then measured (RSS per tunnel, kernel socket memory, handshake
# rate, waking 10% at once, the drain). Loopback only; prints a table and PASS/FAIL.
#
#   bash tests/scale/run.sh                     # 5,000 tunnels (what CI can afford)
#   bash tests/scale/run.sh --tunnels 30000     # by hand, on a quiet machine
#   bash tests/scale/run.sh --tunnels 2000 --all --drain wait
set -euo pipefail
cd "$(dirname "$0")/../.."
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
exec "$python" tests/scale/scale.py "$@"
