"""The kubelet health port: grpc.health.v1 alone, plaintext, the main server's own status; the
main port still requires mutual TLS. Real servers on loopback, in process and as a `cipherfeed
serve` child configured only by its environment (as a container is)."""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cipherfeed.config import ConfigError, GatewayConfig, KeyServiceConfig, LedgerConfig, RecommenderConfig
from cipherfeed.devredis import free_port
from cipherfeed.v1 import keyservice_pb2, ledger_pb2, recommender_pb2
from services.keyservice.server import serve as serve_keyservice
from services.ledger.server import serve as serve_ledger
from services.ledger.signers import LocalSigner
from services.recommender.server import serve as serve_recommender
from services.recommender.synthetic import synthetic_catalogue
from tests.conftest import keyservice_config, mesh_pki, recommender_config
from tests.test_ledger import ORIGIN, ledger_config

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# A method of each service that any identity may call on the main port (so UNIMPLEMENTED on the
# health port can only mean "not served here").
PUBLIC_METHOD = {
    "keyservice": ("/cipherfeed.v1.KeyService/GetPublicKeys", keyservice_pb2.GetPublicKeysRequest()),
    "ledger": ("/cipherfeed.v1.Ledger/GetCheckpoint", ledger_pb2.GetCheckpointRequest()),
    "recommender": ("/cipherfeed.v1.Recommender/GetModelInfo", recommender_pb2.GetModelInfoRequest()),
}
SERVICE_NAME = {
    "keyservice": "cipherfeed.v1.KeyService",
    "ledger": "cipherfeed.v1.Ledger",
    "recommender": "cipherfeed.v1.Recommender",
}


@pytest.mark.parametrize(
    ("config_type", "variable"),
    [
        (GatewayConfig, "CIPHERFEED_GATEWAY_HEALTH_PORT"),
        (KeyServiceConfig, "CIPHERFEED_KEYSERVICE_HEALTH_PORT"),
        (LedgerConfig, "CIPHERFEED_LEDGER_HEALTH_PORT"),
        (RecommenderConfig, "CIPHERFEED_RECOMMENDER_HEALTH_PORT"),
    ],
)
def test_health_port_is_off_by_default_and_typed(monkeypatch, config_type, variable):
    monkeypatch.delenv(variable, raising=False)
    assert config_type.from_env().health_port is None
    monkeypatch.setenv(variable, "")
    assert config_type.from_env().health_port is None
    monkeypatch.setenv(variable, "8081")
    assert config_type.from_env().health_port == 8081
    for bad in ("http", "-1", "70000"):
        monkeypatch.setenv(variable, bad)
        with pytest.raises(ConfigError, match=variable):
            config_type.from_env()


def _call(channel: grpc.Channel, method: str, request) -> grpc.StatusCode:
    try:
        channel.unary_unary(method, request_serializer=type(request).SerializeToString)(request, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _check(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


@pytest.fixture(params=["keyservice", "ledger", "recommender"])
def running(request, tmp_path, master_key_file):
    name = request.param
    if name == "keyservice":
        config = replace(keyservice_config(tmp_path, master_key_file, None), health_port=0)
        server, core = serve_keyservice(config)
    elif name == "ledger":
        config = replace(ledger_config(tmp_path), health_port=0)
        server, core = serve_ledger(config, signer=LocalSigner(ORIGIN), background_anchoring=False)
    else:
        config = replace(recommender_config(tmp_path, free_port(), None), health_port=0)
        server, core = serve_recommender(config, synthetic_catalogue(300, seed=3))
    yield name, server
    server.stop(grace=0)
    core.close()


def test_health_port_serves_health_alone_and_main_port_still_needs_mtls(running):
    name, server = running
    assert server.health_port is not None and server.health_port.port not in (0, server.port)
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port.port}") as plain:
        assert _check(plain) == SERVING
        assert _check(plain, SERVICE_NAME[name]) == SERVING
        method, request = PUBLIC_METHOD[name]
        assert _call(plain, method, request) == grpc.StatusCode.UNIMPLEMENTED
        reflection = reflection_pb2_grpc.ServerReflectionStub(plain).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(reflection)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # The same status object as the main port's: a drain shows here at once.
        server.health.set("", NOT_SERVING)
        assert _check(plain) == NOT_SERVING
        server.health.set("", SERVING)

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as plain_main:
        assert _call(plain_main, "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest()) == (
            grpc.StatusCode.UNAVAILABLE
        )
    with mesh_pki().channel(server.port, name, "operator") as mtls:
        assert _check(mtls) == SERVING
        method, request = PUBLIC_METHOD[name]
        assert _call(mtls, method, request) != grpc.StatusCode.UNIMPLEMENTED  # really served there


def test_health_port_refuses_large_messages(running):
    _, server = running
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port.port}") as plain:
        big = health_pb2.HealthCheckRequest(service="x" * 10_000)
        assert _call(plain, "/grpc.health.v1.Health/Check", big) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _check(plain) == SERVING  # and keeps serving


def test_stop_reports_not_serving_then_closes_the_health_port(tmp_path):
    config = replace(ledger_config(tmp_path), health_port=0)
    server, core = serve_ledger(config, signer=LocalSigner(ORIGIN), background_anchoring=False)
    port = server.health_port.port
    server.stop(grace=0)
    core.close()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
        assert _call(plain, "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest()) == (
            grpc.StatusCode.UNAVAILABLE
        )


def test_serve_reads_the_health_port_from_its_environment(tmp_path):
    from cipherfeed.devprocess import start_service

    port, health = free_port(), free_port()
    proc = start_service(
        "cipherfeed.cli",
        {
            "CIPHERFEED_LEDGER_LISTEN": f"127.0.0.1:{port}",
            "CIPHERFEED_LEDGER_HEALTH_PORT": str(health),
            "CIPHERFEED_LEDGER_DSN": f"sqlite:///{tmp_path / 'ledger.db'}",
            "CIPHERFEED_LEDGER_SIGNER": "local",
            "CIPHERFEED_STATE_DIR": str(tmp_path),
            **mesh_pki().env("ledger"),
        },
        args=["serve", "ledger"],
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{health}") as plain:
            assert _check(plain, "cipherfeed.v1.Ledger") == SERVING
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_gateway_serves_its_health_port_from_its_environment():
    from cipherfeed.devprocess import start_service

    port, health = free_port(), free_port()
    proc = start_service(
        "cipherfeed.cli",
        {
            "CIPHERFEED_GATEWAY_HOST": "127.0.0.1",
            "CIPHERFEED_GATEWAY_PORT": str(port),
            "CIPHERFEED_GATEWAY_HEALTH_PORT": str(health),
            **mesh_pki().env("gateway"),
        },
        args=["serve", "gateway"],
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{health}") as plain:
            assert _check(plain) == SERVING
            method, request = PUBLIC_METHOD["recommender"]
            assert _call(plain, method, request) == grpc.StatusCode.UNIMPLEMENTED
        proc.terminate()
        assert proc.wait(timeout=30) in (0, -15)  # uvicorn re-raises SIGTERM once it has shut down
        with grpc.insecure_channel(f"127.0.0.1:{health}") as plain:
            assert _call(plain, "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest()) == (
                grpc.StatusCode.UNAVAILABLE
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)
