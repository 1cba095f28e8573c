"""Configs as exact YAML text, for the tests whose point is the text: the loader's line numbers
count from a snippet's own first line, and its problems are what it reports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from upgradeproxy.config.loader import ConfigError, ConfigProblem, parse_config

# Appended after a snippet for each required section it leaves out, so the line numbers in a
# snippet count from its own first line.
FILLER = {
    "listen": 'listen:\n  - address: "127.0.0.1:8080"\n',
    "upstreams": 'upstreams:\n  chat:\n    servers: ["127.0.0.1:9000"]\n',
    "routes": "routes:\n  - upstream: chat\n",
}


def complete(snippet: str) -> str:
    """YAML `snippet` plus whichever required top-level sections it does not define itself."""
    missing = [text for key, text in FILLER.items() if not re.search(rf"^{key}:", snippet, re.M)]
    return snippet + "".join(missing)


def problems_of(text: str, base_dir: Path | None = None) -> list[ConfigProblem]:
    """The problems the loader finds in `text` (it must find some)."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "proxy.yaml", base_dir=None if base_dir is None else str(base_dir))
    return list(info.value.problems)
