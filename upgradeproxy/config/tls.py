"""The `tls` blocks of listeners and upstreams: keys, and every file loaded as `run` loads it.

Called from `loader.py` with its checker, so each problem names the file, line and field; a
file problem never hides another problem (every check runs, whatever failed before it).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Final

from yaml.nodes import Node, ScalarNode, SequenceNode

from upgradeproxy.config import tls_files, values
from upgradeproxy.config.model import (
    ClientAuth,
    ListenerTls,
    TlsCertificate,
    TlsVersion,
    UpstreamTls,
)

if TYPE_CHECKING:
    from upgradeproxy.config.loader import _Checker

_STR, _BOOL = "tag:yaml.org,2002:str", "tag:yaml.org,2002:bool"
_VERSIONS: Final[Mapping[str, TlsVersion]] = {"TLSv1.2": "TLSv1.2", "TLSv1.3": "TLSv1.3"}
_CLIENT_AUTH: Final[Mapping[str, ClientAuth]] = {"request": "request", "require": "require"}
_LISTENER_KEYS: Final = (
    "cert", "key", "certificates", "min_version", "ciphers", "client_ca", "client_auth",
)  # fmt: skip


def _is_false(node: Node | None) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _BOOL and node.value.lower() in (
        "false", "no", "off",
    )  # fmt: skip


def pair(
    c: _Checker, found: Mapping[str, Node], field: str, *, required: bool
) -> tuple[str, str] | None:
    """The `cert`/`key` files of a mapping, loaded together; reports what would fail."""
    if required or "cert" in found or "key" in found:
        for name, other in (("cert", "key"), ("key", "cert")):
            if name not in found and other in found:
                c.report(found[other], f"{field}.{name}", "required but missing")
    cert = c.file(found.get("cert"), f"{field}.cert")
    key = c.file(found.get("key"), f"{field}.key")
    if cert is None or key is None:
        if cert is not None and (why := tls_files.certificate_problem(cert)):
            c.report(found["cert"], f"{field}.cert", why)
        return None
    problem = tls_files.pair_problem(cert, key)
    if problem is not None:
        which, why = problem
        c.report(found[which], f"{field}.{which}", why)
        return None
    if warning := tls_files.expiry_warning(cert):
        c.warn(found["cert"], f"{field}.cert", warning)
    return cert, key


def ca_file(c: _Checker, node: Node | None, field: str) -> str | None:
    path = c.file(node, field)
    if path is not None and (problem := tls_files.ca_problem(path)):
        c.report(node, field, problem)
        return None
    return path


def listener_tls(c: _Checker, node: Node | None, field: str) -> ListenerTls | None:
    if _is_false(node):
        return None  # `tls: false` reads naturally as "no TLS here".
    what = "a mapping with 'cert' and 'key' files (or 'certificates')"
    found = c.mapping(node, field, _LISTENER_KEYS, what=what)
    if found is None:
        return None
    mark = len(c.problems)
    certs = _certificates(c, found.get("certificates"), f"{field}.certificates")
    if not {"cert", "key", "certificates"} & found.keys():
        for name in ("cert", "key"):
            c.report(node, f"{field}.{name}", "required but missing")
    default = pair(c, found, field, required="certificates" not in found)
    if default is not None and "certificates" in found:
        why = "give either 'cert' and 'key' or 'certificates', not both"
        c.report(found["certificates"], f"{field}.certificates", why)
    version = c.scalar(
        found.get("min_version"), f"{field}.min_version", "TLSv1.2 or TLSv1.3", (_STR,),
        values.choice(_VERSIONS),
    )  # fmt: skip
    ciphers = c.text(found.get("ciphers"), f"{field}.ciphers", "an OpenSSL cipher string")
    if ciphers is not None and (problem := tls_files.ciphers_problem(ciphers)):
        c.report(found["ciphers"], f"{field}.ciphers", problem)
    client_ca = ca_file(c, found.get("client_ca"), f"{field}.client_ca")
    auth = c.scalar(
        found.get("client_auth"), f"{field}.client_auth", "request or require", (_STR,),
        values.choice(_CLIENT_AUTH),
    )  # fmt: skip
    if "client_auth" in found and "client_ca" not in found:
        why = "needs 'client_ca', the CA file that signs client certificates"
        c.report(found["client_auth"], f"{field}.client_auth", why)
    if default is not None:
        certs.insert(0, TlsCertificate(*default, names=_names_of(default[0])))
    if len(c.problems) > mark or not certs:
        return None
    return ListenerTls(
        certs[0].cert, certs[0].key, min_version=version or "TLSv1.2", ciphers=ciphers,
        certificates=tuple(certs), client_ca=client_ca,
        client_auth=(auth or "require") if client_ca else None,
    )  # fmt: skip


def _names_of(cert: str) -> tuple[str, ...]:
    info = tls_files.certificate_info(cert)
    return () if info is None else info.dns_names


def _certificates(c: _Checker, node: Node | None, field: str) -> list[TlsCertificate]:
    items = c.sequence(node, field, "a list of {cert:, key:, names:} items")
    if items == []:
        c.report(node, field, "expected at least one certificate, found an empty list")
    out: list[TlsCertificate] = []
    for i, item in enumerate(items or ()):
        found = c.mapping(item, f"{field}[{i}]", ("cert", "key", "names"), ("cert", "key"))
        if found is None:
            continue
        names = _names(c, found.get("names"), f"{field}[{i}].names")
        files = pair(c, found, f"{field}[{i}]", required=True)
        if files is not None and names is not None:
            out.append(TlsCertificate(*files, names=names or _names_of(files[0])))
    return out


def _names(c: _Checker, node: Node | None, field: str) -> tuple[str, ...] | None:
    if node is None:
        return ()
    if not isinstance(node, SequenceNode) or not node.value:
        c.report(node, field, "expected a list of host names like ['chat.example.com']")
        return None
    read = partial(values.host, wildcard=True)
    names = [c.scalar(n, f"{field}[{i}]", values.WILDCARD_HINT, (_STR,), read)
             for i, n in enumerate(node.value)]  # fmt: skip
    return None if None in names else tuple(n for n in names if n is not None)


def upstream_tls(c: _Checker, node: Node | None, field: str) -> UpstreamTls | None:
    if isinstance(node, ScalarNode) and node.tag == _BOOL:
        return None if _is_false(node) else UpstreamTls()
    what = "false, true, or a mapping {verify:, ca:, server_name:, cert:, key:}"
    keys = ("verify", "ca", "server_name", "cert", "key")
    found = c.mapping(node, field, keys, what=what)
    if found is None:
        return None
    client = pair(c, found, field, required=False)
    return UpstreamTls(
        verify=c.boolean(found.get("verify"), f"{field}.verify", True),
        ca=ca_file(c, found.get("ca"), f"{field}.ca"),
        server_name=c.scalar(
            found.get("server_name"), f"{field}.server_name", values.HOST_HINT, (_STR,), values.host
        ),
        cert=client[0] if client else None,
        key=client[1] if client else None,
    )
