"""TLS contexts, both ways: a listener's (one per certificate, chosen by SNI, with client
certificate checks) and the one an upstream connection uses.

Every certificate gets a context with the same version floor, ciphers and client-CA settings;
the first is the default, and its `sni_callback` switches a handshake to another one whose
names match the client's SNI (an exact name first, then a `*.` wildcard for one label, the
way browsers match certificates).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Final

from upgradeproxy.config.model import ListenerTls, TlsCertificate, UpstreamTls
from upgradeproxy.config.tls_files import no_password, pair_problem

_VERSIONS: Final[Mapping[str, ssl.TLSVersion]] = {
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
ALPN_H2: Final = ["h2", "http/1.1"]
ALPN_HTTP1: Final = ["http/1.1"]
_VERIFY: Final = {"request": ssl.CERT_OPTIONAL, "require": ssl.CERT_REQUIRED}
# RFC 4514 short names; anything else keeps OpenSSL's long name.
_SHORT: Final = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
    "domainComponent": "DC", "streetAddress": "STREET", "userId": "UID",
}  # fmt: skip


def server_tls_context(
    tls: ListenerTls | None, field: str = "tls", *, http2: bool = False
) -> ssl.SSLContext | None:
    """The context a listener hands to trio.SSLStream; raises OSError naming `field` and file.

    ALPN offers `h2` (preferred) only with `http2`; otherwise it never selects it (rule 17).
    """
    if tls is None:
        return None
    certs = tls.certificates or (TlsCertificate(tls.cert, tls.key),)
    alpn = ALPN_H2 if http2 else ALPN_HTTP1
    contexts = [_context(tls, cert, f"{field}.certificates[{i}]" if tls.certificates and i
                         else field, alpn) for i, cert in enumerate(certs)]  # fmt: skip
    if len(contexts) > 1:
        contexts[0].sni_callback = _sni_picker(certs, contexts)
    return contexts[0]


def _context(tls: ListenerTls, cert: TlsCertificate, field: str, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    if tls.ciphers:
        ctx.set_ciphers(tls.ciphers)
    try:
        ctx.load_cert_chain(cert.cert, cert.key, password=no_password)
    except OSError as exc:  # ssl.SSLError included: files changed since the config loaded
        which, why = pair_problem(cert.cert, cert.key) or ("cert", f"{cert.cert}: {exc}")
        raise OSError(f"{field}.{which}: {why}") from exc
    if tls.client_ca and tls.client_auth:
        try:
            ctx.load_verify_locations(cafile=tls.client_ca)
        except OSError as exc:
            raise OSError(f"{field}.client_ca: {tls.client_ca}: {exc}") from exc
        ctx.verify_mode = _VERIFY[tls.client_auth]
    # OpenSSL picks the first of ours the client also offers: h2 before http/1.1.
    ctx.set_alpn_protocols(alpn)
    return ctx


def _sni_picker(
    certs: tuple[TlsCertificate, ...], contexts: list[ssl.SSLContext]
) -> ssl._SNICallback:  # type: ignore[name-defined]
    exact: dict[str, ssl.SSLContext] = {}
    wildcard: dict[str, ssl.SSLContext] = {}
    for cert, ctx in zip(certs, contexts, strict=True):
        for name in cert.names:  # first listed wins, as in the config's order
            if name.startswith("*."):
                wildcard.setdefault(name[2:], ctx)
            else:
                exact.setdefault(name, ctx)
    default = contexts[0]

    def pick(sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        if server_name is None:
            return
        name = server_name.lower().rstrip(".")
        chosen = exact.get(name) or wildcard.get(name.partition(".")[2])
        if chosen is not None and chosen is not default:
            sslobj.context = chosen

    return pick


def client_subject(peercert: object) -> str | None:
    """The verified client certificate's subject as an RFC 4514 string (`CN=a,O=b`)."""
    if not isinstance(peercert, dict) or not peercert.get("subject"):
        return None
    parts = []
    for rdn in reversed(peercert["subject"]):  # RFC 4514 writes the last RDN first
        parts.append("+".join(f"{_SHORT.get(k, k)}={_escape(str(v))}" for k, v in rdn))
    return ",".join(parts)


def _escape(value: str) -> str:
    out = "".join(f"\\{ch}" if ch in ',+"\\<>;=' else ch for ch in value)
    out = "".join(ch for ch in out if ch.isprintable())  # never a CR/LF into a header
    return "\\" + out if out.startswith(("#", " ")) else out


def client_tls_context(tls: UpstreamTls, field: str = "tls") -> ssl.SSLContext:
    """An SSL context for talking to an upstream; built once per config, not per connection.

    Raises OSError naming `field` and the file when one no longer loads.
    """
    try:
        ctx = ssl.create_default_context(cafile=tls.ca)
    except OSError as exc:
        raise OSError(f"{field}.ca: {tls.ca}: {exc}") from exc
    if tls.cert and tls.key:  # a client certificate for upstreams that verify their clients
        try:
            ctx.load_cert_chain(tls.cert, tls.key, password=no_password)
        except OSError as exc:
            which, why = pair_problem(tls.cert, tls.key) or ("cert", f"{tls.cert}: {exc}")
            raise OSError(f"{field}.{which}: {why}") from exc
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
