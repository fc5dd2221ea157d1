"""The gateway under hostile input (an attack review's findings, each reproduced here first):
a real gateway process on loopback, started as tests/test_gateway.py starts it. The upstreams
need not serve: every case here is decided before the gateway calls them, or is about the
gateway answering at all while it is attacked.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from tests.test_gateway import start_gateway, stop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def gateway() -> Iterator[tuple[subprocess.Popen, int]]:
    dead = free_port()  # nothing listens there: the upstreams are never reached
    proc, port = start_gateway(dead, dead, dead)
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            stop(proc)


def reason(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text[:200]
    return str(response.json()["details"][0]["reason"])


def test_deeply_nested_json_body_is_refused_and_the_gateway_serves_on(gateway):
    # 100,000 levels (~700 KB): with py_ecc's recursion limit json.loads overflowed the C stack
    # and the gateway died with SIGSEGV (rc -11) before answering anyone
    proc, port = gateway
    depth = 100_000
    body = b'{"a":' * depth + b"1" + b"}" * depth
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
        r = http.post("/v1/signin:nonce", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and reason(r) == "FIELD_INVALID"
        assert http.get("/healthz").status_code == 200
    assert proc.poll() is None
