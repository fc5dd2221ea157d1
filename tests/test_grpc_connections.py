"""Connection settings (cipherfeed.config.GrpcLimits): round_robin really spreads a channel's calls
over every address it resolves (as a Kubernetes headless Service resolves to every pod), pick_first
does not; servers and clients with keepalive and a connection age serve calls; bad values are
refused. Real gRPC servers on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cipherfeed.config import ConfigError, GrpcLimits

SERVING = health_pb2.HealthCheckResponse


@pytest.fixture
def two_servers() -> Iterator[list[int]]:
    """Two health servers on loopback, told apart by the status they give service "which"."""
    limits = GrpcLimits(keepalive_seconds=30, max_connection_age_seconds=300)
    servers, ports = [], []
    for status in (SERVING.SERVING, SERVING.NOT_SERVING):
        server = grpc.server(ThreadPoolExecutor(max_workers=2), options=limits.server_options())
        servicer = health.HealthServicer()
        servicer.set("which", status)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
    yield ports
    for server in servers:
        server.stop(grace=None)


def answers(ports: list[int], limits: GrpcLimits, calls: int = 8) -> set[int]:
    # The ipv4: resolver gives the channel both addresses, as DNS gives every pod of a headless Service.
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
    with grpc.insecure_channel(target, options=limits.channel_options()) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="which")
        return {stub.Check(request, timeout=10, wait_for_ready=True).status for _ in range(calls)}


def test_round_robin_spreads_calls_over_every_address_and_pick_first_does_not(two_servers):
    assert answers(two_servers, GrpcLimits(lb_policy="round_robin", keepalive_seconds=30)) == {
        SERVING.SERVING,
        SERVING.NOT_SERVING,
    }
    assert len(answers(two_servers, GrpcLimits())) == 1


def test_connection_settings_from_the_environment_are_checked(monkeypatch):
    monkeypatch.setenv("CIPHERFEED_GRPC_LB_POLICY", "round_robin")
    monkeypatch.setenv("CIPHERFEED_GRPC_KEEPALIVE_SECONDS", "20")
    monkeypatch.setenv("CIPHERFEED_GRPC_MAX_CONNECTION_AGE_SECONDS", "120")
    limits = GrpcLimits.from_env()
    assert (limits.lb_policy, limits.keepalive_seconds, limits.max_connection_age_seconds) == ("round_robin", 20, 120)
    assert dict(GrpcLimits().channel_options()).keys() == {
        "grpc.max_send_message_length",
        "grpc.max_receive_message_length",
    }  # a laptop mesh's channels as before: pick_first, no pings
    for name, value in (
        ("CIPHERFEED_GRPC_LB_POLICY", "random"),
        ("CIPHERFEED_GRPC_KEEPALIVE_SECONDS", "-1"),
        ("CIPHERFEED_GRPC_MAX_CONNECTION_AGE_SECONDS", "-5"),
    ):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(ConfigError, match=name):
                GrpcLimits.from_env()
