"""Units of the monitor: the histogram and exposition format, the ring buffers, the
operators file, and the HTTP server's handling of bad requests."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

from fishchat_iot.roles.monitor import (
    _Operators,
    hash_operator_token,
    read_operators,
    write_operators,
)
from fishchat_iot.roles.monitor_http import HttpServer, Request, Response
from fishchat_iot.roles.monitor_metrics import Exposition, Histogram, Ring


def test_histogram_and_exposition() -> None:
    h = Histogram((1, 10))
    for v in (0, 1, 5, 10, 11):
        h.observe(v)
    assert h.cumulative() == [("1", 2), ("10", 4), ("+Inf", 5)]
    ex = Exposition()
    ex.family("x_total", "counter", "X.", [({"reason": 'a"b'}, 3)])
    ex.histogram("lat_seconds", "L.", h, scale=0.001)
    text = ex.text()
    assert 'x_total{reason="a\\"b"} 3' in text
    assert 'lat_seconds_bucket{le="0.01"} 4' in text
    assert 'lat_seconds_bucket{le="+Inf"} 5' in text
    assert "lat_seconds_count 5" in text and "lat_seconds_sum 0.027" in text


def test_ring_is_bounded_newest_first() -> None:
    r = Ring(3)
    for i in range(5):
        r.add(n=i)
    assert [e["n"] for e in r.recent()] == [4, 3, 2] and r.total == 5


def test_operators_file_is_private_and_hashed(tmp_path: Path) -> None:
    path = tmp_path / "operators.json"
    write_operators(path, {"ann": {"token_sha256": hash_operator_token("secret")}})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "secret" not in path.read_text()
    ops = _Operators(path)
    assert ops.check("secret") == "ann" and ops.check("wrong") is None
    write_operators(path, {})  # removed: its token stops working at once
    assert ops.check("secret") is None and read_operators(path) == {}


async def test_http_server_refuses_bad_requests() -> None:
    async def handler(req: Request) -> Response:
        return Response(200, req.body)

    server = HttpServer(handler, "127.0.0.1", 0)
    await server.start()
    try:

        async def ask(raw: bytes) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(raw)
            data = await reader.read(65536)
            writer.close()
            return data

        ok = await ask(b"POST /x HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
        assert ok.startswith(b"HTTP/1.1 200 ") and ok.endswith(b"hi")
        assert (await ask(b"NONSENSE\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        big = b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"
        assert (await ask(big)).startswith(b"HTTP/1.1 413 ")
        chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        assert (await ask(chunked)).startswith(b"HTTP/1.1 501 ")
    finally:
        await server.stop()
