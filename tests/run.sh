#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine with Python 3.11, then run them:
# lint, types, import layers, the docs site, and the whole pytest suite (browser test included).
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium for the browser tests; curl for the HTTP/2 end-to-end check with Debian's curl.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "tests/run.sh: missing ${missing[*]}; install the Debian packages" >&2
    fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

.venv/bin/ruff check upgradeproxy tests
.venv/bin/mypy --strict upgradeproxy
.venv/bin/lint-imports
# The documentation site: broken links, unknown anchors and pages left out of the nav fail.
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict
.venv/bin/python -m pytest "$@"
