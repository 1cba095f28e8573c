"""upgradeproxy: a trio reverse proxy for WebSocket and other upgraded HTTP/1.1 connections.

What an embedding program needs: load or parse a config, then `serve` it in a trio nursery.
"""

from __future__ import annotations

from upgradeproxy.config.checker import ConfigError, ConfigProblem
from upgradeproxy.config.loader import load_config, parse_config
from upgradeproxy.config.model import Config
from upgradeproxy.service.server import Proxy, serve

__version__ = "0.1.0"
__all__ = [
    "Config",
    "ConfigError",
    "ConfigProblem",
    "Proxy",
    "__version__",
    "load_config",
    "parse_config",
    "serve",
]
