"""Log formatting: JSON lines for machines, key=value text for people.

Access records (`extra={"record": {...}}`) carry their fields at the top level of a line, next to
`time`, `level`, `logger` and `msg`. Under `workers > 1` every line also names its `worker`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Final

_SKIP: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    extra = getattr(record, "record", None)
    fields: dict[str, object] = dict(extra) if isinstance(extra, dict) else {}
    fields.update({k: v for k, v in record.__dict__.items() if k not in _SKIP and k != "record"})
    return fields


def _timestamp(record: logging.LogRecord) -> str:
    """ISO 8601 in UTC with milliseconds, the same in both formats."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access records carry their fields at top level."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _text_value(value: object) -> str:
    """A value as logfmt writes it: quoted when it has spaces, quotes or `=`, or is empty."""
    text = str(value)
    if not text or any(c in text for c in ' "=\\\n'):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """`time level logger: msg key=value ...`, readable on a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{_timestamp(record)} {record.levelname.lower():5} {record.name}:"]
        parts.append(record.getMessage())
        parts.extend(f"{k}={_text_value(v)}" for k, v in _fields(record).items())
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _Static(logging.Filter):
    """Adds the same fields (e.g. `worker`) to every record passing through the handler."""

    def __init__(self, fields: Mapping[str, object]) -> None:
        super().__init__()
        self.fields = dict(fields)

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.update(self.fields)
        return True


def resolve_format(fmt: str | None) -> str:
    """`json` or `text`; None means text on a TTY and json otherwise."""
    if fmt is None:
        return "text" if sys.stderr.isatty() else "json"
    return fmt


def setup_logging(
    fmt: str | None, level: int = logging.INFO, static: Mapping[str, object] | None = None
) -> None:
    """Send all logs to stderr in `fmt` (see `resolve_format`), each line with `static` fields."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if resolve_format(fmt) == "json" else TextFormatter())
    if static:
        handler.addFilter(_Static(static))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
