"""A route's `websocket` block (contract rule 18): limits on the frames of its tunnels."""

from __future__ import annotations

from dataclasses import fields
from typing import Final

from yaml.nodes import Node, ScalarNode

from upgradeproxy.config.checker import Checker
from upgradeproxy.config.model import WebSocketLimits

KEYS: Final = tuple(f.name for f in fields(WebSocketLimits))
_NULL: Final = "tag:yaml.org,2002:null"


def websocket_limits(c: Checker, node: Node | None, field: str) -> WebSocketLimits | None:
    """The block's limits (every one optional, each a positive whole number), or None when the
    route has no block. An empty block (`websocket: {}`, or `websocket:` alone) turns on the
    protocol checks and message counts with no limit."""
    if node is None:
        return None
    if isinstance(node, ScalarNode) and node.tag == _NULL:
        return WebSocketLimits()
    found = c.mapping(node, field, KEYS, what=f"a mapping with some of: {', '.join(KEYS)}")
    if found is None:
        return None
    limits = {key: c.positive_int(value, f"{field}.{key}") for key, value in found.items()}
    return WebSocketLimits(**{k: v for k, v in limits.items() if v is not None})
