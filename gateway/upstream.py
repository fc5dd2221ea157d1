"""The gateway's channels to the mesh: ``grpc.aio``, mutual TLS as the ``gateway`` identity, each
server's certificate checked for the service's name, renewed certificate files picked up without
a restart (as ``cipherfeed.tls.RenewingChannel`` does for the synchronous clients)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2

from cipherfeed import tls as mtls
from cipherfeed.config import GatewayConfig, GrpcLimits, TlsConfig

log = logging.getLogger(__name__)

# Reconnect quickly after an upstream comes back: gRPC's default backoff grows to 120 s, during
# which every call would fail fast with UNAVAILABLE although the server is serving again.
RECONNECT_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


class Upstream:
    """One mesh service: a current channel, replaced when the certificate files change."""

    def __init__(self, name: str, target: str, limits: GrpcLimits, tls: TlsConfig, retire_grace: float = 300.0) -> None:
        self.name = name
        self.target = target
        self._tls = tls
        self._options: list[tuple[str, int | str]] = [*limits.channel_options(), *RECONNECT_OPTIONS]
        self._retire_grace = retire_grace
        self._files = None if tls.insecure_dev else mtls.CertificateFiles(tls, min_check_interval=1.0)
        if tls.insecure_dev:
            mtls.warn_insecure("client")
        else:
            self._options.append(("grpc.ssl_target_name_override", name))
        self._generation = -1
        self._channel: grpc.aio.Channel | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    def _open(self) -> grpc.aio.Channel:
        if self._files is None:
            return grpc.aio.insecure_channel(self.target, options=self._options)
        m = self._files.material
        credentials = grpc.ssl_channel_credentials(
            root_certificates=m.ca_pem, private_key=m.key_pem, certificate_chain=m.cert_pem
        )
        return grpc.aio.secure_channel(self.target, credentials, options=self._options)

    def channel(self) -> grpc.aio.Channel:
        if self._files is not None:
            self._files.refresh()
        generation = self._files.generation if self._files is not None else 0
        if self._channel is None or generation != self._generation:
            old, self._channel, self._generation = self._channel, self._open(), generation
            if old is not None:  # calls in flight finish on it; closed after the grace period
                task = asyncio.get_running_loop().create_task(self._retire(old))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
        return self._channel

    async def _retire(self, old: grpc.aio.Channel) -> None:
        await asyncio.sleep(self._retire_grace)
        await old.close()

    async def call(self, grpc_path: str, request: bytes, timeout: float, wait_for_ready: bool = False) -> bytes:
        """A unary call with serialized bytes in and out (the gateway encodes and decodes itself)."""
        method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel().unary_unary(grpc_path)
        response: bytes = await method(request, timeout=timeout, wait_for_ready=wait_for_ready)
        return response

    async def health(self, timeout: float, wait: bool = False) -> str:
        """The upstream's grpc.health.v1 status for the whole server, or the failure's code name;
        with ``wait``, a server not reachable yet is waited for (up to ``timeout``)."""
        request = health_pb2.HealthCheckRequest(service="").SerializeToString()
        try:
            raw = await self.call(HEALTH_CHECK, request, timeout, wait_for_ready=wait)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        status = health_pb2.HealthCheckResponse.FromString(raw).status
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


@dataclass
class Upstreams:
    by_name: dict[str, Upstream]

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Upstreams:
        targets = {
            "recommender": config.recommender_target,
            "keyservice": config.keyservice_target,
            "ledger": config.ledger_target,
        }
        return cls({name: Upstream(name, target, config.limits, config.tls) for name, target in targets.items()})

    def __getitem__(self, name: str) -> Upstream:
        return self.by_name[name]

    async def health(self, timeout: float, wait: bool = False) -> dict[str, str]:
        names = list(self.by_name)
        results = await asyncio.gather(*(self.by_name[n].health(timeout, wait) for n in names))
        return dict(zip(names, results, strict=True))

    async def close(self) -> None:
        await asyncio.gather(*(u.close() for u in self.by_name.values()))
