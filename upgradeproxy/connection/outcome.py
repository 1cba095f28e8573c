"""What one exchange ends in: the connection goes on, closes, or becomes a tunnel."""

from __future__ import annotations

import enum
from typing import TypeAlias

from upgradeproxy.tunnel.session import Switched


class Done(enum.Enum):
    """How an exchange that did not switch leaves the client connection (h11's sentinels)."""

    KEEP_ALIVE = "keep-alive"  # another request may follow
    CLOSE = "close"


Outcome: TypeAlias = Done | Switched
