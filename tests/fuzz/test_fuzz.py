"""The fuzz target in the default run: every corpus file replayed, then a bounded fuzz.

The bounded fuzz uses atheris (coverage-guided, in a subprocess) when it is installed and
hypothesis otherwise, over the same harness; `FUZZ_SECONDS` sets its length (default 60).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.harness import check

HERE = pathlib.Path(__file__).parent
CORPUS = HERE / "corpus"
ROOT = HERE.parent.parent
SEEDS = sorted(p for p in CORPUS.iterdir() if p.is_file())
FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "60"))


@pytest.mark.parametrize("path", SEEDS, ids=[p.name for p in SEEDS])
def test_corpus_input_keeps_the_invariant(path: pathlib.Path) -> None:
    check(path.read_bytes())


def test_the_corpus_holds_the_attack_cases() -> None:
    names = {p.name for p in SEEDS}
    for must in ("smuggle-cl-te", "smuggle-te-cl", "smuggle-te-obs-fold", "chunk-extensions",
                 "rfc9112-absolute-form", "crash-content-length-leading-zeros"):  # fmt: skip
        assert must in names
    assert sum(n.startswith("e2e-") for n in names) > 50


# --- the bounded fuzz -----------------------------------------------------------------


_PIECES = [b"\r\n", b"\n", b" ", b"\t", b":", b",", b"\x00", b"0", b"chunked",
           b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n"]  # fmt: skip


@st.composite
def mutated_seed(draw: st.DrawFn) -> bytes:
    """A corpus file with a few byte-level edits (insert, delete, replace, splice)."""
    data = bytearray(draw(st.sampled_from(SEEDS)).read_bytes())
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "splice"]))
        at = draw(st.integers(0, len(data)))
        if op == "insert":
            data[at:at] = draw(st.sampled_from(_PIECES) | st.binary(max_size=4))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "splice":
            other = draw(st.sampled_from(SEEDS)).read_bytes()
            cut = draw(st.integers(0, len(other)))
            data[at:] = other[cut:]
    return bytes(data)


def _hypothesis_fuzz(seconds: float) -> int:
    """Batches of hypothesis examples until `seconds` pass; the number of inputs tried."""
    deadline = time.monotonic() + seconds
    tried = 0
    failing: list[bytes] = []

    @settings(max_examples=200, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.one_of(mutated_seed(), st.binary(max_size=300)))
    def batch(data: bytes) -> None:
        nonlocal tried
        tried += 1
        try:
            check(data)
        except BaseException:
            failing.append(data)
            raise

    while time.monotonic() < deadline:
        try:
            batch()
        except BaseException:
            # Hypothesis replays the shrunk example last: that one joins the corpus.
            name = f"crash-{hashlib.sha1(failing[-1]).hexdigest()}"
            (CORPUS / name).write_bytes(failing[-1])
            raise
    return tried


@pytest.mark.slow
@pytest.mark.fuzz
def test_fuzzing_the_client_side_finds_nothing() -> None:
    if importlib.util.find_spec("atheris") is None:
        assert _hypothesis_fuzz(FUZZ_SECONDS) > 0
        return
    with tempfile.TemporaryDirectory() as work:
        run = subprocess.run(
            [sys.executable, "-m", "tests.fuzz.fuzz_exchange", work, str(CORPUS),
             f"-max_total_time={int(FUZZ_SECONDS)}", "-timeout=30", "-rss_limit_mb=2048",
             f"-artifact_prefix={CORPUS}/", "-print_final_stats=1"],
            cwd=ROOT, capture_output=True, text=True, timeout=FUZZ_SECONDS + 120, check=False,
        )  # fmt: skip
    assert run.returncode == 0, (
        "the fuzzer found an input that breaks the invariant; it is saved in "
        f"tests/fuzz/corpus/crash-* and replayed by the corpus test:\n{run.stderr[-4000:]}"
    )
    assert "Done" in run.stderr
