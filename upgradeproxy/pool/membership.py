"""The balancer of a discovered upstream (interface.md rule 16): its servers change in place.

A membership change rebuilds the balancer's server list once, off the request path (`follow`),
so a pick costs what it costs for configured servers: no per-pick check of the set. Every
balancer built for the upstream (the current config's and those of older configs that open
connections still use) follows the same set, so no connection keeps picking a vanished server.

A server that leaves keeps its entry in `_by_server` (its counts live in the `ServerBook`),
so tunnels and requests started on it release their counts normally; the entry goes once the
book forgets the server (upstream/discovery.py, long after its last tunnel).
"""

from __future__ import annotations

from collections.abc import Sequence

from upgradeproxy.config.model import Address, Server, Upstream
from upgradeproxy.pool.balancer import Balancer
from upgradeproxy.pool.servers import Closable, UpstreamState
from upgradeproxy.pool.sticky import address_token


class DiscoveredBalancer(Balancer):
    """Orders a discovered upstream's current servers; `follow` swaps the set."""

    may_be_empty = True

    def __init__(self, upstream: Upstream, state: UpstreamState) -> None:
        found = state.discovered
        assert upstream.discover is not None
        assert found is not None
        same = found.source == upstream.discover.source
        self._ring_points = found.ring_points
        super().__init__(
            found.servers if same else (), upstream.balance, state, name=upstream.name,
            max_tunnels=upstream.max_tunnels, slow_start=upstream.slow_start,
            sticky_cookie=upstream.sticky_cookie,
        )  # fmt: skip
        found.followers.add(self)

    def _token(self, address: Address) -> str:
        # Address and port only: every worker and replica gives a pod the same id (rule 16).
        return address_token(address)

    def follow(self, servers: Sequence[Server]) -> None:
        """Balance over `servers` from now on; servers the book forgot are dropped."""
        self._set_servers(servers)
        known = self._state.servers
        for server in [s for s in self._by_server if s.address not in known]:
            del self._by_server[server]
            self._token_of.pop(server, None)
        if self._ring_points is not None:
            names = {str(address) for address in known}
            for key in [k for k in self._ring_points if k[0] not in names]:
                del self._ring_points[key]

    def hold_tunnel(self, server: Server, ending: Closable | None = None) -> None:
        super().hold_tunnel(server)
        endings = self._by_server[server].state.endings
        if ending is not None and endings is not None:
            endings.add(ending)

    def release_tunnel(self, server: Server, ending: Closable | None = None) -> None:
        super().release_tunnel(server)
        endings = self._by_server[server].state.endings
        if ending is not None and endings is not None:
            endings.discard(ending)


def balancer_for(upstream: Upstream, state: UpstreamState) -> Balancer:
    """The balancer of `upstream`: over its configured servers, or following DNS."""
    if upstream.discover is not None:
        return DiscoveredBalancer(upstream, state)
    return Balancer.for_upstream(upstream, state)
