"""The gateway under hostile input (an attack review's findings, each reproduced here first):
a real gateway process on loopback, started as tests/test_gateway.py starts it. The upstreams
need not serve: every case here is decided before the gateway calls them, or is about the
gateway answering at all while it is attacked.
"""

from __future__ import annotations

import base64
import re
import socket
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from gateway.app import EXPLORER_CSP
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
    # 65,000 levels: with py_ecc's recursion limit json.loads overflowed the C stack and the
    # gateway died with SIGSEGV (rc -11) before answering anyone (the review's 80,000 objects;
    # arrays here, to stay under the JSON token limit, which refuses deeper bodies unparsed)
    proc, port = gateway
    depth = 65_000
    body = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
        r = http.post("/v1/signin:nonce", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and reason(r) == "FIELD_INVALID"
        assert http.get("/healthz").status_code == 200
    assert proc.poll() is None


def metric(http: httpx.Client, line_prefix: str) -> float:
    """The value of the exposition line starting with ``line_prefix`` (0 when absent)."""
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for_metric(http: httpx.Client, line_prefix: str, value: float) -> None:
    """Polls /metrics until the line has ``value``: the gauge is the condition, not a timer."""
    for _ in range(10_000):
        if metric(http, line_prefix) == value:
            return
    raise AssertionError(f"{line_prefix} never reached {value}")


def read_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(300)  # a hang guard only: the gateway's own timeouts close these sockets
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_idle_connections_leave_the_gateway_serving_and_are_closed():
    # uvicorn's limit_concurrency (max_concurrency + 32) counted every open connection: 36 sockets
    # that never sent a byte made every request, /healthz included, its text/plain 503 for ever
    dead = free_port()
    proc, port = start_gateway(dead, dead, dead, max_concurrency=4, header_timeout_seconds=2.0)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    try:
        trickle = socket.create_connection(("127.0.0.1", port))
        trickle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers that never end
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            assert http.get("/healthz").json() == {"status": "ok"}
            r = http.get("/v1/nowhere")
            assert r.status_code == 404 and reason(r) == "ROUTE_NOT_FOUND"
        # the gateway closes each of them once its headers are late
        for sock in [*idle, trickle]:
            assert read_until_closed(sock) == b""
    finally:
        for sock in idle:
            sock.close()
        stop(proc)


def start_slow_body(port: int, path: str = "/v1/signin:nonce") -> socket.socket:
    """A POST whose body promises 10 bytes and sends one."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{{".encode()
    )
    return sock


def test_slow_bodies_hold_receiving_slots_not_the_upstream_ones():
    # the in-flight count was taken before the body was read: max_concurrency slow bodies made
    # every API request 503 "the gateway is handling N requests" for the whole body timeout
    dead = free_port()
    proc, port = start_gateway(
        dead, dead, dead, max_concurrency=2, max_receiving=4, body_idle_seconds=2.0, body_timeout_seconds=600.0
    )
    slow = [start_slow_body(port) for _ in range(2)]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            wait_for_metric(http, "cipherfeed_gateway_requests_receiving", 2)
            r = http.post("/v1/signin:nonce", json={})  # served: its upstream is down, so 503 saying so
            assert r.status_code == 503 and reason(r) == "DEPENDENCY_UNAVAILABLE"
            slow += [start_slow_body(port) for _ in range(2)]
            wait_for_metric(http, "cipherfeed_gateway_requests_receiving", 4)
            r = http.post("/v1/signin:nonce", json={})  # every receiving slot is taken
            assert r.status_code == 503 and reason(r) == "RETRY" and r.headers["retry-after"] == "1"
            r = http.get("/v1/params")  # no body: needs no receiving slot
            assert r.status_code == 503 and reason(r) == "DEPENDENCY_UNAVAILABLE"
            # a body whose next byte is later than body_idle_seconds gets 408, well before the body timeout
            for sock in slow:
                answer = read_until_closed(sock)
                assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
                assert b'"FIELD_INVALID"' in answer
            wait_for_metric(http, "cipherfeed_gateway_requests_receiving", 0)
    finally:
        for sock in slow:
            sock.close()
        stop(proc)


def test_requests_past_the_upstream_limit_get_503_while_one_is_upstream():
    # the upstream limit counts requests whose body arrived: one held upstream (a recommender that
    # accepts the connection and never answers the TLS handshake) fills max_concurrency=1
    dead = free_port()
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        proc, port = start_gateway(hung.getsockname()[1], dead, dead, max_concurrency=1)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
                with socket.create_connection(("127.0.0.1", port)) as first:
                    first.sendall(b"GET /v1/params HTTP/1.1\r\nHost: x\r\n\r\n")
                    wait_for_metric(http, "cipherfeed_gateway_requests_in_flight", 1)
                    r = http.post("/v1/signin:nonce", json={})
                    assert r.status_code == 503 and reason(r) == "RETRY" and r.headers["retry-after"] == "1"
                    upstream, _ = hung.accept()
                    upstream.close()  # the handshake fails: the held request ends
                    first.settimeout(300)  # a hang guard only
                    answer = first.recv(65536)
                    assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
                wait_for_metric(http, "cipherfeed_gateway_requests_in_flight", 0)
                r = http.post("/v1/signin:nonce", json={})
                assert r.status_code == 503 and reason(r) == "DEPENDENCY_UNAVAILABLE"
        finally:
            stop(proc)


def test_object_heavy_json_is_refused_before_it_is_parsed(gateway):
    # 8 MiB of "{}," under an unknown field: json.loads built ~2.8M dicts (+209 MiB RSS, 26x the
    # body) before json_format refused it with 400; now counted and refused unparsed with 413
    _, port = gateway
    n = 8 * 1024 * 1024 // 3
    heavy = b'{"x":[' + b"{}," * (n - 1) + b"{}]}"
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
        r = http.post("/v1/signin:nonce", content=heavy, headers={"content-type": "application/json"})
        assert r.status_code == 413 and reason(r) == "SIZE_LIMIT"
        assert r.json()["details"][0]["metadata"] == {"field": "body", "limit": "65536"}
        # a large ciphertext as base64 has none of the counted characters: parsed and sent on
        big = {"key": {"keyId": "0" * 64}, "queryCiphertext": base64.b64encode(b"\x01" * (8 << 20)).decode()}
        r = http.post("/v1/score", json=big)
        assert r.status_code == 503 and reason(r) == "DEPENDENCY_UNAVAILABLE"


def test_a_client_that_drops_its_body_is_cancelled_not_an_internal_error(tmp_path):
    dead = free_port()
    log = tmp_path / "gateway.log"
    proc, port = start_gateway(dead, dead, dead, log_path=log)
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(
                    b"POST /v1/signin:nonce HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n{"
                )
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            cancelled = (
                'cipherfeed_gateway_requests_total{grpc_code="CANCELLED",route="POST /v1/signin:nonce",status="499"}'
            )
            wait_for_metric(http, cancelled, 3)
            assert 'grpc_code="INTERNAL"' not in http.get("/metrics").text
    finally:
        stop(proc)
    text = log.read_text()
    assert "unexpected error" not in text and "Traceback" not in text, text[-2000:]


def test_a_body_without_content_type_is_refused(gateway):
    # read as JSON, an unlabelled body let a cross-origin no-cors fetch (a CORS "simple" request,
    # never preflighted) reach the API
    _, port = gateway
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        r = http.post("/v1/signin:nonce", content=b"{}")
        assert r.status_code == 415 and reason(r) == "FIELD_INVALID"
        r = http.post("/v1/signin:nonce", content=b"{}", headers={"content-type": "text/plain"})
        assert r.status_code == 415
        r = http.post("/v1/signin:nonce")  # no body at all needs no type: served (its upstream is down)
        assert r.status_code == 503 and reason(r) == "DEPENDENCY_UNAVAILABLE"


def test_explorer_pages_carry_security_headers(gateway):
    _, port = gateway
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        for path in ("/explorer/", "/explorer/explorer.js", "/explorer/style.css"):
            r = http.get(path)
            assert r.status_code == 200, path
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
            assert "script-src 'self'" in r.headers["content-security-policy"]
            assert r.headers["x-frame-options"] == "DENY"
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer"
            assert r.headers["cross-origin-opener-policy"] == "same-origin"
        # the page's own meta CSP is the header's, but for frame-ancestors (a meta tag cannot set it)
        meta = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', http.get("/explorer/").text)
        assert meta is not None and f"{meta.group(1)}; frame-ancestors 'none'" == EXPLORER_CSP


def test_allowed_hosts_refuse_another_host():
    dead = free_port()
    proc, port = start_gateway(dead, dead, dead, allowed_hosts=("127.0.0.1", "gateway.test"))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            r = http.get("/explorer", headers={"host": "evil.example"})  # was: 307 to http://evil.example/explorer/
            assert r.status_code == 421 and reason(r) == "FIELD_INVALID"
            r = http.get("/explorer", headers={"host": "gateway.test"})
            assert r.status_code == 307 and r.headers["location"] == "http://gateway.test/explorer/"
            assert http.get("/healthz").status_code == 200  # Host 127.0.0.1:<port>
    finally:
        stop(proc)
