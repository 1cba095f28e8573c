"""upgradeproxy: a trio reverse proxy for WebSocket and other upgraded HTTP/1.1 connections."""

from __future__ import annotations

from upgradeproxy.config.model import Config
from upgradeproxy.service.server import Proxy, serve

__version__ = "0.1.0"
__all__ = ["Config", "Proxy", "__version__", "serve"]
