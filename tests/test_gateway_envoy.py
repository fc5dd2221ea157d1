"""The gateway against the reference transcoder (issue 12, deliverable 2): Envoy's gRPC-JSON
transcoder (tests/envoy_reference.py) and our gateway, both in front of the same key service,
ledger and recommender on loopback, both calling them as the ``gateway`` identity over mutual TLS.
Every HTTP route, success and error, goes to both; the HTTP status and the parsed JSON must be
the same.

Deliberate differences, each asserted below rather than skipped:

* Errors the transcoder raises itself (malformed JSON, a value that does not parse as its field's
  type, an unknown query parameter, a path no rule maps) are ``text/plain`` from Envoy and a
  ``google.rpc.Status`` JSON body from the gateway (the contract: every error is a Status). Same
  HTTP status; the gateway's Status code is the one that status maps from.
* Methods the policy does not let the ``gateway`` identity call (``GetEvalKeys``, ``Sign``,
  ``RotateSigningKey``) have HTTP rules but are not exposed by the gateway: 404 there, never sent
  upstream. Envoy transcodes whole services, so it forwards them and the mesh refuses the gateway
  identity: 403 ``CALLER_NOT_ALLOWED``. Both deny; the test checks each side's own answer.
* A known path with a verb its rule does not name is 404 from Envoy (its transcoder matches verb
  and path together) and 405 with ``Allow`` from the gateway (RFC 9110's answer).
* A JSON body with a field the request type does not have: Envoy ignores the field; the gateway
  refuses it (400 ``FIELD_INVALID``), as the proto3 JSON mapping's parsers do by default, so a
  typo such as ``modelVersoin`` cannot silently drop a model pin. Envoy has no option to refuse.
* A query parameter on a ``body: "*"`` route: Envoy accepts it; the gateway refuses it (400), since
  such a rule leaves no field for the query string to bind (the same strictness Envoy is
  configured with for unknown parameters on GET routes).
* Fields that say when or how fast (``serverMillis``, ``fromCache``, a receipt's time and id,
  fresh nonces and profile references) differ between any two calls, so they are compared by
  presence, not value.
* Headers are not compared (Envoy adds ``server``/``x-envoy-*``; the gateway sets its own
  ``cache-control`` and ``x-content-type-options``); only ``content-type`` is checked.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from eth_account import Account

from cipherfeed.client.interest import Engagement
from cipherfeed.client.sdk import RecommenderClient
from cipherfeed.config import ClientConfig
from services.recommender.synthetic import synthetic_catalogue
from tests.conftest import TEST_LIMITS, mesh_pki
from tests.envoy_reference import start_envoy, start_gateway, start_mesh

ITEMS = 1000
ZERO_ID = "0" * 64
# JSON fields whose values differ between any two calls by construction (see the docstring).
VOLATILE = frozenset(
    {"serverMillis", "fromCache", "receiptId", "receiptUnixMillis", "profileRef", "expiresUnix", "nonce"}
)
NO_ROUTE, BAD = "ROUTE_NOT_FOUND", "FIELD_INVALID"
HTTP_FOR_CODE = {3: 400, 5: 404, 7: 403, 9: 400, 16: 401, 12: 501}


@dataclass
class Case:
    name: str
    method: str
    path: str
    body: Any = None  # JSON-serialisable, or bytes sent as they are
    status: int = 200  # what both must answer (Envoy's answer where they differ deliberately)
    gateway_status: int | None = None  # a deliberate difference: the gateway's own answer...
    gateway_reason: str = ""  # ...and the ErrorInfo reason of its Status
    headers: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def mesh(master_key_file, redis_server, tmp_path_factory):
    model = synthetic_catalogue(ITEMS, seed=5)
    running = start_mesh(tmp_path_factory.mktemp("envoy-mesh"), master_key_file, model, redis_server)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def envoy(mesh, tmp_path_factory):
    proxy = start_envoy(tmp_path_factory.mktemp("envoy"), mesh.ports, mesh_pki().tls("gateway"))
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def gateway(mesh):
    running = start_gateway(mesh)
    yield running.url
    running.stop()


@dataclass
class World:
    """What the cases refer to: a registered key, its owner's session, a stranger's session, an
    uploaded history, a receipt in a checkpoint."""

    key_id: str
    owner_session: str
    stranger_session: str
    profile_ref: str
    receipt_id: str
    tree_size: int
    public_key: str
    rotation_keys: str
    owner: str


@pytest.fixture(scope="module")
def world(mesh, tmp_path_factory) -> World:
    p = mesh.ports
    config = ClientConfig(
        target=f"127.0.0.1:{p['recommender']}",
        keyservice_target=f"127.0.0.1:{p['keyservice']}",
        ledger_target=f"127.0.0.1:{p['ledger']}",
        deadline_seconds=60,
        home=tmp_path_factory.mktemp("envoy-device"),
        limits=TEST_LIMITS,
        tls=mesh_pki().tls("device"),
    )
    with RecommenderClient(config) as client:
        client.use_keys()
        client.register()
        owner_session = client.sign_in()
        _, scored = client.recommend([Engagement("syn5-3"), Engagement("syn5-7", liked=True)], k=5)
        assert client._history is not None
        profile_ref = client._history[1]
        assert client.keys is not None and client.account is not None
        keys, owner = client.keys, client.account.address
        stranger = RecommenderClient(config)
        stranger.account = Account.create()
        stranger_session = stranger.sign_in()
        stranger.close()
        key_id = client.key_id
    mesh.cores["recommender"].receipts.flush(timeout=30)
    checkpoint = mesh.cores["ledger"].log.checkpoint()
    assert checkpoint is not None
    mesh.cores["ledger"].anchorer.anchor_pending()
    return World(
        key_id=key_id or "",
        owner_session=owner_session,
        stranger_session=stranger_session,
        profile_ref=profile_ref,
        receipt_id=scored.receipt_id,
        tree_size=checkpoint.size,
        public_key=base64.b64encode(keys.public_key_bytes).decode(),
        rotation_keys=base64.b64encode(keys.rotation_key_bytes).decode(),
        owner=owner,
    )


def cases(w: World) -> list[Case]:
    k = w.key_id
    owner = {"sessionToken": w.owner_session}
    stranger = {"sessionToken": w.stranger_session}
    key = {"keyId": k}
    register = {"publicKey": w.public_key, "rotationKeyMap": w.rotation_keys, "owner": w.owner, "auth": owner}
    return [
        # Recommender
        Case("params", "GET", "/v1/params"),
        Case("model", "GET", "/v1/model"),
        Case("manifest", "GET", "/v1/catalogue/manifest"),
        Case("manifest, other model", "GET", "/v1/catalogue/manifest?model_version=beef", status=400),
        Case("items by index and id", "POST", "/v1/items:batchGet", {"indices": [1, 2], "itemIds": ["syn5-9"]}),
        Case("items, proto field names", "POST", "/v1/items:batchGet", {"item_ids": ["syn5-9"]}),
        Case("items, no such index", "POST", "/v1/items:batchGet", {"indices": [ITEMS + 5]}, status=404),
        Case("items, no such id", "POST", "/v1/items:batchGet", {"itemIds": ["nope"]}, status=404),
        Case("score, malformed key id", "POST", "/v1/score", {"key": {"keyId": "x"}, "queryCiphertext": "AAAA"}, 400),
        Case("score, no owner proof", "POST", "/v1/score", {"key": key, "profileRef": w.profile_ref}, status=401),
        Case(
            "score, a stranger", "POST", "/v1/score", {"key": key, "profileRef": w.profile_ref, "auth": stranger}, 403
        ),
        Case(
            "score, bad session",
            "POST",
            "/v1/score",
            {"key": key, "profileRef": "x", "auth": {"sessionToken": "cfs1.a.b"}},
            401,
        ),
        Case("score by profile", "POST", "/v1/score", {"key": key, "profileRef": w.profile_ref, "auth": owner}),
        Case("score, expired profile", "POST", "/v1/score", {"key": key, "profileRef": "cfp-gone", "auth": owner}, 404),
        Case(
            "score, not a ciphertext", "POST", "/v1/score", {"key": key, "queryCiphertext": "AAAA", "auth": owner}, 400
        ),
        Case(
            "upload profile, not a ciphertext",
            "POST",
            "/v1/profiles",
            {"key": key, "queryCiphertext": "AAAA", "auth": owner},
            400,
        ),
        Case("upload history, no blocks", "POST", "/v1/histories", {"key": key, "auth": owner}, status=400),
        Case("upload history, no proof", "POST", "/v1/histories", {"key": key, "historyCiphertexts": ["AAAA"]}, 401),
        # Key service
        Case("register again (idempotent)", "POST", "/v1/keys", register),
        Case("register, no owner", "POST", "/v1/keys", {"publicKey": w.public_key}, status=400),
        Case("register, a stranger's session", "POST", "/v1/keys", {**register, "auth": stranger}, status=403),
        Case("get key", "GET", f"/v1/keys/{k}"),
        Case("get key, version by json name", "GET", f"/v1/keys/{k}?version=1"),
        Case("get key, unknown", "GET", f"/v1/keys/{ZERO_ID}", status=404),
        Case("get key, malformed", "GET", "/v1/keys/abc", status=400),
        Case("eval keys: internal", "GET", f"/v1/keys/{k}/evalkeys", None, 403, 404, NO_ROUTE),
        Case("rotate, no proof", "POST", f"/v1/keys/{k}:rotate", {"publicKey": w.public_key}, status=401),
        Case("disable, a stranger", "POST", f"/v1/keys/{k}:disable", {"auth": stranger}, status=403),
        Case("destroy, no proof", "POST", f"/v1/keys/{k}:destroy", {}, status=401),
        Case("enable by the owner", "POST", f"/v1/keys/{k}:enable", {"auth": owner}),
        Case("enable, unknown key", "POST", f"/v1/keys/{ZERO_ID}:enable", {"auth": owner}, status=404),
        Case("sign: internal", "POST", "/v1/signing/ledger:sign", {"message": "AAAA"}, 403, 404, NO_ROUTE),
        Case("rotate signing key: internal", "POST", "/v1/signing/ledger:rotate", {}, 403, 404, NO_ROUTE),
        Case("public signing keys", "GET", "/v1/signing/keys"),
        Case("audit by the owner", "GET", f"/v1/audit?key_id={k}&auth.session_token={w.owner_session}"),
        Case("audit, no proof", "GET", f"/v1/audit?key_id={k}", status=401),
        Case("audit, whole log", "GET", "/v1/audit", status=400),
        Case("audit, malformed limit", "GET", f"/v1/audit?key_id={k}&limit=lots", status=400),
        Case("sign-in nonce", "POST", "/v1/signin:nonce", {}),
        Case("sign-in, garbage", "POST", "/v1/signin", {"message": "hello", "signature": "AAAA"}, status=401),
        # Ledger
        Case("checkpoint", "GET", "/v1/log/checkpoint"),
        Case("inclusion", "GET", f"/v1/log/inclusion/0?tree_size={w.tree_size}"),
        Case("inclusion, json names", "GET", f"/v1/log/inclusion/0?treeSize={w.tree_size}"),
        Case("inclusion, out of range", "GET", "/v1/log/inclusion/5?tree_size=3", status=400),
        Case("inclusion, not a number", "GET", "/v1/log/inclusion/x", status=400),
        Case("consistency", "GET", f"/v1/log/consistency?first_size=1&second_size={w.tree_size}"),
        Case("consistency, backwards", "GET", "/v1/log/consistency?first_size=9&second_size=1", status=400),
        Case("anchors", "GET", "/v1/log/anchors"),
        Case("entries", "GET", "/v1/log/entries?start_index=0&count=2"),
        Case("entries, json names", "GET", "/v1/log/entries?startIndex=1&count=1"),
        Case("entries, page too large", "GET", "/v1/log/entries?count=257", status=400),
        Case("receipt", "GET", f"/v1/receipts/{w.receipt_id}"),
        Case("receipt, unknown", "GET", f"/v1/receipts/{ZERO_ID}", status=404),
        Case("receipt, malformed", "GET", "/v1/receipts/00", status=400),
        # What no rule maps, and what the transcoder refuses itself.
        Case("unknown path", "GET", "/v1/nope", status=404),
        Case("unknown verb on a known path", "DELETE", "/v1/model", None, 404, 405, NO_ROUTE),
        Case("unknown query parameter", "GET", "/v1/model?verison=2", status=400),
        Case("malformed JSON", "POST", "/v1/items:batchGet", b"{not json", status=400),
        Case("a string where a number goes", "POST", "/v1/items:batchGet", {"indices": ["one"]}, status=400),
        Case("bytes that are not base64", "POST", "/v1/keys", {"publicKey": "!!!"}, status=400),
        Case(
            "an unknown field in the body",
            "POST",
            "/v1/items:batchGet",
            {"indices": [1], "colour": "red"},
            200,
            400,
            BAD,
        ),
        Case(
            "a query parameter on a body-* route",
            "POST",
            "/v1/items:batchGet?indices=2",
            {"indices": [1]},
            200,
            400,
            BAD,
        ),
        Case("path and body name different keys", "POST", f"/v1/keys/{k}:enable", {"keyId": ZERO_ID, "auth": owner}),
        Case("POST with no body and no content type", "POST", "/v1/signin:nonce"),
    ]


def send(client: httpx.Client, case: Case) -> httpx.Response:
    headers = dict(case.headers)
    content = None
    if case.body is not None:
        content = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
        headers.setdefault("content-type", "application/json")
    return client.request(case.method, case.path, content=content, headers=headers)


def masked(value: Any) -> Any:
    """The JSON with volatile values replaced by a marker: compared by presence only."""
    if isinstance(value, dict):
        return {k: ("<volatile>" if k in VOLATILE else masked(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def is_json(reply: httpx.Response) -> bool:
    return reply.headers.get("content-type", "").split(";")[0].strip() == "application/json"


def test_envoy_and_the_gateway_agree_on_every_route(mesh, world, envoy, gateway):
    disagreements = []
    with httpx.Client(base_url=envoy.url, timeout=60) as to_envoy, httpx.Client(base_url=gateway, timeout=60) as to_gw:
        for case in cases(world):
            if case.path.startswith(("/v1/log", "/v1/receipts")):  # "the log has N": Scores' receipts delivered
                mesh.cores["recommender"].receipts.flush(timeout=30)
            reference = send(to_envoy, case)
            ours = send(to_gw, case)
            where = f"{case.name}: {case.method} {case.path}"
            if reference.status_code != case.status:
                disagreements.append(
                    f"{where}: Envoy {reference.status_code}, expected {case.status}: {reference.text[:200]}"
                )
                continue
            expected = case.gateway_status or case.status
            if ours.status_code != expected:
                disagreements.append(
                    f"{where}: gateway {ours.status_code}, Envoy {reference.status_code}: {ours.text[:200]}"
                )
                continue
            if not is_json(ours):
                disagreements.append(f"{where}: gateway answered {ours.headers.get('content-type')}, not JSON")
                continue
            mine = ours.json()
            if case.gateway_status is not None:  # a deliberate difference: each side's own answer
                if reference.status_code == 403:  # Envoy forwarded an internal method: the mesh refused
                    assert reference.json()["details"][0]["reason"] == "CALLER_NOT_ALLOWED", where
                reasons = [d.get("reason") for d in mine.get("details", [])]
                if case.gateway_reason not in reasons:
                    disagreements.append(f"{where}: gateway Status {ours.text[:300]}, expected {case.gateway_reason}")
                if case.gateway_status == 405 and ours.headers.get("allow") != "GET":
                    disagreements.append(f"{where}: 405 without 'Allow: GET'")
                continue
            if is_json(reference):
                if masked(reference.json()) != masked(mine):
                    disagreements.append(f"{where}:\n  Envoy   {reference.text[:400]}\n  gateway {ours.text[:400]}")
            else:  # the transcoder's own refusal (text/plain): the gateway's is a Status of that class
                assert reference.headers.get("content-type", "").startswith("text/plain"), where
                if HTTP_FOR_CODE.get(mine.get("code")) != reference.status_code or not mine.get("message"):
                    disagreements.append(
                        f"{where}: gateway Status {ours.text[:300]} for Envoy's {reference.status_code}"
                    )
    assert not disagreements, "\n".join(disagreements)


def http_rules() -> set[tuple[str, str]]:
    from google.api import annotations_pb2

    from cipherfeed.v1 import keyservice_pb2, ledger_pb2, recommender_pb2

    rules = set()
    for module in (keyservice_pb2, ledger_pb2, recommender_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                options = method.GetOptions()
                if options.HasExtension(annotations_pb2.http):
                    rule = options.Extensions[annotations_pb2.http]
                    verb = str(rule.WhichOneof("pattern"))
                    rules.add((verb.upper(), str(getattr(rule, verb))))
    return rules


def test_every_http_rule_has_cases(world):
    """The table covers every google.api.http rule in protos/ (read from the descriptors, the one
    source of truth): a new route without a conformance case fails here."""
    matched: dict[tuple[str, str], set[int]] = {rule: set() for rule in http_rules()}
    for case in cases(world):
        path = case.path.split("?")[0]
        for verb, template in matched:
            pattern = "^" + re.sub(r"\\\{[^}]*\\\}", "[^/:]+", re.escape(template)) + "$"
            if verb == case.method and re.match(pattern, path):
                matched[(verb, template)].add(case.status)
    assert not [rule for rule, statuses in matched.items() if not statuses], matched
    no_success = {rule for rule, statuses in matched.items() if 200 not in statuses}
    assert no_success == {  # a success here needs what a replayable request cannot carry:
        ("GET", "/v1/keys/{key_id}/evalkeys"),  # internal (not exposed)
        ("POST", "/v1/signing/{key_name}:sign"),  # internal
        ("POST", "/v1/signing/{key_name}:rotate"),  # internal
        ("POST", "/v1/keys/{key_id}:rotate"),  # fresh HE material each time
        ("POST", "/v1/keys/{key_id}:disable"),  # the other cases need the key enabled
        ("POST", "/v1/keys/{key_id}:destroy"),
        ("POST", "/v1/profiles"),  # a real query ciphertext (tests/test_gateway_sdk.py uploads through both)
        ("POST", "/v1/histories"),
        ("POST", "/v1/signin"),  # a fresh signature per request (sign-in nonces are single use)
    }, no_success
