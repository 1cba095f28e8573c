"""A DNS server the tests control, on loopback UDP and TCP (one port), built on dnspython's
message API: it answers from a table the test edits, and per name it can instead refuse
(SERVFAIL), stay silent, say NXDOMAIN, send garbage, or truncate UDP answers (TC bit) so the
client has to ask again over TCP. Every question it gets is recorded with its transport.

    dns = DnsServer()
    dns.set("chat.test", A=["127.0.0.2", "127.0.0.3"])
    dns.set("_ws._tcp.chat.test", SRV=[(0, 1, 9000, "a.chat.test")], glue=True)
    dns.mode["chat.test"] = "servfail"
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Srv = tuple[int, int, int, str]  # priority, weight, port, target
MODES = ("answer", "servfail", "silent", "nxdomain", "garbage", "truncate", "shuffle")


@dataclass
class Query:
    name: str  # lower-case, without the final dot
    rdtype: str
    transport: str  # "udp" | "tcp"
    at: float  # time.monotonic() when it arrived


def _key(name: str) -> str:
    return name.lower().rstrip(".")


class DnsServer:
    """See the module docstring. `mode[name]` picks how a name is answered (default
    "answer"; "shuffle" answers with the records in a random order)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, ttl: int = 1) -> None:
        self.ttl = ttl
        self.records: dict[tuple[str, str], list[str]] = {}
        self.glue: set[str] = set()  # SRV names whose answers carry their targets' addresses
        self.mode: dict[str, str] = {}
        self.default_mode = "answer"
        self.queries: list[Query] = []
        self._lock = threading.Lock()
        self.udp, self.tcp = _bind_both(host, port)
        self.host, self.port = self.udp.getsockname()[:2]
        self._closed = False
        self._threads = [
            threading.Thread(target=target, daemon=True)
            for target in (self._serve_udp, self._serve_tcp)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # --- the table ---------------------------------------------------------------------------

    def set(
        self,
        name: str,
        *,
        A: Sequence[str] = (),  # record types, spelled as DNS spells them
        AAAA: Sequence[str] = (),
        SRV: Sequence[Srv] = (),
        CNAME: str | None = None,
        glue: bool = False,
    ) -> None:
        """Replace every record of `name` (no records at all: the name exists, NODATA)."""
        key = _key(name)
        with self._lock:
            for rdtype in ("A", "AAAA", "SRV", "CNAME"):
                self.records.pop((key, rdtype), None)
            self.records[(key, "A")] = list(A)
            self.records[(key, "AAAA")] = list(AAAA)
            self.records[(key, "SRV")] = [f"{p} {w} {port} {t}." for p, w, port, t in SRV]
            if CNAME is not None:
                self.records[(key, "CNAME")] = [f"{CNAME}."]
            self.glue.discard(key)
            if glue:
                self.glue.add(key)

    def remove(self, name: str) -> None:
        """Forget `name`: it no longer exists (NXDOMAIN)."""
        key = _key(name)
        with self._lock:
            for rdtype in ("A", "AAAA", "SRV", "CNAME"):
                self.records.pop((key, rdtype), None)

    def asked(self, name: str, rdtype: str | None = None, transport: str | None = None) -> int:
        """How many questions about `name` arrived (of that type, over that transport)."""
        key = _key(name)
        with self._lock:
            return sum(
                1
                for q in self.queries
                if q.name == key
                and (rdtype is None or q.rdtype == rdtype)
                and (transport is None or q.transport == transport)
            )

    # --- answering -------------------------------------------------------------------------

    def _exists(self, key: str) -> bool:
        return any(k == key for k, _ in self.records)

    def _answer(self, wire: bytes, transport: str) -> bytes | None:
        """The response to one query, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # a test server: what it cannot parse, it does not answer
            return None
        question = query.question[0]
        key = _key(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append(Query(key, rdtype, transport, time.monotonic()))
            mode = self.mode.get(key, self.default_mode)
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            if mode == "silent":
                return None
            if mode == "garbage":
                return wire[:2] + bytes(random.randrange(256) for _ in range(40))
            if mode == "servfail":
                response.set_rcode(dns.rcode.SERVFAIL)
                return response.to_wire()
            if mode == "nxdomain" or not self._exists(key):
                response.set_rcode(dns.rcode.NXDOMAIN)
                return response.to_wire()
            if mode == "truncate" and transport == "udp":
                response.flags |= dns.flags.TC
                return response.to_wire()
            self._fill(response, key, rdtype, shuffle=mode == "shuffle")
        limit = 65535 if transport == "tcp" else max(512, query.payload)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            cut = dns.message.make_response(query)
            cut.flags |= dns.flags.AA | dns.flags.TC
            return cut.to_wire()

    def _fill(self, response: dns.message.Message, key: str, rdtype: str, *, shuffle: bool) -> None:
        name = dns.name.from_text(key)
        chain = self.records.get((key, "CNAME"))
        seen = 0
        while chain and rdtype != "CNAME" and seen < 20:  # follow (or loop) like a recursor
            response.answer.append(dns.rrset.from_text_list(name, self.ttl, "IN", "CNAME", chain))
            key = _key(chain[0])
            name = dns.name.from_text(key)
            chain = self.records.get((key, "CNAME"))
            seen += 1
        values = list(self.records.get((key, rdtype), []))
        if shuffle:
            random.shuffle(values)
        if values:
            response.answer.append(dns.rrset.from_text_list(name, self.ttl, "IN", rdtype, values))
        if rdtype == "SRV" and key in self.glue:
            for value in values:
                target = _key(value.split()[3])
                for family in ("A", "AAAA"):
                    if found := self.records.get((target, family)):
                        glue = dns.rrset.from_text_list(target + ".", self.ttl, "IN", family, found)
                        response.additional.append(glue)

    # --- transports ------------------------------------------------------------------------

    def _serve_udp(self) -> None:
        while not self._closed:
            try:
                wire, peer = self.udp.recvfrom(65535)
            except OSError:
                return
            if self._closed:
                return
            reply = self._answer(wire, "udp")
            if reply is not None:
                with contextlib.suppress(OSError):
                    self.udp.sendto(reply, peer)

    def _serve_tcp(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._tcp_client, args=(conn,), daemon=True).start()

    def _tcp_client(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                while size := _read(conn, 2):
                    (length,) = struct.unpack("!H", size)
                    reply = self._answer(_read(conn, length), "tcp")
                    if reply is None:
                        conn.recv(1)  # silent: hold the connection until the client gives up
                        return
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                return

    def close(self) -> None:
        """Stop answering and free the port (a thread blocked on a socket would keep it)."""
        self._closed = True
        with contextlib.suppress(OSError):
            self.tcp.shutdown(socket.SHUT_RDWR)  # wakes accept()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as poke, contextlib.suppress(OSError):
            poke.sendto(b"", (self.host, self.port))  # wakes recvfrom()
        for thread in self._threads:
            thread.join(5)
        self.udp.close()
        self.tcp.close()


def _bind_both(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on one port (a fresh one unless `port` is given)."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((host, port))
        try:
            return udp, socket.create_server((host, udp.getsockname()[1]))
        except OSError:
            udp.close()
            if port:
                raise
    raise RuntimeError("no port free for both UDP and TCP")


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return b""
        data += chunk
    return data
