"""The HTTP gateway against the real mesh on loopback: a gateway process (its own ``gateway``
identity over mutual TLS) in front of the key service, the recommender and a ledger.

Every route is reached; JSON and protobuf bodies give the same answers as direct gRPC; each
error class has its HTTP status and a google.rpc.Status body; bodies over the limit get 413
before they are read; an upstream that goes away gives 503 and the gateway serves again once it
is back; Sign-In with Ethereum works from a browser's point of view (CORS, JSON, bearer tokens).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import socket
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from google.protobuf import json_format

from cipherfeed import ownerauth, policy, siwe
from cipherfeed.client.sdk import encrypt_history
from cipherfeed.config import GatewayConfig
from cipherfeed.devprocess import start_service
from cipherfeed.v1 import common_pb2, keyservice_pb2, ledger_pb2, ledger_pb2_grpc, recommender_pb2
from gateway.routes import build_routes, parse_template
from services.keyservice.server import serve as serve_keyservice
from services.ledger.server import serve as serve_ledger
from services.ledger.signers import LocalSigner
from tests.conftest import TEST_LIMITS, keyservice_config, mesh_pki
from tests.test_ledger import ORIGIN, ledger_config

PROTOBUF = "application/x-protobuf"
BROWSER_ORIGIN = "http://explorer.test:8000"
MAX_BODY = 24 * 1024 * 1024
KS = "cipherfeed.v1.KeyService"
RC = "cipherfeed.v1.Recommender"


def start_gateway(
    recommender: int, keyservice: int, ledger: int, log_path: Path | None = None, **overrides
) -> tuple[subprocess.Popen, int]:
    """A gateway process as ``cipherfeed serve gateway`` runs it, on an ephemeral port (its log
    to ``log_path`` when given)."""
    config = GatewayConfig(
        port=0,
        recommender_target=f"127.0.0.1:{recommender}",
        keyservice_target=f"127.0.0.1:{keyservice}",
        ledger_target=f"127.0.0.1:{ledger}",
        limits=TEST_LIMITS,
        tls=mesh_pki().tls("gateway"),
        **overrides,
    )
    proc = start_service("gateway", config.to_env(), log_path=log_path)
    for conn in psutil.Process(proc.pid).net_connections(kind="tcp"):  # it printed that it listens
        if conn.status == psutil.CONN_LISTEN:
            return proc, int(conn.laddr.port)
    stop(proc)
    raise AssertionError("the gateway listens on no port")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclasses.dataclass
class Mesh:
    http: httpx.Client
    port: int
    ledger_core: object
    receipt_ids: list[str]
    tree_size: int
    ledger_port: int


@pytest.fixture(scope="module")
def mesh(recommender, keyservice, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway-ledger")
    ledger, ledger_core = serve_ledger(ledger_config(tmp), signer=LocalSigner(ORIGIN), background_anchoring=False)
    with mesh_pki().channel(ledger.port, "ledger", "recommender") as ch:
        stub = ledger_pb2_grpc.LedgerStub(ch)
        receipt_ids = []
        for i in range(3):
            receipt = ledger_pb2.Receipt(
                query_sha256=hashlib.sha256(b"q%d" % i).hexdigest(),
                response_sha256=hashlib.sha256(b"r%d" % i).hexdigest(),
                model_version="0" * 64,
                key_id="1" * 64,
                unix_millis=1_700_000_000_000 + i,
                key_version=1,
            )
            receipt_ids.append(stub.Append(ledger_pb2.AppendRequest(receipt=receipt), timeout=30).receipt_id)
    checkpoint = ledger_core.log.checkpoint()
    assert checkpoint is not None
    proc, port = start_gateway(
        recommender[0], keyservice[0], ledger.port, max_body_bytes=MAX_BODY, cors_origins=(BROWSER_ORIGIN,)
    )
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    try:
        yield Mesh(http, port, ledger_core, receipt_ids, 3, ledger.port)
    finally:
        http.close()
        stop(proc)
        ledger.stop(grace=0)
        ledger_core.close()


def sign_in(http: httpx.Client, account, headers: dict | None = None) -> str:
    """Sign-In with Ethereum as a browser does it: JSON in and out, the signature as base64."""
    challenge = http.post("/v1/signin:nonce", json={}, headers=headers or {})
    assert challenge.status_code == 200, challenge.text
    c = challenge.json()
    now = datetime.now(timezone.utc)
    text = siwe.SiweMessage(
        domain=c["domain"],
        address=account.address,
        statement="Sign in to cipherfeed.",
        uri=c["uri"],
        chain_id=int(c["chainId"]),
        nonce=c["nonce"],
        issued_at=siwe.format_time(now),
        expiration_time=siwe.format_time(now + timedelta(minutes=10)),
    ).text()
    signature = bytes(account.sign_message(encode_defunct(text=text)).signature)
    session = http.post(
        "/v1/signin", json={"message": text, "signature": base64.b64encode(signature).decode()}, headers=headers or {}
    )
    assert session.status_code == 200, session.text
    body = session.json()
    assert body["address"] == account.address
    return body["token"]


@pytest.fixture(scope="module")
def token(mesh, client) -> str:
    return sign_in(mesh.http, client.account)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_status(response: httpx.Response, http: int, reason: str) -> dict:
    assert response.status_code == http, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["code"], int) and body["code"] != 0 and body["message"]
    info = body["details"][0]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert info["reason"] == reason and info["domain"] == "cipherfeed.dev"
    return body


@pytest.fixture(scope="module")
def query(client) -> bytes:
    u = np.random.default_rng(7).normal(size=client.params().embedding_dim)
    return client.encrypt_query(u / np.linalg.norm(u))


def score_json(client, query: bytes, **extra) -> dict:
    return {
        "key": {"keyId": client.key_id, "version": client.key_version},
        "queryCiphertext": b64(query),
        **extra,
    }


# --- the route table ----------------------------------------------------------------------


def test_routes_are_the_annotations_the_gateway_identity_may_call():
    from google.api import annotations_pb2

    from cipherfeed.v1 import keyservice_pb2 as ks
    from cipherfeed.v1 import ledger_pb2 as lg
    from cipherfeed.v1 import recommender_pb2 as rc

    annotated, allowed = set(), set()
    for module in (ks, lg, rc):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if method.GetOptions().HasExtension(annotations_pb2.http):
                    name = f"/{service.full_name}/{method.name}"
                    annotated.add(name)
                    if policy.allowed(name, policy.GATEWAY):
                        allowed.add(name)
    routes = {r.grpc_path for r in build_routes()}
    assert routes == allowed
    # internal RPCs are annotated or not, but never routed
    assert {f"/{KS}/GetEvalKeys", f"/{KS}/Sign", f"/{KS}/RotateSigningKey"} <= annotated - routes
    assert not any(r.endswith(("/Append", "/AppendBatch")) for r in routes)


def test_path_templates_follow_the_http_rule_grammar():
    t = parse_template("/v1/{name=shelves/*/books/**}:get")
    assert t.verb == "get" and t.match("/v1/shelves/s1/books/a/b:get") == {("name",): "shelves/s1/books/a/b"}
    assert t.match("/v1/shelves/s1/books/a/b") is None
    t = parse_template("/v1/keys/{key_id}:rotate")
    assert t.match("/v1/keys/ab%2Fcd:rotate") == {("key_id",): "ab/cd"}  # an encoded '/' stays in the value
    assert t.match("/v1/keys/a/b:rotate") is None
    for bad in ("v1/x", "/v1/{a", "/v1/{a}b", "/v1/{1a}", "/v1/x:", "/v1/a b"):
        with pytest.raises(ValueError):
            parse_template(bad)


# --- every route --------------------------------------------------------------------------


def test_every_route_is_reachable(mesh, client, token, query, tiktok_model):
    http = mesh.http
    h = bearer(token)
    key_id = client.key_id
    ok: dict[str, httpx.Response] = {
        f"/{RC}/GetParams": http.get("/v1/params"),
        f"/{RC}/GetModelInfo": http.get("/v1/model"),
        f"/{RC}/GetCatalogueManifest": http.get("/v1/catalogue/manifest"),
        f"/{RC}/GetItems": http.post("/v1/items:batchGet", json={"indices": [0, 1]}),
        f"/{RC}/Score": http.post("/v1/score", json=score_json(client, query), headers=h),
        f"/{RC}/UploadProfile": http.post(
            "/v1/profiles", json={"key": {"keyId": key_id}, "queryCiphertext": b64(query)}, headers=h
        ),
        f"/{KS}/GetKey": http.get(f"/v1/keys/{key_id}"),
        f"/{KS}/GetPublicKeys": http.get("/v1/signing/keys"),
        f"/{KS}/ListAudit": http.get("/v1/audit", params={"keyId": key_id, "limit": 5}, headers=h),
        f"/{KS}/GetSignInNonce": http.post("/v1/signin:nonce", json={}),
        "/cipherfeed.v1.Ledger/GetCheckpoint": http.get("/v1/log/checkpoint"),
        "/cipherfeed.v1.Ledger/GetInclusionProof": http.get("/v1/log/inclusion/1", params={"treeSize": 3}),
        "/cipherfeed.v1.Ledger/GetConsistencyProof": http.get(
            "/v1/log/consistency", params={"firstSize": 1, "secondSize": 3}
        ),
        "/cipherfeed.v1.Ledger/GetAnchors": http.get("/v1/log/anchors"),
        "/cipherfeed.v1.Ledger/GetReceipt": http.get(f"/v1/receipts/{mesh.receipt_ids[1]}"),
        "/cipherfeed.v1.Ledger/GetEntries": http.get("/v1/log/entries", params={"startIndex": 0, "count": 2}),
    }
    for name, response in ok.items():
        assert response.status_code == 200, (name, response.text[:300])
        assert response.headers["content-type"] == "application/json"
    weights = np.zeros(len(tiktok_model.item_ids))
    weights[[3, 5]] = 0.5
    history = encrypt_history(client._require_keys(), weights)
    ok[f"/{RC}/UploadHistory"] = r = http.post(
        "/v1/histories",
        json={
            "key": {"keyId": key_id},
            "historyCiphertexts": [b64(c) for c in history],
            "modelVersion": tiktok_model.version,
        },
        headers=h,
    )
    assert r.status_code == 200, r.text[:300]
    assert r.json()["profileRef"]
    # SignIn: reached by the token fixture. Key lifecycle on a key of its own (it ends destroyed):
    ok[f"/{KS}/SignIn"] = http.post("/v1/signin", json={"message": "x", "signature": ""})
    assert ok[f"/{KS}/SignIn"].status_code == 400
    # Routes whose success needs a key of its own are reached with the key they act on
    # missing, which the key service answers (not the gateway's router).
    missing = "0" * 64
    for name, path in (
        (f"/{KS}/RegisterKey", "/v1/keys"),
        (f"/{KS}/RotateKey", f"/v1/keys/{missing}:rotate"),
        (f"/{KS}/DisableKey", f"/v1/keys/{missing}:disable"),
        (f"/{KS}/EnableKey", f"/v1/keys/{missing}:enable"),
        (f"/{KS}/DestroyKey", f"/v1/keys/{missing}:destroy"),
    ):
        ok[name] = r = http.post(path, json={}, headers=h)
        assert r.status_code in (400, 401, 403, 404), (name, r.text)
        assert r.json()["details"][0]["reason"] != "ROUTE_NOT_FOUND"
    assert set(ok) == {r.grpc_path for r in build_routes()}


def test_key_lifecycle_through_the_gateway(mesh, client):
    """A second device registers fresh keys (a binary body, ~11 MB) and disables, enables and
    destroys them with JSON calls, each authorized by its owner's session alone."""
    from cipherfeed.client import keystore

    http = mesh.http
    owner = Account.create()
    keys = keystore.generate(client.params())
    key_id = hashlib.sha256(keys.public_key_bytes).hexdigest()
    register = keyservice_pb2.RegisterKeyRequest(
        public_key=keys.public_key_bytes, rotation_key_map=keys.rotation_key_bytes, owner=owner.address
    )
    ownerauth.sign_request(owner, client.config.chain_id, f"{KS}/RegisterKey", key_id, register)
    r = http.post(
        "/v1/keys", content=register.SerializeToString(), headers={"Content-Type": PROTOBUF, "Accept": PROTOBUF}
    )
    assert r.status_code == 200 and r.headers["content-type"] == PROTOBUF
    record = keyservice_pb2.KeyRecord.FromString(r.content)
    assert record.key.key_id == key_id and record.owner == owner.address
    # the same signed request again is a replay, refused as a binary google.rpc.Status
    r = http.post("/v1/keys", content=register.SerializeToString(), headers={"Content-Type": PROTOBUF})
    assert r.status_code == 401 and r.headers["content-type"] == PROTOBUF
    from google.rpc import status_pb2

    assert status_pb2.Status.FromString(r.content).code == 16
    token = bearer(sign_in(http, owner))
    for action, state in (("disable", "DISABLED"), ("enable", "ENABLED"), ("destroy", "DESTROYED")):
        r = http.post(f"/v1/keys/{key_id}:{action}", json={}, headers=token)
        assert r.status_code == 200, r.text
        assert r.json()["state"] == state
    assert http.get(f"/v1/keys/{key_id}").json()["state"] == "DESTROYED"


