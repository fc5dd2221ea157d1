"""The SDK through the HTTP gateway or over gRPC, chosen by the endpoint's URL scheme (issue 12,
deliverable 3): the same private recommendation gives identical feeds and receipts that verify
down to the on-chain anchor on either path."""

from __future__ import annotations

import dataclasses
import json
import shutil

import grpc
import numpy as np
import pytest

from cipherfeed.cli import AnchorerChain, operator_trust
from cipherfeed.client.interest import Engagement
from cipherfeed.client.sdk import RecommenderClient
from cipherfeed.client.transport import HttpChannel, HttpRpcError, open_channel
from cipherfeed.client.verify import fetch_and_verify
from cipherfeed.config import ClientConfig, ConfigError
from cipherfeed.errors import Reason
from cipherfeed.grpcutil import reason_of
from cipherfeed.v1 import keyservice_pb2, ledger_pb2_grpc, recommender_pb2
from services.recommender.synthetic import synthetic_catalogue
from tests.conftest import TEST_LIMITS, mesh_pki
from tests.envoy_reference import start_envoy, start_gateway, start_mesh

ITEMS = 3000


@pytest.fixture(scope="module")
def mesh(master_key_file, redis_server, tmp_path_factory):
    model = synthetic_catalogue(ITEMS, seed=3)
    running = start_mesh(tmp_path_factory.mktemp("sdk-mesh"), master_key_file, model, redis_server)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def envoy(mesh, tmp_path_factory):
    proxy = start_envoy(tmp_path_factory.mktemp("sdk-envoy"), mesh.ports, mesh_pki().tls("gateway"))
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def gateway(mesh):
    running = start_gateway(mesh)
    yield running.url
    running.stop()


def grpc_config(mesh, home) -> ClientConfig:
    p = mesh.ports
    return ClientConfig(
        target=f"127.0.0.1:{p['recommender']}",
        keyservice_target=f"grpcs://127.0.0.1:{p['keyservice']}",
        ledger_target=f"127.0.0.1:{p['ledger']}",
        deadline_seconds=60,
        home=home,
        limits=TEST_LIMITS,
        tls=mesh_pki().tls("device"),
    )


def http_config(url: str, home) -> ClientConfig:
    return ClientConfig(
        target=url, keyservice_target=url, ledger_target=url, deadline_seconds=60, home=home, limits=TEST_LIMITS,
        tls=mesh_pki().tls("device"),
    )  # fmt: skip


def history(seed: int) -> list[Engagement]:
    rng = np.random.default_rng(seed)
    picked = rng.choice(ITEMS, size=12, replace=False)
    return [
        Engagement(f"syn3-{i}", liked=bool(k % 3 == 0), commented=bool(k % 5 == 0), recency_rank=k)
        for k, i in enumerate(picked)
    ]


def private_feed(client: RecommenderClient, engagements: list[Engagement]):
    feed, scored = client.recommend(engagements, k=10, per_creator_cap=2)
    assert scored.receipt is not None
    return [item.index for item in feed], scored


def verify_all(mesh, client: RecommenderClient, receipts) -> None:
    ledger = mesh.cores["ledger"]
    mesh.cores["recommender"].receipts.flush(timeout=30)
    ledger.log.checkpoint()
    ledger.anchorer.anchor_pending()
    trust = operator_trust(ledger, client)
    stub = ledger_pb2_grpc.LedgerStub(client.ledger_channel())
    for scored in receipts:
        verified = fetch_and_verify(scored.receipt_id, stub, trust, AnchorerChain(ledger.anchorer), 30, scored.receipt)
        assert verified is not None


def test_the_scheme_picks_the_transport():
    tls = mesh_pki().tls("device")
    assert isinstance(open_channel("http://127.0.0.1:1", TEST_LIMITS, tls, "recommender"), HttpChannel)
    assert isinstance(open_channel("https://gw.example", TEST_LIMITS, tls, "recommender"), HttpChannel)
    for target in ("127.0.0.1:1", "grpcs://127.0.0.1:1"):
        ch = open_channel(target, TEST_LIMITS, tls, "recommender")
        assert not isinstance(ch, HttpChannel) and isinstance(ch, grpc.Channel)
        ch.close()
    with pytest.raises(ConfigError, match="plaintext"):
        open_channel("grpc://127.0.0.1:1", TEST_LIMITS, tls, "recommender")
    with pytest.raises(ConfigError, match="unknown scheme"):
        open_channel("ftp://127.0.0.1:1", TEST_LIMITS, tls, "recommender")


