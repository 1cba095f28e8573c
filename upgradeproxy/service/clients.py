"""An accepted client, from its socket to the connection code: the PROXY header and the TLS
handshake (service/accept.py), then HTTP/1.1, or on an `http2` listener HTTP/2 or HTTP/1.1
as negotiated (rule 17).

`serve_accepted` returns True if the connection's tunnel parked: the connection then belongs
to the tunnel, which tells `owner` (with `token`) when it ends; the caller must leave it open.
"""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass
from typing import Final

import trio

from upgradeproxy.config.model import Listener
from upgradeproxy.connection.context import ConnectionOwner, Runtime, Shared
from upgradeproxy.connection.exchange import serve_client
from upgradeproxy.connection.http2 import serve_http2
from upgradeproxy.service.accept import open_client, open_negotiated

# open_client returns at once on a plain listener: no deadline (and no cancel scope) needed.
_NO_SCOPE: Final = contextlib.nullcontext()


@dataclass(slots=True)
class Bound:
    """A listening socket, its accept loop's scope, and what its clients are served with
    (a reload replaces `config` and `tls`)."""

    config: Listener
    listener: trio.SocketListener
    scope: trio.CancelScope
    tls: ssl.SSLContext | None

    @property
    def slow(self) -> bool:
        """Whether a new client must first send a PROXY header or do a TLS handshake."""
        return self.config.proxy_protocol or self.tls is not None


async def serve_accepted(
    stream: trio.SocketStream,
    bound: Bound,
    rt: Runtime,
    shared: Shared,
    owner: ConnectionOwner,
    token: object,
) -> bool:
    """Serve one accepted client of `bound`: HTTP/1.1, or on an `http2` listener HTTP/2 or
    HTTP/1.1 as negotiated (HTTP/2 streams do not park)."""
    try:
        peer_ip, peer_port = stream.socket.getpeername()[:2]
        local = stream.socket.getsockname()[:2]
    except OSError:
        return False
    ip, port, here = str(peer_ip), int(peer_port), (str(local[0]), int(local[1]))
    if not bound.config.http2:
        # Listeners without http2 take the HTTP/1.1 path as before: no ALPN or preface check.
        opened = None
        with trio.move_on_after(rt.config.timeouts.request_header) if bound.slow else _NO_SCOPE:
            opened = await open_client(
                stream,
                ip,
                proxy_protocol=bound.config.proxy_protocol,
                tls=bound.tls,
                port=port,
                local=here,
            )
        if opened is None:
            return False
        client, peer = opened
        return await serve_client(client, peer, rt, shared, owner, token)
    negotiated = await open_negotiated(
        stream,
        ip,
        deadline=trio.current_time() + rt.config.timeouts.request_header,
        proxy_protocol=bound.config.proxy_protocol,
        tls=bound.tls,
        port=port,
        local=here,
    )
    if negotiated is None:
        return False
    client, peer, h2 = negotiated
    if h2:
        await serve_http2(client, peer, rt, shared)
        return False
    return await serve_client(client, peer, rt, shared, owner, token)
