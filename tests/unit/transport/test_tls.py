"""TLS contexts built at start name the config field and file when a file no longer loads;
the client-certificate subject is formatted as RFC 4514 says."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from upgradeproxy.config.model import ListenerTls, TlsCertificate, UpstreamTls
from upgradeproxy.transport.tls import client_subject, client_tls_context, server_tls_context


@pytest.fixture
def files(tmp_path: Path) -> Path:
    ca = trustme.CA()
    leaf = ca.issue_cert("a.test")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.issue_cert("b.test").private_key_pem.write_to_path(str(tmp_path / "other.pem"))
    return tmp_path


def test_listener_context_names_field_and_file(files: Path) -> None:
    """A file that changed after `check` passed still gives a start error naming both."""
    tls = ListenerTls(str(files / "cert.pem"), str(files / "other.pem"))
    with pytest.raises(OSError, match=r"^listen\[1\]\.tls\.key: .*other\.pem: does not match"):
        server_tls_context(tls, "listen[1].tls")


def test_second_sni_certificate_is_named_by_index(files: Path) -> None:
    good = TlsCertificate(str(files / "cert.pem"), str(files / "key.pem"))
    bad = TlsCertificate(str(files / "cert.pem"), str(files / "cert.pem"))
    tls = ListenerTls(good.cert, good.key, certificates=(good, bad))
    field = r"^listen\[0\]\.tls\.certificates\[1\]\.key: "
    with pytest.raises(OSError, match=field + ".*not a private"):
        server_tls_context(tls, "listen[0].tls")


def test_upstream_context_names_field_and_file(files: Path) -> None:
    tls = UpstreamTls(cert=str(files / "cert.pem"), key=str(files / "other.pem"))
    with pytest.raises(OSError, match=r"^upstreams\.app\.tls\.key: .*does not match"):
        client_tls_context(tls, "upstreams.app.tls")


@pytest.mark.parametrize(
    ("peercert", "expected"),
    [
        pytest.param({}, None, id="no-certificate"),
        pytest.param(
            {"subject": ((("countryName", "DE"),), (("organizationName", "Example"),),
                         (("commonName", "alice"),))},
            "CN=alice,O=Example,C=DE", id="last-rdn-first",
        ),
        pytest.param(
            {"subject": ((("commonName", "a,b+c"),),)}, "CN=a\\,b\\+c", id="escaped",
        ),
        pytest.param(
            {"subject": ((("commonName", "evil\r\nX-Admin: 1"),),)}, "CN=evilX-Admin: 1",
            id="no-line-breaks",
        ),
        pytest.param(
            {"subject": ((("commonName", "a"), ("userId", "7")),)}, "CN=a+UID=7", id="multi-valued",
        ),
    ],
)  # fmt: skip
def test_client_subject(peercert: dict, expected: str | None) -> None:
    assert client_subject(peercert) == expected
