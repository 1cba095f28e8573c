"""Hypothesis strategies for header lists, tokens and routes, shared by the property tests."""

from __future__ import annotations

from hypothesis import strategies as st

from upgradeproxy.rules.headers import HOP_BY_HOP

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Names the rules care about, mixed-case variants included, plus arbitrary tokens.
_KNOWN = sorted(
    HOP_BY_HOP
    | {b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto", b"forwarded",
       b"x-forwarded-host", b"via", b"cookie", b"sec-websocket-key", b"x-custom"}
)  # fmt: skip


def _case(name: bytes) -> st.SearchStrategy[bytes]:
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flips: bytes(
            c - 32 if f and 97 <= c <= 122 else c for c, f in zip(name, flips, strict=True)
        )
    )


token = st.text(alphabet=TCHARS, min_size=1, max_size=12).map(str.encode)
header_name = st.one_of(st.sampled_from(_KNOWN).flatmap(_case), token)
# Field values as h11 hands them over: visible ASCII and spaces, no CR/LF, trimmed.
header_value = (
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
    .map(str.strip)
    .map(str.encode)
)
headers = st.lists(st.tuples(header_name, header_value), max_size=12)


@st.composite
def connection_header(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A Connection field naming some known and some arbitrary fields, odd spacing included."""
    names = draw(st.lists(header_name, min_size=1, max_size=5))
    sep = draw(st.sampled_from([b",", b", ", b" , ", b",,"]))
    return (draw(_case(b"connection")), sep.join(names))


headers_with_connection = st.tuples(headers, st.lists(connection_header(), max_size=2)).flatmap(
    lambda hc: st.permutations(hc[0] + hc[1])
)
