#!/usr/bin/env bash
# Fuzz the client side of an exchange: `bash tests/fuzz/run.sh [--seconds N]` (default 60).
# Coverage-guided with atheris where it installs, else hypothesis over the same harness.
# A crashing input is saved as tests/fuzz/corpus/crash-*; the default pytest run replays it.
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=60
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --seconds=*) seconds="${1#*=}"; shift ;;
        *) echo "usage: tests/fuzz/run.sh [--seconds N]" >&2; exit 2 ;;
    esac
done

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
# Reuse a .venv that already has what the harness needs; install the test extra otherwise.
if ! .venv/bin/python -c 'import upgradeproxy, hypothesis, h11, trio' 2>/dev/null; then
    .venv/bin/python -m pip install -q -e '.[test]'
fi

work=".fuzz-work"  # what libFuzzer finds interesting; kept between runs, never committed
mkdir -p "$work"
if .venv/bin/python -c 'import atheris' 2>/dev/null; then
    echo "fuzz: atheris for ${seconds}s (corpus: tests/fuzz/corpus + $work)"
    exec .venv/bin/python -m tests.fuzz.fuzz_exchange "$work" tests/fuzz/corpus \
        -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 \
        -artifact_prefix=tests/fuzz/corpus/ -print_final_stats=1
fi
echo "fuzz: atheris is not installed here; hypothesis for ${seconds}s"
exec .venv/bin/python -c "
import sys; sys.path.insert(0, '.')
from tests.fuzz.test_fuzz import _hypothesis_fuzz
print('fuzz: hypothesis tried', _hypothesis_fuzz($seconds), 'inputs; no invariant broken')"
