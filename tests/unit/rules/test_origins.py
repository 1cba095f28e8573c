"""Table tests for rule 12's Origin matching (rules/origins.py) and its entry syntax."""

from __future__ import annotations

import pytest

from upgradeproxy.config.edge import origin_entry
from upgradeproxy.rules.origins import origin_problem

ALLOWED = (
    origin_entry("https://chat.example.com"),
    origin_entry("https://*.apps.example.com"),
    origin_entry("http://localhost:3000"),
    origin_entry("https://[::1]:8443"),
)


@pytest.mark.parametrize(
    ("value", "allowed"),
    [
        pytest.param(b"https://chat.example.com", True, id="exact"),
        pytest.param(b"HTTPS://Chat.Example.COM", True, id="case-insensitive"),
        pytest.param(b"https://chat.example.com:443", True, id="default-port-spelled-out"),
        pytest.param(b"https://chat.example.com:8443", False, id="other-port"),
        pytest.param(b"http://chat.example.com", False, id="other-scheme"),
        pytest.param(b"https://evil.example.com", False, id="other-host"),
        pytest.param(b"https://chat.example.com.evil.net", False, id="suffix-attack"),
        pytest.param(b"https://a.apps.example.com", True, id="wildcard-one-label"),
        pytest.param(b"https://a.b.apps.example.com", True, id="wildcard-two-labels"),
        pytest.param(b"https://apps.example.com", False, id="wildcard-not-bare-suffix"),
        pytest.param(b"https://xapps.example.com", False, id="wildcard-label-boundary"),
        pytest.param(b"https://a.apps.example.com:444", False, id="wildcard-other-port"),
        pytest.param(b"http://localhost:3000", True, id="explicit-port"),
        pytest.param(b"http://localhost", False, id="explicit-port-missing"),
        pytest.param(b"https://[0:0::1]:8443", True, id="ipv6-spelling"),
        pytest.param(b"null", False, id="null"),
        pytest.param(b"NULL", False, id="null-any-case"),
        pytest.param(b"", False, id="empty"),
        pytest.param(b"chat.example.com", False, id="no-scheme"),
        pytest.param(b"https://chat.example.com/", False, id="path"),
        pytest.param(b"https://chat.example.com?x", False, id="query"),
        pytest.param(b"https://user@chat.example.com", False, id="userinfo"),
        pytest.param(b"https://chat.example.com:99999", False, id="port-out-of-range"),
        pytest.param(b"https://chat.example.com:", False, id="empty-port"),
        pytest.param(b"https://*.apps.example.com", False, id="wildcard-in-request"),
        pytest.param(b"https://[::1", False, id="unclosed-bracket"),
        pytest.param(b"https://ch\xe4t.example.com", False, id="non-ascii"),
        pytest.param(b"https://chat.example.com https://x.com", False, id="origin-list"),
    ],
)
def test_origin_matches_entries_as_browsers_serialise_them(value, allowed):
    assert (origin_problem([value], ALLOWED) is None) is allowed


def test_no_origin_header_is_let_through():
    assert origin_problem([], ALLOWED) is None


def test_several_origin_headers_are_refused_even_if_each_is_allowed():
    assert origin_problem([b"https://chat.example.com"] * 2, ALLOWED) == "several Origin headers"


def test_empty_allow_list_refuses_every_browser():
    assert origin_problem([b"https://chat.example.com"], ()) is not None
    assert origin_problem([], ()) is None


@pytest.mark.parametrize(
    ("entry", "canonical"),
    [
        ("https://Chat.Example.com", "https://chat.example.com"),
        ("https://chat.example.com:443", "https://chat.example.com"),
        ("wss://chat.example.com:443", "wss://chat.example.com"),
        ("http://chat.example.com:8080", "http://chat.example.com:8080"),
        ("https://*.Example.com", "https://*.example.com"),
        ("http://[::1]:80", "http://[::1]"),
    ],
)
def test_entries_are_kept_in_canonical_form(entry, canonical):
    assert origin_entry(entry) == canonical


@pytest.mark.parametrize(
    "entry",
    [
        "chat.example.com",  # no scheme
        "https://chat.example.com/",  # a path
        "https://chat.example.com/ws",
        "https://chat.example.com?q",
        "https://u@chat.example.com",
        "https://",
        "https://chat.example.com:0",
        "https://a.*.example.com",
        "null",
        "*",
    ],
)
def test_entries_that_are_not_origins_are_rejected(entry):
    with pytest.raises(ValueError, match="expected an origin"):
        origin_entry(entry)
