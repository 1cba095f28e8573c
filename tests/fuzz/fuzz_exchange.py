"""Coverage-guided fuzzing of the client side of an exchange with atheris (libFuzzer).

    python -m tests.fuzz.fuzz_exchange WORKDIR tests/fuzz/corpus -max_total_time=60 \\
        -artifact_prefix=tests/fuzz/corpus/

libFuzzer writes the inputs it finds interesting to WORKDIR (the first directory) and a
crashing input to the artifact prefix, so a crash becomes a corpus file that
tests/fuzz/test_fuzz.py replays. `tests/fuzz/run.sh` wraps this.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["upgradeproxy", "h11"]):
    from tests.fuzz.harness import one_input


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