# --- JSON and binary ----------------------------------------------------------------------


def _decode(response: httpx.Response, message_type):
    assert response.status_code == 200, response.text[:300]
    if response.headers["content-type"] == PROTOBUF:
        return message_type.FromString(response.content)
    return json_format.Parse(response.text, message_type())


@pytest.mark.parametrize(
    ("path", "message_type"),
    [
        ("/v1/params", recommender_pb2.GetParamsResponse),
        ("/v1/model", common_pb2.ModelVersion),
        ("/v1/catalogue/manifest", recommender_pb2.CatalogueManifest),
        ("/v1/signing/keys", keyservice_pb2.GetPublicKeysResponse),
        ("/v1/log/checkpoint", ledger_pb2.Checkpoint),
        ("/v1/log/inclusion/2?treeSize=3", ledger_pb2.InclusionProof),
    ],
)
def test_json_and_binary_answers_are_identical(mesh, path, message_type):
    as_json = _decode(mesh.http.get(path), message_type)
    as_binary = _decode(mesh.http.get(path, headers={"Accept": PROTOBUF}), message_type)
    assert as_json == as_binary and as_json.ByteSize() > 0


def test_json_and_binary_bodies_give_the_answer_direct_grpc_gives(mesh, client, token, query):
    request = recommender_pb2.ScoreRequest(
        key={"key_id": client.key_id, "version": client.key_version}, query_ciphertext=query
    )
    request.auth.session_token = token
    direct = client.stub.Score(request, timeout=60)
    binary = _decode(
        mesh.http.post(
            "/v1/score",
            content=request.SerializeToString(),
            headers={"Content-Type": PROTOBUF, "Accept": PROTOBUF},
        ),
        recommender_pb2.ScoreResponse,
    )
    as_json = _decode(
        mesh.http.post("/v1/score", json=score_json(client, query), headers=bearer(token)),
        recommender_pb2.ScoreResponse,
    )
    for answer in (direct, binary, as_json):
        answer.ClearField("server_millis")
        answer.ClearField("from_cache")
    assert direct == binary == as_json
    assert len(direct.score_ciphertexts) > 0 and direct.query_sha256 == hashlib.sha256(query).digest()
    # original proto names are accepted on input as well as lowerCamelCase
    items = {"item_ids": [], "indices": [4, 2]}
    a = mesh.http.post("/v1/items:batchGet", json=items)
    b = mesh.http.post(
        "/v1/items:batchGet", content=json.dumps({"indices": [4, 2]}), headers={"Content-Type": "application/json"}
    )
    c = mesh.http.post(
        "/v1/items:batchGet",
        content=recommender_pb2.GetItemsRequest(indices=[4, 2]).SerializeToString(),
        headers={"Content-Type": PROTOBUF},
    )
    assert a.json() == b.json() and recommender_pb2.GetItemsResponse.FromString(c.content) == json_format.Parse(
        a.text, recommender_pb2.GetItemsResponse()
    )
    assert [i["index"] for i in a.json()["items"]] == [4, 2]


