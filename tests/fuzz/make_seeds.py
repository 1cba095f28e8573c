"""Write the hand-made seeds into tests/fuzz/corpus/ (rerun after editing; idempotent).

The e2e-* files were extracted from the request literals in tests/e2e; these add the RFC 9112
examples, TE/CL smuggling variants, chunk extensions and absolute-form targets.
"""

from __future__ import annotations

import pathlib

CORPUS = pathlib.Path(__file__).parent / "corpus"
H = b"Host: www.example.com\r\n"
KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"

SEEDS: dict[str, bytes] = {
    # RFC 9112 §3.2.1-3.2.4 request-target forms, §2.1 example.
    "rfc9112-origin-form": b"GET /where?q=now HTTP/1.1\r\n" + H + b"\r\n",
    "rfc9112-absolute-form": b"GET http://www.example.org/pub/WWW/TheProject.html HTTP/1.1\r\n"
    + H
    + b"\r\n",
    "rfc9112-authority-form": b"CONNECT www.example.com:80 HTTP/1.1\r\n" + H + b"\r\n",
    "rfc9112-asterisk-form": b"OPTIONS * HTTP/1.1\r\nHost: www.example.org:8001\r\n\r\n",
    "rfc9112-curl-example": b"GET /hello.txt HTTP/1.1\r\nUser-Agent: curl/7.64.1\r\n"
    b"Host: www.example.com\r\nAccept-Language: en, mi\r\n\r\n",
    # RFC 9112 §7.1 chunked, with extensions (§7.1.1) and trailers (§7.1.2).
    "rfc9112-chunked": b"POST /up HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n",
    "chunk-extensions": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b'4;name=value;q="x y"\r\nWiki\r\n0;last\r\n\r\n',
    "chunk-trailers": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
    b"Trailer: Expires\r\n\r\n3\r\nabc\r\n0\r\nExpires: Wed, 21 Oct 2015 07:28:00 GMT\r\n\r\n",
    "chunk-size-overflow": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"fffffffffffffffff1\r\nx\r\n0\r\n\r\n",
    "chunk-bare-lf": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"3\nabc\n0\n\n",
    "chunk-negative": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n",
    "chunk-0x-prefix": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n",
    # Request smuggling: CL.TE, TE.CL, TE.TE obfuscation (PortSwigger's list and RFC 9112 §6.1).
    "smuggle-cl-te": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 13\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nSMUGGLED",
    "smuggle-te-cl": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
    "smuggle-te-space-before-colon": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "smuggle-te-xchunked": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n",
    "smuggle-te-tab": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
    "smuggle-te-double": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: x\r\n\r\n0\r\n\r\n",
    "smuggle-te-list": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n",
    "smuggle-te-identity": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n"
    b"Content-Length: 3\r\n\r\nabc",
    "smuggle-te-obs-fold": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n",
    "smuggle-te-leading-space-line": b"POST / HTTP/1.1\r\n"
    + H
    + b" Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "smuggle-te-upper": b"POST / HTTP/1.1\r\n" + H + b"TRANSFER-ENCODING: CHUNKED\r\n\r\n0\r\n\r\n",
    "smuggle-te-vertical-tab": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
    "smuggle-te-http10": b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    "smuggle-cl-double": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n"
    b"Content-Length: 4\r\n\r\nabcd",
    "smuggle-cl-same-twice": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n"
    b"Content-Length: 3\r\n\r\nabc",
    "smuggle-cl-list": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc",
    "smuggle-cl-plus": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc",
    "smuggle-cl-huge": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999\r\n\r\n",
    "smuggle-cl-2-63": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 9223372036854775808\r\n\r\n",
    "smuggle-bare-lf-head": b"GET / HTTP/1.1\n" + b"Host: a\nX: y\n\n",
    "smuggle-bare-cr": b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n",
    "smuggle-nul-in-value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    "smuggle-two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "smuggle-host-comma": b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n",
    "smuggle-absolute-vs-host": b"GET http://api.example/only HTTP/1.1\r\nHost: evil\r\n\r\n",
    "absolute-form-https-query": b"GET https://api.example:443?x=1 HTTP/1.1\r\nHost: a\r\n\r\n",
    "absolute-form-userinfo": b"GET http://user@api.example/only HTTP/1.1\r\nHost: a\r\n\r\n",
    "absolute-form-no-path": b"GET http://api.example HTTP/1.1\r\n\r\n",
    "http10-no-host": b"GET / HTTP/1.0\r\n\r\n",
    "http09": b"GET /\r\n\r\n",
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "pipelined-three": (b"GET /a HTTP/1.1\r\n" + H + b"\r\n") * 3,
    "pipelined-after-error": b"GET x HTTP/1.1\r\n" + H + b"\r\nGET /b HTTP/1.1\r\n" + H + b"\r\n",
    "connection-nominates-host": b"GET / HTTP/1.1\r\n"
    + H
    + b"Connection: host, x-forwarded-for\r\n"
    b"X-Forwarded-For: 1.2.3.4\r\n\r\n",
    "connection-nominates-content-length": b"POST / HTTP/1.1\r\n"
    + H
    + b"Connection: content-length\r\nContent-Length: 3\r\n\r\nabc",
    "websocket-upgrade": b"GET /ws HTTP/1.1\r\n" + H + b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n" + KEY + b"\r\n\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58",
    "websocket-upgrade-with-body": b"GET /ws HTTP/1.1\r\n" + H + b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\nContent-Length: 4\r\n" + KEY + b"\r\nbodyGET / HTTP/1.1\r\n\r\n",
    "websocket-bad-key": b"GET /ws HTTP/1.1\r\n" + H + b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
    "h2c-upgrade": b"GET /ws HTTP/1.1\r\n"
    + H
    + b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings"
    b"\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    "upgrade-not-allowed": b"GET / HTTP/1.1\r\n"
    + H
    + b"Upgrade: foo/1\r\nConnection: upgrade\r\n\r\n",
    "expect-100": b"POST / HTTP/1.1\r\n"
    + H
    + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    "head-too-large": b"GET / HTTP/1.1\r\n" + H + b"X: " + b"a" * 5000 + b"\r\n\r\n",
    "many-headers": b"GET / HTTP/1.1\r\n"
    + H
    + b"".join(b"X-%d: v\r\n" % i for i in range(300))
    + b"\r\n",
    "method-lowercase": b"get / HTTP/1.1\r\n" + H + b"\r\n",
    "target-space": b"GET /a b HTTP/1.1\r\n" + H + b"\r\n",
    "version-1.2": b"GET / HTTP/1.2\r\n" + H + b"\r\n",
    "head-request": b"HEAD / HTTP/1.1\r\n" + H + b"\r\n",
    "proxy-header-not-expected": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET / HTTP/1.1\r\n"
    + H
    + b"\r\n",
    "leading-crlf": b"\r\n\r\nGET / HTTP/1.1\r\n" + H + b"\r\n",
    "empty": b"",
}


def main() -> None:
    CORPUS.mkdir(exist_ok=True)
    for name, data in SEEDS.items():
        (CORPUS / name).write_bytes(data)


if __name__ == "__main__":
    main()
