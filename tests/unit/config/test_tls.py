"""`check` loads TLS files as `run` does, reports every problem at once, and reads durations
strictly (interface.md, "Operations additions")."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import trustme

from upgradeproxy.config.loader import ConfigError, ConfigProblem, parse_config

UPSTREAMS = "upstreams:\n  chat:\n    servers: ['127.0.0.1:9000']\nroutes:\n  - upstream: chat\n"


@pytest.fixture
def pems(tmp_path: Path) -> Path:
    """cert.pem/key.pem (a pair), other-key.pem (another key), ca.pem, old.pem/old-key.pem."""
    ca = trustme.CA()
    good = ca.issue_cert("proxy.example.com", "*.chat.example.com")
    good.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    good.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.issue_cert("other.example.com").private_key_pem.write_to_path(str(tmp_path / "other.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    expired = datetime.datetime(2021, 3, 4, 5, 6, 7, tzinfo=datetime.UTC)
    old = ca.issue_cert("old.example.com", not_after=expired)
    old.cert_chain_pems[0].write_to_path(str(tmp_path / "old.pem"))
    old.private_key_pem.write_to_path(str(tmp_path / "old-key.pem"))
    (tmp_path / "junk.pem").write_text("not pem at all\n")
    return tmp_path


def problems(text: str, base: Path) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        parse_config(text + UPSTREAMS, "proxy.yaml", base_dir=str(base))
    return list(info.value.problems)


def listener(tls: str) -> str:
    return f"listen:\n  - address: '127.0.0.1:8443'\n    tls: {tls}\n"


@pytest.mark.parametrize(
    ("tls", "field", "why"),
    [
        pytest.param(
            "{cert: cert.pem, key: other.pem}", "listen[0].tls.key",
            "other.pem: does not match the certificate in ", id="mismatched-key",
        ),
        pytest.param(
            "{cert: cert.pem, key: cert.pem}", "listen[0].tls.key",
            "cert.pem: not a private key (it holds a certificate)", id="key-is-the-cert",
        ),
        pytest.param(
            "{cert: key.pem, key: key.pem}", "listen[0].tls.cert",
            "key.pem: not a certificate (it holds a private key)", id="cert-is-the-key",
        ),
        pytest.param(
            "{cert: junk.pem, key: key.pem}", "listen[0].tls.cert",
            "junk.pem: not a PEM certificate", id="cert-not-pem",
        ),
        pytest.param(
            "{cert: cert.pem, key: junk.pem}", "listen[0].tls.key",
            "junk.pem: not a private key", id="key-not-pem",
        ),
        pytest.param(
            "{cert: cert.pem, key: key.pem, client_ca: junk.pem}", "listen[0].tls.client_ca",
            "junk.pem: not a PEM certificate", id="client-ca-not-pem",
        ),
        pytest.param(
            "{cert: cert.pem, key: key.pem, client_auth: require}", "listen[0].tls.client_auth",
            "needs 'client_ca'", id="client-auth-without-ca",
        ),
        pytest.param(
            "{cert: cert.pem, key: key.pem, client_ca: ca.pem, client_auth: optional}",
            "listen[0].tls.client_auth", "unknown value 'optional'", id="client-auth-value",
        ),
        pytest.param(
            "{cert: cert.pem, key: key.pem, min_version: TLSv1.1}", "listen[0].tls.min_version",
            "unknown value 'TLSv1.1' (did you mean", id="min-version-too-old",
        ),
        pytest.param(
            "{cert: cert.pem, key: key.pem, ciphers: 'NO-SUCH-CIPHER'}", "listen[0].tls.ciphers",
            "no cipher matches 'NO-SUCH-CIPHER'", id="ciphers",
        ),
        pytest.param(
            "{certificates: []}", "listen[0].tls.certificates",
            "expected at least one certificate", id="no-certificates",
        ),
        pytest.param(
            "{cert: cert.pem, key: key.pem, certificates: [{cert: cert.pem, key: key.pem}]}",
            "listen[0].tls.certificates", "either 'cert' and 'key' or 'certificates'",
            id="both-forms",
        ),
        pytest.param(
            "{certificates: [{cert: cert.pem, key: other.pem}]}",
            "listen[0].tls.certificates[0].key", "does not match", id="sni-pair-mismatch",
        ),
        pytest.param(
            "{certificates: [{cert: cert.pem, key: key.pem, names: ['a b']}]}",
            "listen[0].tls.certificates[0].names[0]", "expected a hostname", id="sni-bad-name",
        ),
    ],
)  # fmt: skip
def test_listener_tls_problem(pems: Path, tls: str, field: str, why: str) -> None:
    found = problems(listener(tls), pems)
    assert [(p.field, p.line) for p in found] == [(field, 3)], found
    assert why in found[0].why


def test_empty_tls_mapping_names_both_files(pems: Path) -> None:
    found = problems(listener("{}"), pems)
    assert [(p.field, p.why) for p in found] == [
        ("listen[0].tls.cert", "required but missing"),
        ("listen[0].tls.key", "required but missing"),
    ]


def test_upstream_client_certificate_pair_is_loaded(pems: Path) -> None:
    text = (
        "listen:\n  - address: '127.0.0.1:8080'\n"
        "upstreams:\n  chat:\n    servers: ['127.0.0.1:9000']\n"
        "    tls: {cert: cert.pem, key: other.pem, ca: junk.pem}\n"
        "routes:\n  - upstream: chat\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "proxy.yaml", base_dir=str(pems))
    fields = sorted(p.field for p in info.value.problems)
    assert fields == ["upstreams.chat.tls.ca", "upstreams.chat.tls.key"]


def test_upstream_client_certificate_needs_both_files(pems: Path) -> None:
    text = (
        "listen:\n  - address: '127.0.0.1:8080'\n"
        "upstreams:\n  chat:\n    servers: ['127.0.0.1:9000']\n    tls: {cert: cert.pem}\n"
        "routes:\n  - upstream: chat\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "proxy.yaml", base_dir=str(pems))
    assert [(p.field, p.why) for p in info.value.problems] == [
        ("upstreams.chat.tls.key", "required but missing")
    ]


def test_expired_certificate_is_a_warning_with_its_date(pems: Path) -> None:
    config = parse_config(
        listener("{cert: old.pem, key: old-key.pem}") + UPSTREAMS, "p.yaml", base_dir=str(pems)
    )
    assert config.warnings == (
        f"p.yaml:3: listen[0].tls.cert: warning: {pems / 'old.pem'}: certificate expired on "
        "2021-03-04 05:06:07 UTC",
    )


def test_certificates_take_their_names_from_the_certificate_unless_given(pems: Path) -> None:
    tls = (
        "{certificates: [{cert: cert.pem, key: key.pem},"
        " {cert: old.pem, key: old-key.pem, names: ['*.Old.example.com']}]}"
    )
    config = parse_config(listener(tls) + UPSTREAMS, "p.yaml", base_dir=str(pems))
    found = config.listeners[0].tls
    assert found is not None
    assert found.cert == str(pems / "cert.pem")
    assert [c.names for c in found.certificates] == [
        ("proxy.example.com", "*.chat.example.com"),
        ("*.old.example.com",),
    ]
    assert found.min_version == "TLSv1.2"
    assert found.client_auth is None


def test_client_ca_defaults_to_require(pems: Path) -> None:
    tls = "{cert: cert.pem, key: key.pem, client_ca: ca.pem, min_version: TLSv1.3}"
    found = parse_config(listener(tls) + UPSTREAMS, "p.yaml", base_dir=str(pems)).listeners[0].tls
    assert found is not None
    assert (found.client_auth, found.min_version) == ("require", "TLSv1.3")


def test_admin_on_a_listener_address_is_reported_beside_missing_tls_files(pems: Path) -> None:
    """Regression (issue 11): the cross-field problem was hidden until the files existed."""
    text = listener("{cert: missing.pem, key: key.pem}") + "admin: {address: '127.0.0.1:8443'}\n"
    found = problems(text, pems)
    assert sorted(p.field for p in found) == ["admin.address", "listen[0].tls.cert"]


@pytest.mark.parametrize("value", ["-1", "0", "'0s'", "'-1'", "'-2s'", "0.0"])
def test_every_non_positive_duration_gets_the_same_message(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("listen:\n  - address: '127.0.0.1:8080'\n"
                     f"timeouts:\n  drain: {value}\n" + UPSTREAMS)  # fmt: skip
    (problem,) = info.value.problems
    assert problem.field == "timeouts.drain"
    assert problem.why.startswith("expected a duration greater than zero, found ")


@pytest.mark.parametrize(
    ("value", "hint"),
    [("'5M'", "'5m'"), ("'2S'", "'2s'"), ("'1H30M'", "'1h30m'"), ("'5MS'", "'5ms'")],
)
def test_upper_case_units_are_a_problem_with_a_hint(value: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("listen:\n  - address: '127.0.0.1:8080'\n"
                     f"timeouts:\n  idle: {value}\n" + UPSTREAMS)  # fmt: skip
    (problem,) = info.value.problems
    assert problem.why.endswith(f"(units are case-sensitive: did you mean {hint}?)")


@pytest.mark.parametrize(("value", "seconds"), [("5", 5.0), ("'5'", 5.0), ("2.5", 2.5),
                                                ("'2.5'", 2.5), ("'250ms'", 0.25)])  # fmt: skip
def test_seconds_as_numbers_or_numeric_strings(value: str, seconds: float) -> None:
    config = parse_config(
        f"listen:\n  - address: '127.0.0.1:8080'\ntimeouts:\n  idle: {value}\n" + UPSTREAMS
    )
    assert config.timeouts.idle == seconds


@pytest.mark.parametrize(
    ("text", "query", "request_id"),
    [("", False, True), ("access_log: {query: true}\nrequest_id: false\n", True, False)],
)
def test_access_log_query_and_request_id_switches(text: str, query: bool, request_id: bool) -> None:
    config = parse_config("listen:\n  - address: '127.0.0.1:8080'\n" + text + UPSTREAMS)
    assert (config.access_log.query, config.request_id) == (query, request_id)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("access_log: {query: 1}\n", "access_log.query"),
        ("access_log: {quer: true}\n", "access_log.quer"),
        ("access_log: true\n", "access_log"),
        ("request_id: 'yes'\n", "request_id"),
    ],
)
def test_access_log_and_request_id_problems(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("listen:\n  - address: '127.0.0.1:8080'\n" + text + UPSTREAMS)
    assert [p.field for p in info.value.problems] == [field]
