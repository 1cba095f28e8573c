"""A deliberately strict HTTP/1.1 request parser: what the proxy forwards must pass it.

It accepts only what a smuggling-safe sender produces: CRLF line ends (no bare LF),
no obs-fold, token field names, one Host, never both Content-Length and Transfer-Encoding,
`chunked` as the only coding, and well-formed chunks. It is the fuzz oracle, not a server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (/[!-~]*|\*) HTTP/1\.1")
# Values: anything but NUL, CR and LF, the bytes the contract (rule 7) names; other controls
# are outside RFC 9110's grammar but not a framing hazard, and h11 passes them.
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\x00\r\n]*?)[ \t]*")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[!-~ \t]*)?")


class Rejected(Exception):
    """The bytes are not a request a strict recipient would accept."""


@dataclass
class Request:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = True  # False: the bytes ended inside the body

    def get(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name]


def parse_requests(data: bytes, stop_after_upgrade: bool = True) -> list[Request]:
    """Every request in `data`; the last may end mid-body. Raises `Rejected`."""
    out: list[Request] = []
    pos = 0
    while pos < len(data):
        req, pos = _parse_one(data, pos)
        out.append(req)
        if not req.complete or (stop_after_upgrade and req.get(b"upgrade")):
            break  # after an offered upgrade, what follows may be tunnel bytes
    return out


def _parse_one(data: bytes, pos: int) -> tuple[Request, int]:
    end = data.find(b"\r\n\r\n", pos)
    if end < 0:
        raise Rejected(f"truncated request head: {data[pos : pos + 200]!r}")
    head = data[pos:end]
    if b"\n" in head.replace(b"\r\n", b"") or b"\r" in head.replace(b"\r\n", b""):
        raise Rejected("bare LF or CR in a request head")
    lines = head.split(b"\r\n")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        raise Rejected(f"bad request line {lines[0]!r}")
    req = Request(m.group(1), m.group(2))
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise Rejected("obs-fold")
        fm = _FIELD.fullmatch(line)
        if fm is None:
            raise Rejected(f"bad field line {line!r}")
        req.headers.append((fm.group(1), fm.group(2)))
    hosts = req.get(b"host")
    if len(hosts) != 1:
        raise Rejected(f"{len(hosts)} Host fields")
    te, cl = req.get(b"transfer-encoding"), req.get(b"content-length")
    if te and cl:
        raise Rejected("both Content-Length and Transfer-Encoding")
    pos = end + 4
    if te:
        if te != [b"chunked"]:
            raise Rejected(f"Transfer-Encoding {te!r}")
        return _chunked(data, pos, req)
    if cl:
        # The proxy re-derives framing, so it sends a length in canonical digits.
        if len(cl) != 1 or not re.fullmatch(rb"0|[1-9][0-9]{0,18}", cl[0]):
            raise Rejected(f"Content-Length {cl!r}")
        n = int(cl[0])
        req.body = data[pos : pos + n]
        req.complete = len(req.body) == n
        return req, pos + len(req.body)
    return req, pos


def _chunked(data: bytes, pos: int, req: Request) -> tuple[Request, int]:
    body = bytearray()
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            _check_partial_line(data[pos:])
            req.body, req.complete = bytes(body), False
            return req, len(data)
        if _CHUNK_LINE.fullmatch(data[pos:eol]) is None:
            raise Rejected(f"bad chunk line {data[pos:eol]!r}")
        size = int(data[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            # Trailers are not forwarded by the proxy: the chunked body ends with CRLF.
            if data[pos : pos + 2] != b"\r\n"[: len(data) - pos]:
                raise Rejected("trailer section after the last chunk")
            req.body, req.complete = bytes(body), len(data) >= pos + 2
            return req, min(len(data), pos + 2)
        chunk = data[pos : pos + size]
        body += chunk
        if len(chunk) < size or len(data) < pos + size + 2:
            if data[pos + size : pos + size + 2] != b"\r\n"[: max(0, len(data) - pos - size)]:
                raise Rejected("chunk data not followed by CRLF")
            req.body, req.complete = bytes(body), False
            return req, len(data)
        if data[pos + size : pos + size + 2] != b"\r\n":
            raise Rejected("chunk data not followed by CRLF")
        pos += size + 2


def _check_partial_line(tail: bytes) -> None:
    if tail and not re.fullmatch(rb"[0-9A-Fa-f]{1,16}(;[!-~ \t]*)?\r?", tail):
        raise Rejected(f"bad partial chunk line {tail!r}")
