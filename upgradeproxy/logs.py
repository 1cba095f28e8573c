"""Log formatting: JSON lines for machines, key=value text for people."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Final

_SKIP: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    extra = getattr(record, "record", None)
    fields: dict[str, object] = dict(extra) if isinstance(extra, dict) else {}
    fields.update({k: v for k, v in record.__dict__.items() if k not in _SKIP and k != "record"})
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access records carry their fields at top level."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger msg key=value ...`, readable on a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        parts = [f"{stamp} {record.levelname.lower():5} {record.name}: {record.getMessage()}"]
        parts.extend(f"{k}={v}" for k, v in _fields(record).items())
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(fmt: str | None, level: int = logging.INFO) -> None:
    """Send all logs to stderr in `fmt` (json|text; default text on a TTY, json otherwise)."""
    if fmt is None:
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
