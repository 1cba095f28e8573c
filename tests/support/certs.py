"""Certificates for TLS tests: trustme pairs written to files, client and server contexts."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme


def write_pair(cert: trustme.LeafCert, directory: Path, name: str) -> tuple[Path, Path]:
    """`cert` as DIRECTORY/NAME.pem (the chain) and NAME-key.pem: (cert path, key path)."""
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def tls_keys(files: tuple[Path, Path], **more: object) -> dict[str, object]:
    """The `tls` keys naming a (cert, key) pair of files, and `more` keys."""
    return {"cert": str(files[0]), "key": str(files[1]), **more}


def write_ca(ca: trustme.CA, path: Path) -> Path:
    """The CA's certificate as a PEM file (what `ca:` and `client_ca:` name)."""
    ca.cert_pem.write_to_path(str(path))
    return path


def client_context(
    ca: trustme.CA, alpn: list[str] | None = None, **versions: ssl.TLSVersion
) -> ssl.SSLContext:
    """A client that trusts `ca`, offering `alpn` (`versions` set minimum_version or
    maximum_version)."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    for attr, version in versions.items():
        setattr(ctx, attr, version)
    return ctx


def tls_pair(directory: Path) -> tuple[dict[str, str], trustme.CA]:
    """A fresh CA and a certificate from it for localhost and 127.0.0.1: (a listener's `tls`
    keys naming the files, the CA)."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = directory / "proxy.pem", directory / "proxy-key.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return {"cert": str(cert), "key": str(key)}, ca


def server_context(ca: trustme.CA, *hosts: str) -> ssl.SSLContext:
    """A server presenting a certificate from `ca` for `hosts` (127.0.0.1 by default)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(hosts or ("127.0.0.1",))).configure_cert(ctx)
    return ctx
