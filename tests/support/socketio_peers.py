"""python-socketio servers (ASGI under uvicorn, each in a thread) and one client session: a
Socket.IO session starts by long-polling and then upgrades to a WebSocket, so every request
of a session must reach the server that holds it."""

from __future__ import annotations

import threading
from typing import Any

import socketio  # type: ignore[import-untyped]
import uvicorn

from tests.support.clients import LOOPBACK, free_port
from tests.support.waiting import WAIT, eventually


class SocketIOServer:
    """A python-socketio app on `host`:`port` whose `echo` event answers with `name`."""

    def __init__(self, name: str, host: str = LOOPBACK, port: int | None = None) -> None:
        self.name, self.host = name, host
        self.port = port or free_port()
        self.sessions: list[str] = []
        # Short pings so a poll stranded on the wrong server ends quickly.
        sio = socketio.AsyncServer(async_mode="asgi", ping_interval=2, ping_timeout=2)

        @sio.event  # type: ignore[untyped-decorator]
        async def connect(sid: str, environ: dict[str, Any]) -> None:
            self.sessions.append(sid)

        @sio.event  # type: ignore[untyped-decorator]
        async def echo(sid: str, data: object) -> dict[str, object]:
            return {"server": name, "data": data}

        config = uvicorn.Config(
            socketio.ASGIApp(sio), host=host, port=self.port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        assert eventually(lambda: self.server.started, WAIT), "uvicorn did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT)


def session(url: str, n: int) -> str | None:
    """One client session: connect by polling, upgrade, echo `n`. The server's name, or None."""
    client = socketio.Client()
    try:
        client.connect(url, wait_timeout=3)
        if not eventually(lambda: client.transport() == "websocket", 3):
            return None
        answer = client.call("echo", n, timeout=3)
        return str(answer["server"]) if answer["data"] == n else None
    except (socketio.exceptions.ConnectionError, socketio.exceptions.TimeoutError):
        return None
    finally:
        client.disconnect()
