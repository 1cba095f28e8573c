"""Load TLS files the way `run` does, so `check` reports what `run` would fail on.

Each check returns the problem as text that starts with the offending file's path (the loader
adds the config field), or None. The files are loaded with the same `ssl` calls the listeners
and upstream connections make; before that, the PEM block names say *why* a file is wrong
(OpenSSL's own `[SSL] PEM lib` names neither the file nor the reason).

Expiry and a certificate's DNS names come from a small DER reader over the first certificate,
so the runtime needs nothing beyond the standard library (`ssl` decodes a peer's certificate,
not a file's).
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

_BLOCK: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_MAX_FILE: Final = 1 << 20  # a certificate chain is a few KiB; this is not one
_SAN_OID: Final = bytes.fromhex("551d11")  # 2.5.29.17 subjectAltName


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What `check` reads from a certificate file's first certificate."""

    not_after: datetime | None
    dns_names: tuple[str, ...]


def no_password() -> bytes:
    """The password callback for keys: never prompt on a terminal (an encrypted key fails)."""
    return b""


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read(_MAX_FILE)


def _blocks(data: bytes) -> set[bytes]:
    return set(_BLOCK.findall(data))


def certificate_problem(cert: str) -> str | None:
    """Why `cert` is not a PEM certificate chain, or None."""
    try:
        blocks = _blocks(_read(cert))
    except OSError as exc:
        return f"{cert}: cannot read: {exc.strerror or exc}"
    if b"CERTIFICATE" not in blocks:
        if any(b.endswith(b"PRIVATE KEY") for b in blocks):
            return f"{cert}: not a certificate (it holds a private key)"
        return f"{cert}: not a PEM certificate (no '-----BEGIN CERTIFICATE-----' block)"
    try:
        ssl.create_default_context(cafile=cert)  # parses every certificate in the file
    except ssl.SSLError as exc:
        return f"{cert}: not a valid PEM certificate ({exc.reason or exc})"
    return None


def key_problem(key: str) -> str | None:
    """Why `key` is not a usable PEM private key, or None."""
    try:
        data = _read(key)
    except OSError as exc:
        return f"{key}: cannot read: {exc.strerror or exc}"
    blocks = _blocks(data)
    if b"ENCRYPTED PRIVATE KEY" in blocks or b"Proc-Type: 4,ENCRYPTED" in data:
        return f"{key}: an encrypted private key (upgradeproxy cannot ask for a passphrase)"
    if not any(b.endswith(b"PRIVATE KEY") for b in blocks):
        if b"CERTIFICATE" in blocks:
            return f"{key}: not a private key (it holds a certificate)"
        return f"{key}: not a private key (no '-----BEGIN ... PRIVATE KEY-----' block)"
    return None


def pair_problem(cert: str, key: str) -> tuple[str, str] | None:
    """(`cert` or `key`, why) when the pair would not load as `run` loads it, or None."""
    if problem := certificate_problem(cert):
        return "cert", problem
    if problem := key_problem(key):
        return "key", problem
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return "key", f"{key}: does not match the certificate in {cert}"
        return "key", f"{key}: cannot load with {cert}: {exc.reason or exc}"
    return None


def ca_problem(path: str) -> str | None:
    """Why `path` is not a PEM file of CA certificates, or None."""
    return certificate_problem(path)


def ciphers_problem(ciphers: str) -> str | None:
    """Why OpenSSL rejects the cipher string, or None."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ciphers)
    except ssl.SSLError:
        return f"no cipher matches {ciphers!r} (an OpenSSL cipher string like 'ECDHE+AESGCM')"
    return None


def certificate_info(cert: str) -> CertInfo | None:
    """Expiry and DNS names of the first certificate in `cert`, or None if unreadable."""
    try:
        text = _read(cert).decode("ascii", "replace")
        start = text.index("-----BEGIN CERTIFICATE-----")
        end = text.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
        return _parse_der(ssl.PEM_cert_to_DER_cert(text[start:end]))
    except (OSError, ValueError, IndexError):
        return None


def expiry_warning(cert: str, now: datetime | None = None) -> str | None:
    info = certificate_info(cert)
    if info is None or info.not_after is None:
        return None
    if info.not_after < (now or datetime.now(UTC)):
        return f"{cert}: certificate expired on {info.not_after:%Y-%m-%d %H:%M:%S} UTC"
    return None


# --- a minimal DER reader: just enough of RFC 5280 for notAfter and subjectAltName --------


def _tlv(data: bytes, i: int) -> tuple[int, int, int]:
    """(tag, start, end) of the DER element at `i`."""
    tag, length = data[i], data[i + 1]
    start = i + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    if start + length > len(data):
        raise ValueError("truncated DER")
    return tag, start, start + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        tag, s, e = _tlv(data, start)
        out.append((tag, s, e))
        start = e
    return out


def _parse_der(der: bytes) -> CertInfo:
    _, cs, _ = _tlv(der, 0)  # Certificate
    _, ts, te = _tlv(der, cs)  # TBSCertificate
    fields = _children(der, ts, te)
    if fields and fields[0][0] == 0xA0:  # [0] version
        fields = fields[1:]
    # serial, signature, issuer, validity, subject, subjectPublicKeyInfo, ...
    _, vs, ve = fields[3]
    times = _children(der, vs, ve)
    not_after = _time(times[1][0], der[times[1][1] : times[1][2]])
    names: list[str] = []
    for tag, s, e in fields[6:]:
        if tag == 0xA3:  # [3] extensions
            names.extend(_san_dns_names(der, s, e))
    return CertInfo(not_after, tuple(names))


def _time(tag: int, raw: bytes) -> datetime | None:
    text = raw.decode("ascii")
    if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950-2049 (RFC 5280 §4.1.2.5.1)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime: YYYYMMDDHHMMSSZ
        return None
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)


def _san_dns_names(der: bytes, start: int, end: int) -> list[str]:
    _, s, e = _tlv(der, start)  # SEQUENCE OF Extension
    for _, xs, xe in _children(der, s, e):
        parts = _children(der, xs, xe)
        if der[parts[0][1] : parts[0][2]] != _SAN_OID:
            continue
        _, os_, oe = parts[-1]  # OCTET STRING holding GeneralNames
        _, gs, ge = _tlv(der, os_)
        if oe < ge:
            raise ValueError("bad subjectAltName")
        return [
            der[ns:ne].decode("ascii").lower()
            for tag, ns, ne in _children(der, gs, ge)
            if tag == 0x82  # [2] dNSName
        ]
    return []
