"""Top-level operations keys: `access_log` and `request_id`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from yaml.nodes import Node

from upgradeproxy.config.model import AccessLog

if TYPE_CHECKING:
    from upgradeproxy.config.loader import _Checker

TOP_KEYS: Final = ("access_log", "request_id")


def settings(c: _Checker, top: Mapping[str, Node]) -> tuple[AccessLog, bool]:
    """The access-log options and the request-id switch."""
    found = c.mapping(top.get("access_log"), "access_log", ("query",), what="a mapping {query:}")
    query = c.boolean((found or {}).get("query"), "access_log.query", False)
    return AccessLog(query=query), c.boolean(top.get("request_id"), "request_id", True)
