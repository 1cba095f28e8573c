#!/usr/bin/env bash
# The benchmark of issue 5 in one command: upgradeproxy vs nginx vs direct, on loopback.
# Installs what it needs (Debian's nginx, wrk and haproxy; mitmproxy into a venv of its own
# under ~/.cache/upgradeproxy-bench; websockets, and py-spy for --profile, into
# the project's .venv, or the active virtualenv), then runs tests/bench/bench.py with the
# arguments given here. Not part of the default test run (pytest never collects it).
#
#   bash tests/bench/run.sh                     # full run, about 5 minutes on 2 cores
#   bash tests/bench/run.sh --quick             # smoke run with small counts, < 60 s
#   bash tests/bench/run.sh --tests rtt,http    # a subset (throughput,rtt,handshakes,rss,http,scaling,h2)
#   bash tests/bench/run.sh --profile           # py-spy on upgradeproxy (same as profile.sh)
#   bash tests/bench/run.sh --peers none        # without the HAProxy and mitmproxy peers
#
# Results: printed, and written to tests/bench/results/latest.{md,json} (quick.{md,json}).
set -euo pipefail
cd "$(dirname "$0")/../.."

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)  # the HTTP/2 rows (--tests h2)
case " $* " in
    *" --peers none "*|*" --peers=none "*) peers=0 ;;
    *) peers=1 ;;
esac
if [ "$peers" = 1 ]; then
    command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
fi
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "run.sh: installing ${missing[*]} with apt-get" >&2
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -n "${VIRTUAL_ENV:-}" ]; then
    py="$VIRTUAL_ENV/bin/python"
else
    # The project venv, created the way tests/run.sh creates it.
    [ -x .venv/bin/python ] || python3 -m venv .venv
    py=.venv/bin/python
fi
"$py" -c 'import upgradeproxy' 2>/dev/null || "$py" -m pip install -q -e .
"$py" -c 'import websockets' 2>/dev/null || "$py" -m pip install -q 'websockets>=13'
# mitmproxy pins many dependencies: its own venv in the user's cache, never the project's.
mitm_venv="${XDG_CACHE_HOME:-$HOME/.cache}/upgradeproxy-bench/mitmproxy-venv"
if [ "$peers" = 1 ] && [ ! -x "$mitm_venv/bin/mitmdump" ]; then
    echo "run.sh: installing mitmproxy into $mitm_venv" >&2
    python3 -m venv "$mitm_venv"
    "$mitm_venv/bin/python" -m pip install -q mitmproxy
fi
case " $* " in
    *" --profile "*)
        [ -x "$(dirname "$py")/py-spy" ] || command -v py-spy >/dev/null 2>&1 \
            || "$py" -m pip install -q py-spy
        ;;
esac

exec "$py" tests/bench/bench.py "$@"
