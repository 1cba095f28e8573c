"""A route's `websocket` block (rule 18) as the loader reads it: one row per accepted form and
per problem `check` reports (file:line: field: why)."""

from __future__ import annotations

import pytest

from upgradeproxy.config.loader import ConfigError, parse_config
from upgradeproxy.config.model import WebSocketLimits

HEAD = "listen:\n  - address: 127.0.0.1:8080\nupstreams:\n  a:\n    servers: [127.0.0.1:9]\n"


def route(block: str) -> str:
    return HEAD + "routes:\n  - upstream: a\n" + block


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        pytest.param("", None, id="no block: spliced"),
        pytest.param("    websocket: {}\n", WebSocketLimits(), id="empty block"),
        pytest.param("    websocket:\n", WebSocketLimits(), id="the key alone"),
        pytest.param(
            "    websocket: {max_message_bytes: 10, max_frame_bytes: 5, messages_per_second: 2}\n",
            WebSocketLimits(10, 5, 2),
            id="every limit",
        ),
        pytest.param("    websocket: {max_frame_bytes: 1}\n", WebSocketLimits(max_frame_bytes=1),
                     id="one limit"),
    ],
)  # fmt: skip
def test_accepted(block: str, expected: WebSocketLimits | None) -> None:
    assert parse_config(route(block), "t.yaml").routes[0].websocket == expected


@pytest.mark.parametrize(
    ("block", "problem"),
    [
        pytest.param("    websocket: {max_message_bytes: 0}\n",
                     "t.yaml:8: routes[0].websocket.max_message_bytes: expected a positive "
                     "whole number, found the number 0", id="zero"),
        pytest.param("    websocket: {max_frame_bytes: -3}\n",
                     "t.yaml:8: routes[0].websocket.max_frame_bytes: expected a positive whole "
                     "number, found the number -3", id="negative"),
        pytest.param("    websocket: {messages_per_second: 0.5}\n",
                     "t.yaml:8: routes[0].websocket.messages_per_second: expected a positive "
                     "whole number, found the number 0.5", id="a fraction"),
        pytest.param("    websocket:\n      max_mesage_bytes: 5\n",
                     "t.yaml:9: routes[0].websocket.max_mesage_bytes: unknown key "
                     "'max_mesage_bytes' (did you mean 'max_message_bytes'?)", id="misspelt"),
        pytest.param("    websocket: true\n",
                     "t.yaml:8: routes[0].websocket: expected a mapping with some of: "
                     "max_message_bytes, max_frame_bytes, messages_per_second, "
                     "found the boolean true",
                     id="not a mapping"),
    ],
)  # fmt: skip
def test_problems(block: str, problem: str) -> None:
    with pytest.raises(ConfigError) as failed:
        parse_config(route(block), "t.yaml")
    assert [str(p) for p in failed.value.problems] == [problem]
