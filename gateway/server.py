"""Runs the gateway on uvicorn: ``cipherfeed serve gateway`` or ``python -m gateway``."""

from __future__ import annotations

import logging
import socket
import sys
from typing import Any

import uvicorn
from grpc_health.v1 import health, health_pb2

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
        # a backstop only: the gateway refuses API requests past max_concurrency itself, with a Status
        limit_concurrency=config.max_concurrency + 32,
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
