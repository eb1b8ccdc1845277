"""The monitor suites: a real ``fishchat-iot up`` (``up_server_factory``) with its
monitor on a free port (``--monitor-port 0``), an operator made by the CLI, and a tiny
HTTP client (urllib) for the API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest
from support.server import ServerFactory, ServerProcess


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def http(
    url: str,
    token: str | None = None,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=hdrs)
    try:
        with _opener.open(req, timeout=10) as res:
            return Reply(res.status, {k.lower(): v for k, v in res.headers.items()}, res.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


@dataclass
class Monitored:
    server: ServerProcess
    token: str

    @property
    def base(self) -> str:
        return f"http://{self.server.monitor}"

    def get(self, path: str, token: str | None = "") -> Reply:
        return http(self.base + path, self.token if token == "" else token)

    def post(self, path: str, doc: Any = None) -> Reply:
        return http(
            self.base + path,
            self.token,
            "POST",
            json.dumps(doc or {}).encode(),
            {"Content-Type": "application/json"},
        )


def add_operator(server: ServerProcess, name: str = "ops") -> str:
    out = server.cli("operator", "add", name, "--json")
    token: str = json.loads(out.stdout)["token"]
    return token


@pytest.fixture
def monitored(up_server_factory: ServerFactory) -> Monitored:
    server = up_server_factory()
    assert server.monitor, f"no monitor in the ready line: {server.ready}"
    return Monitored(server, add_operator(server))
