#!/usr/bin/env bash
# Where upgradeproxy spends its CPU: py-spy samples it (without pausing it) during the bench's
# handshake load and its plain-HTTP load. Writes tests/bench/results/profile.md (top functions
# by self and inclusive time, and by file) and profile-{handshakes,http}.txt (collapsed stacks:
# open them in https://www.speedscope.app or feed them to flamegraph.pl).
#
#   bash tests/bench/profile.sh [--quick]
exec bash "$(dirname "$0")/run.sh" --profile "$@"
