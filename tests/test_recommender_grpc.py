"""A real recommender on loopback: encrypted top-10 equals plaintext top-10 for 20 dataset users."""

import dataclasses
import hashlib

import numpy as np
import pytest
from google.api import annotations_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cipherfeed.client.interest import Engagement, interest_vector
from cipherfeed.client.ranking import rank_feed
from cipherfeed.client.sdk import RECOMMENDER, ClientError
from cipherfeed.he.packing import plaintext_scores
from cipherfeed.v1 import keyservice_pb2, ledger_pb2, recommender_pb2
from tests.conftest import mesh_pki

ERROR_BOUND = 1e-4
USERS = 20


def creator_history(model, creator_row: int) -> list[Engagement]:
    own = np.flatnonzero(model.creator_index == creator_row)
    return [Engagement(model.item_ids[i], liked=True, recency_rank=r) for r, i in enumerate(own)]


def test_encrypted_top10_equals_plaintext_top10_for_20_users(client, tiktok_model):
    m = tiktok_model
    rows = np.linspace(0, len(m.creator_ids) - 1, USERS).astype(int)
    exact = 0
    for row in rows:
        history = creator_history(m, int(row))
        # A client that carries its own interest model sends its own E(u) (the inline query).
        u = interest_vector(m.embeddings[[m.item_ids.index(e.item_id) for e in history]], history)
        scored = client.score(u)
        clear = plaintext_scores(m.embeddings, u, m.popularity, m.popularity_weight)
        err = np.max(np.abs(scored.scores - clear))
        assert err < ERROR_BOUND, f"creator {m.creator_ids[row]}: max error {err}"
        enc_top = np.argsort(-scored.scores, kind="stable")[:10]
        clear_top = np.argsort(-clear, kind="stable")[:10]
        # Items whose plaintext scores tie within the error bound may swap places.
        np.testing.assert_allclose(clear[enc_top], clear[clear_top], atol=2 * ERROR_BOUND)
        exact += list(enc_top) == list(clear_top)
        # The client-side feed built from these scores drops seen items and caps creators.
        seen = [m.item_ids.index(e.item_id) for e in history]
        feed = rank_feed(scored.scores, 10, m.creator_index, seen=seen, per_creator_cap=2)
        assert len(feed) == 10 and not set(feed) & set(seen)
        assert max(np.bincount(m.creator_index[feed])) <= 2
    assert exact >= USERS - 2


def test_client_refuses_a_layout_that_breaks_the_folding_rule(client, tiktok_model):
    query = client.encrypt_query(np.ones(64) / 8)
    request = recommender_pb2.ScoreRequest(key=client._key_ref(), query_ciphertext=query)
    response = client.stub.Score(client._authorize(RECOMMENDER, "Score", client.key_id, request), timeout=30)
    assert response.layout.tail_fold == 4  # 26,558 items: a 1,982-item last block
    digest = hashlib.sha256(query).digest()
    assert len(client._decrypt(response, digest, len(query)).scores) == tiktok_model.item_count
    for wrong in (0, 1, 2, 8):
        response.layout.tail_fold = wrong
        with pytest.raises(ClientError, match="tail fold"):
            client._decrypt(response, digest, len(query))


def test_sdk_recommend_returns_item_metadata(client, tiktok_model):
    creator = tiktok_model.creator_ids[5]
    own = np.flatnonzero(tiktok_model.creator_index == 5)
    history = [Engagement(tiktok_model.item_ids[i], liked=True) for i in own]
    feed, scored = client.recommend(history, k=5, per_creator_cap=1)
    assert len(feed) == 5
    assert len({item.creator_id for item in feed}) == 5
    assert all(item.url.startswith("https://www.tiktok.com/@") for item in feed)
    assert creator not in {item.creator_id for item in feed} or all(
        item.item_id not in {e.item_id for e in history} for item in feed
    )
    assert scored.model_version == tiktok_model.version
    assert scored.query_bytes < 600_000


def test_params_and_model_info(client, tiktok_model):
    info = client.model_info()
    assert info.version == tiktok_model.version and info.item_count == tiktok_model.item_count
    assert client.params().security_level == "HEStd_128_classic"


def test_health_and_reflection(recommender):
    port, _ = recommender
    with mesh_pki().channel(port, "recommender", "device") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "cipherfeed.v1.Recommender"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(ch)
        assert "cipherfeed.v1.Recommender" in db.get_services()
        assert "grpc.health.v1.Health" in db.get_services()


def test_every_public_rpc_has_an_http_annotation():
    internal = {"cipherfeed.v1.Ledger.Append", "cipherfeed.v1.Ledger.AppendBatch"}
    for module in (recommender_pb2, keyservice_pb2, ledger_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if method.full_name in internal:
                    continue
                rule = method.GetOptions().Extensions[annotations_pb2.http]
                assert rule.WhichOneof("pattern"), f"{method.full_name} has no google.api.http rule"


def test_manifest_is_fetched_once_and_refreshed_when_the_model_changes(client, tiktok_model):
    first = client.manifest()
    assert client.manifest() is first  # one download per model version
    client._manifest = dataclasses.replace(first, model_version="0" * 64)  # as if the model changed
    own = np.flatnonzero(tiktok_model.creator_index == 9)
    feed, scored = client.recommend([Engagement(tiktok_model.item_ids[i], liked=True) for i in own], k=3)
    assert len(feed) == 3 and scored.model_version == tiktok_model.version
    assert client.manifest().model_version == tiktok_model.version
