"""A second, plaintext gRPC port that serves ``grpc.health.v1`` and nothing else.

Kubelet's native ``grpc:`` probe cannot present a client certificate, so it cannot reach a
service's main port (mutual TLS, the policy table). This port gives it the same serving status
(the main server's own ``HealthServicer`` object, so NOT_SERVING during a drain shows here too)
and nothing more: no reflection, no service methods (they answer UNIMPLEMENTED), tiny messages,
few concurrent calls. Off unless ``CIPHERFEED_<SERVICE>_HEALTH_PORT`` is set.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2_grpc

# A health check is a service name of a few bytes; nothing larger has a reason to arrive here.
MAX_MESSAGE_BYTES = 4096
MAX_CONCURRENT_RPCS = 16  # kubelet probes one at a time per container; Watch streams beyond this are refused


def health_listen(main_listen: str, port: int) -> str:
    """The health port's address: the main address's host with ``port`` (``[::]:50051`` → ``[::]:port``)."""
    host, sep, _ = main_listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"listen address {main_listen!r} has no host:port form")
    return f"{host}:{port}"


@dataclass
class HealthPort:
    server: grpc.Server
    port: int

    @classmethod
    def start(cls, servicer: health.HealthServicer, listen: str) -> HealthPort:
        """Serves ``servicer`` alone, plaintext, on ``listen`` (``:0`` for an ephemeral port)."""
        server = grpc.server(
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="grpc-health"),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port(listen)
        if port == 0:
            raise OSError(f"cannot listen on {listen} (health port)")
        server.start()
        return cls(server=server, port=port)

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait(grace + 5.0)  # bounded: a stop never waits on a stuck probe