# --- errors -------------------------------------------------------------------------------


def test_each_error_class_has_its_http_status(mesh, client, token, query, tiktok_model):
    http, h = mesh.http, bearer(token)
    # 400 INVALID_ARGUMENT: the recommender refuses a ciphertext that is none
    body = assert_status(
        http.post("/v1/score", json=score_json(client, b"\x00" * 64), headers=h), 400, "HE_MATERIAL_INVALID"
    )
    assert body["code"] == 3
    # 400 FAILED_PRECONDITION: another model is pinned
    body = assert_status(
        http.post("/v1/score", json=score_json(client, query, modelVersion="f" * 64), headers=h), 400, "MODEL_MISMATCH"
    )
    assert body["code"] == 9
    # 404 NOT_FOUND
    assert assert_status(http.get(f"/v1/keys/{'0' * 64}"), 404, "KEY_NOT_FOUND")["code"] == 5
    # 401 UNAUTHENTICATED: no owner proof; a malformed Authorization header
    r = http.post("/v1/score", json=score_json(client, query))
    assert assert_status(r, 401, "OWNER_AUTH_REQUIRED")["code"] == 16 and r.headers["www-authenticate"] == "Bearer"
    assert_status(http.post("/v1/score", json=score_json(client, query), headers={"Authorization": "Basic x"}), 401,
                  "OWNER_AUTH_INVALID")  # fmt: skip
    assert_status(http.post("/v1/score", json=score_json(client, query), headers=bearer("cfs1.x.y")), 401,
                  "OWNER_AUTH_INVALID")  # fmt: skip
    # 403 PERMISSION_DENIED: a valid session of an account that does not own the key
    stranger = sign_in(http, Account.create())
    r = http.post(f"/v1/keys/{client.key_id}:disable", json={}, headers=bearer(stranger))
    assert assert_status(r, 403, "NOT_KEY_OWNER")["code"] == 7
    # 409 ALREADY_EXISTS: the device's key material registered by another owner (binary, ~11 MB)
    other = Account.create()
    keys = client._require_keys()
    register = keyservice_pb2.RegisterKeyRequest(
        public_key=keys.public_key_bytes, rotation_key_map=keys.rotation_key_bytes, owner=other.address
    )
    ownerauth.sign_request(other, client.config.chain_id, f"{KS}/RegisterKey", client.key_id, register)
    binary_in_json_out = {"Content-Type": PROTOBUF, "Accept": "application/json"}
    r = http.post("/v1/keys", content=register.SerializeToString(), headers=binary_in_json_out)
    assert assert_status(r, 409, "KEY_MATERIAL_CONFLICT")["code"] == 6
    # 429 RESOURCE_EXHAUSTED: a query over the recommender's size limit
    big = recommender_pb2.ScoreRequest(
        key={"key_id": client.key_id}, query_ciphertext=bytes(TEST_LIMITS.max_query_bytes + 1)
    )
    r = http.post("/v1/score", content=big.SerializeToString(), headers={**binary_in_json_out, **h})
    assert assert_status(r, 429, "SIZE_LIMIT")["code"] == 8
    # 504 DEADLINE_EXCEEDED: a deadline the call cannot meet
    r = http.post("/v1/score", json=score_json(client, query), headers={**h, "grpc-timeout": "1n"})
    assert assert_status(r, 504, "DEPENDENCY_UNAVAILABLE")["code"] == 4
    # the gateway's own refusals, in the same shape
    assert_status(http.get("/v1/nowhere"), 404, "ROUTE_NOT_FOUND")
    assert_status(http.get("/v1/no%0Awhere"), 404, "ROUTE_NOT_FOUND")  # not Starlette's text 404 (schemathesis)
    r = http.get("/v1/score")
    assert assert_status(r, 405, "ROUTE_NOT_FOUND")["code"] == 12 and r.headers["allow"] == "POST"
    assert_status(http.post("/v1/score", content=b"a=b", headers={"Content-Type": "application/x-www-form-urlencoded"}),
                  415, "FIELD_INVALID")  # fmt: skip
    assert_status(http.post("/v1/score", content=b"{}", headers=h), 415, "FIELD_INVALID")  # a body with no type
    for bad in (b"{", b"[]", b'{"nope": 1}', b'{"key": {"keyId": 5}}', b"\xff\xfe", b'{"key": {}, "key": {}}'):
        assert_status(http.post("/v1/score", content=bad, headers={**h, "Content-Type": "application/json"}), 400,
                      "FIELD_INVALID")  # fmt: skip
    assert_status(http.post("/v1/score", content=b"\xff\xff\xff", headers=binary_in_json_out), 400, "FIELD_INVALID")
    assert_status(http.get("/v1/log/inclusion/abc"), 400, "FIELD_INVALID")
    assert_status(http.get("/v1/log/consistency", params={"bogus": 1}), 400, "FIELD_INVALID")
    assert_status(http.get("/v1/log/consistency", params=[("firstSize", 1), ("firstSize", 2)]), 400, "FIELD_INVALID")
    assert_status(http.get("/v1/keys/%ff"), 400, "FIELD_INVALID")
    assert_status(http.post("/v1/score?keyId=x", json={}, headers=h), 400, "FIELD_INVALID")
    assert_status(http.post("/v1/score", json=score_json(client, query), headers={**h, "grpc-timeout": "soon"}), 400,
                  "FIELD_INVALID")  # fmt: skip


