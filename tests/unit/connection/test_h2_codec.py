"""connection/h2_codec.py: h2 builds the repr of every frame it receives, so the proxy makes
hyperframe's cheap, but it must say exactly the same."""

from __future__ import annotations

import binascii

import hyperframe.frame
import pytest

from upgradeproxy.connection import h2_codec


def _hyperframe_repr(data: bytes | None) -> str:
    """hyperframe 6.1's own `_raw_data_repr`, as released: the whole payload hexlified."""
    if not data:
        return "None"
    r = binascii.hexlify(data).decode("ascii")
    if len(r) > 20:
        r = r[:20] + "..."
    return "<hex:" + r + ">"


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 12, 16384], ids=lambda n: f"{n}-bytes")
def test_repr_same_text_as_hyperframe(size: int) -> None:
    data = bytes(range(256)) * 64
    assert h2_codec.data_repr(data[:size]) == _hyperframe_repr(data[:size])


def test_repr_of_no_payload() -> None:
    assert h2_codec.data_repr(None) == _hyperframe_repr(None) == "None"


def test_frames_use_the_cheap_repr() -> None:
    frame = hyperframe.frame.DataFrame(1, b"\x01" * 16384)
    assert hyperframe.frame._raw_data_repr is h2_codec.data_repr
    assert repr(frame) == "DataFrame(stream_id=1, flags=[]): <hex:01010101010101010101...>"