def test_requests_follow_their_http_rules():
    """Path variables from the request and not repeated in the body; a GET's fields as query
    parameters (nested, repeated, bytes as base64); a session token in a header, never in the URL."""
    channel = HttpChannel("http://127.0.0.1:1", TEST_LIMITS, mesh_pki().tls("device"))
    ks = "/cipherfeed.v1.KeyService/"
    rotate = keyservice_pb2.RotateKeyRequest(key_id="ab/c", public_key=b"\xff", min_version=2)
    path, headers, params, body = channel._encode(channel._route(ks + "RotateKey"), rotate)
    assert path == "/v1/keys/ab%2Fc:rotate" and params == []
    assert headers["content-type"] == "application/x-protobuf"
    assert keyservice_pb2.RotateKeyRequest.FromString(body) == keyservice_pb2.RotateKeyRequest(
        public_key=b"\xff", min_version=2
    )
    audit = keyservice_pb2.ListAuditRequest(key_id="k", limit=5)
    audit.auth.signature.nonce = b"\xfb\xff"
    path, headers, params, body = channel._encode(channel._route(ks + "ListAudit"), audit)
    assert (path, body) == ("/v1/audit", b"")
    assert sorted(params) == [("auth.signature.nonce", "+/8="), ("key_id", "k"), ("limit", "5")]
    audit.auth.session_token = "cfs1.secret"
    _, headers, params, _ = channel._encode(channel._route(ks + "ListAudit"), audit)
    assert headers["authorization"] == "Bearer cfs1.secret"
    assert all("cfs1" not in value for _, value in params)
    items = recommender_pb2.GetItemsRequest(indices=[3, 4])
    json_channel = HttpChannel("http://127.0.0.1:1", TEST_LIMITS, mesh_pki().tls("device"), encoding="json")
    _, headers, _, body = json_channel._encode(json_channel._route("/cipherfeed.v1.Recommender/GetItems"), items)
    assert headers["content-type"] == "application/json" and json.loads(body) == {"indices": [3, 4]}
    with pytest.raises(ValueError, match="no HTTP mapping"):
        channel._route("/cipherfeed.v1.Ledger/Append")
    channel.close()
    json_channel.close()


def test_one_gateway_url_serves_all_three_services(monkeypatch):
    monkeypatch.setenv("CIPHERFEED_TARGET", "https://gw.example:8443")
    monkeypatch.delenv("CIPHERFEED_KEYSERVICE_TARGET", raising=False)
    monkeypatch.delenv("CIPHERFEED_LEDGER_TARGET", raising=False)
    config = ClientConfig.from_env()
    assert config.keyservice_target == config.ledger_target == "https://gw.example:8443"
    monkeypatch.setenv("CIPHERFEED_TARGET", "127.0.0.1:50051")
    assert ClientConfig.from_env().keyservice_target == "127.0.0.1:50052"


def test_the_same_private_feed_over_grpc_and_through_envoy_json(mesh, envoy, tmp_path):
    """JSON bodies through the reference transcoder (Envoy takes no binary bodies): same keys,
    same history, the same feed and decrypted scores; every receipt verifies on both paths."""
    with RecommenderClient(grpc_config(mesh, tmp_path / "device")) as direct:
        direct.use_keys()
        direct.register()
        feeds_direct = [private_feed(direct, history(s)) for s in range(2)]
        verify_all(mesh, direct, [scored for _, scored in feeds_direct])
    # The same device (keys, owner account, manifest cache) through the HTTP transport.
    with RecommenderClient(http_config(envoy.url, tmp_path / "device"), http_encoding="json") as http:
        http.use_keys()
        http.register()  # idempotent: the same key id
        assert http.key_id == direct.key_id
        http.sign_in()  # a SIWE session through the transcoder; later owner requests carry it
        feeds_http = [private_feed(http, history(s)) for s in range(2)]
        for (feed_a, scored_a), (feed_b, scored_b) in zip(feeds_direct, feeds_http, strict=True):
            assert feed_a == feed_b
            assert np.max(np.abs(scored_a.scores - scored_b.scores)) < 1e-4
            assert scored_a.model_version == scored_b.model_version
        verify_all(mesh, http, [scored for _, scored in feeds_http])
        audit = http.audit()  # a GET whose owner authorization travels as query parameters
        assert audit and all(entry.subject == http.key_id for entry in audit)


@pytest.mark.parametrize("encoding", ["binary", "json"])
def test_the_same_private_feed_over_grpc_and_through_the_gateway(mesh, gateway, tmp_path, encoding):
    """Binary protobuf bodies (the default) and JSON through our gateway: the same feeds and
    scores as over gRPC, receipts that verify through the gateway's ledger routes."""
    with RecommenderClient(grpc_config(mesh, tmp_path / "device")) as direct:
        direct.use_keys()
        direct.register()
        feeds_direct = [private_feed(direct, history(10 + s)) for s in range(2)]
    shutil.rmtree(tmp_path / "device" / "manifests")  # fetched again, through the gateway
    with RecommenderClient(http_config(gateway, tmp_path / "device"), http_encoding=encoding) as http:
        http.wait_ready(timeout=30)  # the gateway's /readyz: its upstreams serve
        http.use_keys()
        http.register()
        assert http.key_id == direct.key_id
        http.sign_in()
        feeds_http = [private_feed(http, history(10 + s)) for s in range(2)]
        for (feed_a, scored_a), (feed_b, scored_b) in zip(feeds_direct, feeds_http, strict=True):
            assert feed_a == feed_b
            assert np.max(np.abs(scored_a.scores - scored_b.scores)) < 1e-4
        verify_all(mesh, http, [scored for _, scored in feeds_http])
        assert http.audit()
        assert http.manifest_downloads == 1


def test_refusals_over_http_read_like_grpc_ones(mesh, envoy, tmp_path):
    with RecommenderClient(http_config(envoy.url, tmp_path / "device"), http_encoding="json") as http:
        http.use_keys()
        with pytest.raises(grpc.RpcError) as refused:
            http.score_profile("cfp-nonexistent", query_sha256=b"\0" * 32)
        assert isinstance(refused.value, HttpRpcError) and refused.value.http_status == 404
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert reason_of(refused.value) == Reason.PROFILE_NOT_FOUND  # the ErrorInfo crossed the HTTP hop
    dead = dataclasses.replace(http_config("http://127.0.0.1:9", tmp_path / "d2"), deadline_seconds=5)
    with RecommenderClient(dead) as unreachable, pytest.raises(grpc.RpcError) as down:
        unreachable.model_info()
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