def test_oversize_bodies_get_413_before_they_are_read(mesh):
    # A declared length over the limit: answered at once, without one byte of the body sent.
    with socket.create_connection(("127.0.0.1", mesh.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
        )
        data = b""
        while b"SIZE_LIMIT" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head = data.decode("latin-1")
    assert head.startswith("HTTP/1.1 413 "), head[:200]
    assert '"SIZE_LIMIT"' in head
    # No declared length (chunked): refused once the limit is passed (the rest is never kept).
    chunks = (b" " * (1 << 20) for _ in range(MAX_BODY // (1 << 20) + 2))
    try:
        r = mesh.http.post("/v1/keys", content=chunks, headers={"Content-Type": "application/json"})
        assert_status(r, 413, "SIZE_LIMIT")
    except httpx.WriteError:  # the server answered and closed while we were still sending
        pass
    # The gateway still serves.
    assert mesh.http.get("/v1/params").status_code == 200


# --- health, readiness, metrics, CORS, OpenAPI --------------------------------------------


def test_health_readiness_and_metrics(mesh):
    assert mesh.http.get("/healthz").json() == {"status": "ok"}
    ready = mesh.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "upstreams": {"recommender": "SERVING", "keyservice": "SERVING", "ledger": "SERVING"},
    }
    mesh.http.get("/v1/params")
    mesh.http.get("/v1/nowhere")
    text = mesh.http.get("/metrics").text
    assert 'cipherfeed_gateway_requests_total{grpc_code="OK",route="GET /v1/params",status="200"}' in text
    assert 'route="unmatched",status="404"' in text
    assert 'cipherfeed_gateway_request_duration_seconds_count{route="GET /v1/params"}' in text
    assert 'cipherfeed_gateway_response_bytes_bucket{le="1024.0",route="GET /v1/model"}' in text or (
        "cipherfeed_gateway_response_bytes_bucket" in text
    )
    assert "/v1/nowhere" not in text  # raw paths never become labels


def test_cors_lets_the_configured_origin_sign_in_and_no_other(mesh, client):
    preflight = {
        "Origin": BROWSER_ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization",
    }
    r = mesh.http.options("/v1/signin:nonce", headers=preflight)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == BROWSER_ORIGIN
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in r.headers
    r = mesh.http.options("/v1/signin:nonce", headers={**preflight, "Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in r.headers
    # the whole sign-in, as the page's fetch() calls make it
    token = sign_in(mesh.http, client.account, headers={"Origin": BROWSER_ORIGIN})
    r = mesh.http.get("/v1/audit", params={"keyId": client.key_id}, headers={**bearer(token), "Origin": BROWSER_ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == BROWSER_ORIGIN
    assert any(e["action"] == "key.register" for e in r.json()["entries"])
    r = mesh.http.get("/v1/params", headers={"Origin": "http://evil.test"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_the_served_openapi_document_is_valid_and_lists_every_route(mesh):
    from openapi_spec_validator import validate

    doc = mesh.http.get("/openapi.json").json()
    validate(doc)
    served = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert served == {(r.http_method, r.template.openapi_path) for r in build_routes()}
    score = doc["paths"]["/v1/score"]["post"]
    assert score["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/cipherfeed.v1.ScoreRequest"
    }
    props = doc["components"]["schemas"]["cipherfeed.v1.ScoreRequest"]["properties"]
    assert props["queryCiphertext"] == {"type": "string", "format": "byte"}
    assert doc["components"]["schemas"]["cipherfeed.v1.KeyRecord"]["properties"]["createdUnix"]["type"] == "string"


def test_requests_past_the_receiving_limit_get_503_and_retry_after(mesh, recommender, keyservice):
    # (the upstream limit, max_concurrency: tests/test_gateway_hardening.py)
    proc, port = start_gateway(recommender[0], keyservice[0], mesh.ledger_port, max_receiving=1)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as held:
            # one request in progress: its body has not arrived yet
            held.sendall(
                b"POST /v1/signin:nonce HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 8\r\n\r\n"
            )
            gauge = "cipherfeed_gateway_requests_receiving 1.0"
            probes = 0
            while gauge not in http.get("/metrics").text:  # the gauge is the condition, not a timer
                probes += 1
                assert probes < 10_000, "the held request never reached the gateway"
            assert http.get("/v1/params").status_code == 200  # no body: needs no receiving slot
            r = http.post("/v1/signin:nonce", json={})
            assert assert_status(r, 503, "RETRY")["code"] == 14 and r.headers["retry-after"] == "1"
            held.sendall(b"{}      ")
            reply = b""
            while b"\r\n\r\n" not in reply:
                reply += held.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200 ")
        assert http.get("/v1/params").status_code == 200
    finally:
        http.close()
        stop(proc)


# --- an upstream that goes away -----------------------------------------------------------


def test_upstream_down_gives_503_and_the_gateway_recovers(mesh, recommender, master_key_file, tmp_path):
    config = keyservice_config(tmp_path / "ks", master_key_file, None)
    running, core = serve_keyservice(config)
    port = running.port
    proc, gw_port = start_gateway(recommender[0], port, mesh.ledger_port)
    http = httpx.Client(base_url=f"http://127.0.0.1:{gw_port}", timeout=90)
    try:
        assert http.get("/v1/signing/keys").status_code == 200
        assert http.get("/readyz").status_code == 200
        running.stop(grace=0)
        core.close()
        r = http.get("/v1/signing/keys")
        body = assert_status(r, 503, "DEPENDENCY_UNAVAILABLE")
        assert body["details"][0]["metadata"] == {"dependency": "keyservice"}
        assert "127.0.0.1" not in body["message"]  # transport details stay inside
        r = http.get("/readyz")
        assert r.status_code == 503 and r.json()["upstreams"]["keyservice"] != "SERVING"
        assert r.json()["upstreams"]["recommender"] == "SERVING"
        running, core = serve_keyservice(dataclasses.replace(config, listen=f"127.0.0.1:{port}"))
        # /readyz?wait=S waits (gRPC wait-for-ready) until each upstream answers or S pass
        r = http.get("/readyz", params={"wait": 60})
        assert r.status_code == 200, r.text
        assert http.get("/v1/signing/keys").status_code == 200
    finally:
        http.close()
        stop(proc)
        running.stop(grace=0)
        core.close()


def test_gateway_refuses_a_bad_configuration(tmp_path: Path):
    env = GatewayConfig(tls=mesh_pki().tls("gateway")).to_env()
    env["CIPHERFEED_GATEWAY_CORS_ORIGINS"] = "*"
    with pytest.raises(RuntimeError, match="not allowed"):
        start_service("gateway", env)
