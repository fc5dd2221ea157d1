"""Runs the gateway on uvicorn: ``cipherfeed serve gateway`` or ``python -m gateway``."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import sys
from typing import Any

import h11
import uvicorn
from grpc_health.v1 import health, health_pb2
from uvicorn.protocols.http.h11_impl import H11Protocol

from cipherfeed import heap, logs
from cipherfeed.config import ConfigError, GatewayConfig
from cipherfeed.healthport import HealthPort, health_listen
from gateway.app import create_app

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """Says "gateway listening on port N" once it accepts connections (supervisors and tests
    read that line, cipherfeed/devprocess.py). With a health port (kubelet's gRPC probe), that
    port says SERVING from then until shutdown begins."""

    def __init__(self, config: uvicorn.Config, gateway: GatewayConfig) -> None:
        super().__init__(config)
        self.health = health.HealthServicer()
        self.health_port: HealthPort | None = None
        if gateway.health_port is not None:
            self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            self.health_port = HealthPort.start(self.health, health_listen(f"{gateway.host}:0", gateway.health_port))

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            port = next(s.getsockname()[1] for server in self.servers for s in server.sockets)
            self.health.set("", health_pb2.HealthCheckResponse.SERVING)
            if self.health_port is not None:
                log.info("gateway health (grpc.health.v1 alone, plaintext) on port %d", self.health_port.port)
            print(f"gateway listening on port {port}", flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            await super().shutdown(sockets)
        finally:
            if self.health_port is not None:
                self.health_port.stop(grace=0)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers, counted from the
    connection's opening or its previous answer. uvicorn starts no timer when a connection opens
    (its keep-alive timer runs only after a response, and any byte cancels it), so a client could
    hold sockets open without a byte, or trickle a header a byte at a time, for ever."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request's headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request's headers get the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.close()


def uvicorn_config(config: GatewayConfig) -> uvicorn.Config:
    ssl: dict[str, Any] = {}
    if config.http_cert_file is not None and config.http_key_file is not None:
        ssl = {"ssl_certfile": str(config.http_cert_file), "ssl_keyfile": str(config.http_key_file)}
    return uvicorn.Config(
        create_app(config),
        host=config.host,
        port=config.port,
        loop="asyncio",  # grpc.aio runs on the standard event loop
        lifespan="on",
        access_log=False,  # query strings may carry owner proofs: never logged
        server_header=False,
        http=functools.partial(HeaderTimeoutProtocol, header_timeout=config.header_timeout_seconds),  # type: ignore[arg-type]
        # No connection limit here: uvicorn counts every open connection against it, so idle
        # sockets locked every client out with its text/plain 503. The gateway refuses API
        # requests past its own limits with a Status; idle connections go after header_timeout.
        limit_concurrency=None,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=10,
        log_config=None,
        **ssl,
    )


def main() -> int:
    # One malloc arena, as the gRPC services have (cipherfeed.heap): with one per thread the
    # gateway's free heap crept up under the load benchmark while its in-use heap stayed flat.
    heap.limit_arenas(1)
    try:
        logs.configure("gateway")  # CIPHERFEED_LOG_FORMAT, like the gRPC services
        config = GatewayConfig.from_env()
        server = _Server(uvicorn_config(config), config)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    server.run()
    return 0 if server.started else 2
