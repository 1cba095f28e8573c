"""`check` problems and defaults for the HTTP/2 settings: the listener's `http2` and
`limits.http2_max_concurrent_streams` (rule 17)."""

from __future__ import annotations

import pytest

from upgradeproxy.config.loader import ConfigError, parse_config


def text(listener: str = "", top: str = "") -> str:
    return f"""
listen:
  - address: "127.0.0.1:0"
{listener}
upstreams:
  app: {{servers: ["127.0.0.1:9000"]}}
routes:
  - upstream: app
{top}
"""


def problems(**parts: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text(**parts), "h2.yaml")
    return [str(p) for p in info.value.problems]


def test_defaults_keep_http1_only():
    config = parse_config(text())
    assert config.listeners[0].http2 is False
    assert config.limits.http2_max_concurrent_streams == 100


def test_http2_and_the_stream_limit_parse():
    config = parse_config(
        text("    http2: true", "limits: {http2_max_concurrent_streams: 250}")
    )
    assert config.listeners[0].http2 is True
    assert config.limits.http2_max_concurrent_streams == 250


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        pytest.param({"listener": "    http2: yes please"}, "listen[0].http2",
                     id="http2 not a boolean"),
        pytest.param({"listener": "    htp2: true"}, "did you mean 'http2'",
                     id="a near miss is named"),
        pytest.param({"top": "limits: {http2_max_concurrent_streams: 0}"},
                     "limits.http2_max_concurrent_streams", id="stream limit of 0"),
        pytest.param({"top": "limits: {http2_max_concurent_streams: 5}"},
                     "did you mean 'http2_max_concurrent_streams'", id="a near miss in limits"),
    ],
)  # fmt: skip
def test_problems_name_file_field_and_why(parts: dict[str, str], expected: str):
    found = problems(**parts)
    assert any(expected in p for p in found), found

