"""Sticky routing inputs (interface.md rule 9): the hash key of a request, and the proxy's cookie.

The cookie's value is an opaque token per server: a keyed BLAKE2b of the upstream's name and
the server's address (of the address alone for a server found in DNS), truncated. It is
derived, not random, so every worker, every restart and every replica of a pool gives a server
the same token and honours each other's cookies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final
from urllib.parse import parse_qsl

from upgradeproxy.config.model import Address, HashKey

Headers = list[tuple[bytes, bytes]]

_TOKEN_KEY: Final = b"upgradeproxy sticky v1"


def server_token(upstream: str, address: Address) -> str:
    """The cookie value naming `address` in `upstream`: 16 hex digits, no address in it."""
    data = f"{upstream}\0{address}".encode()
    return hashlib.blake2b(data, key=_TOKEN_KEY, digest_size=8).hexdigest()


def address_token(address: Address) -> str:
    """The cookie value naming a discovered server: its address and port only, so every
    worker and replica agree whatever order DNS gave the addresses in (rule 16)."""
    return hashlib.blake2b(str(address).encode(), key=_TOKEN_KEY, digest_size=8).hexdigest()


def _pairs(value: bytes) -> list[tuple[bytes, bytes]]:
    """RFC 6265 §5.4 cookie-pairs of one Cookie header; a piece without '=' has no name."""
    out = []
    for piece in value.split(b";"):
        name, sep, val = piece.strip().partition(b"=")
        if sep:
            out.append((name.strip(), val.strip()))
    return out


def cookie(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of cookie `name` in the request's Cookie headers, or None."""
    for header, value in headers:
        if header.lower() == b"cookie":
            for key, val in _pairs(value):
                if key == name:
                    return val
    return None


def without_cookie(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> Headers:
    """`headers` with cookie `name` removed; a Cookie header left empty is dropped."""
    out: Headers = []
    for header, value in headers:
        if header.lower() != b"cookie":
            out.append((header, value))
            continue
        pieces = [p.strip() for p in value.split(b";")]
        kept = [p for p in pieces if p and p.partition(b"=")[0].strip() != name]
        if len(kept) == len([p for p in pieces if p]):
            out.append((header, value))  # untouched: keep the client's exact bytes
        elif kept:
            out.append((header, b"; ".join(kept)))
    return out


def set_cookie(name: str, token: str, *, secure: bool) -> tuple[bytes, bytes]:
    """The Set-Cookie header that pins the client to the server named by `token`."""
    value = f"{name}={token}; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if secure else "")
    return (b"Set-Cookie", value.encode())


def balance_key(
    spec: HashKey, headers: Sequence[tuple[bytes, bytes]], target: bytes, client_ip: str
) -> bytes | None:
    """The value `balance: hash` hashes for one request, or None when the request lacks it."""
    if spec.kind == "client_ip":
        return client_ip.encode()
    if spec.kind == "cookie":
        return cookie(headers, spec.name.encode())
    if spec.kind == "header":
        name = spec.name.encode()
        found = [v.strip() for h, v in headers if h.lower() == name]
        return b",".join(found) if found else None
    _, sep, query = target.partition(b"?")
    if not sep:
        return None
    wanted = spec.name
    for key, val in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key == wanted:
            return val.encode("latin-1")
    return None
