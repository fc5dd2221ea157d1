"""History profiles: the interest vector computed under encryption from uploaded weights.

Real OpenFHE, the real dataset and model, real gRPC servers on loopback (session fixtures)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import numpy as np
import openfhe
import pytest

from cipherfeed.client import keystore
from cipherfeed.client.interest import Engagement, history_interest, history_weights
from cipherfeed.client.ranking import rank_feed
from cipherfeed.client.sdk import RECOMMENDER, encrypt_history
from cipherfeed.he import globalkeys, packing, rnsmac
from cipherfeed.he.codec import ciphertext_sha256, serialize
from cipherfeed.he.globalkeys import EVAL_KEY_LOCK
from cipherfeed.he.params import MESH_PARAMS, HEParams, build_context
from cipherfeed.v1 import common_pb2, recommender_pb2, recommender_pb2_grpc
from services.recommender.history import (
    HistoryError,
    HistoryProjector,
    HistoryRecord,
    catalogue_sha256,
    frame_history,
    unframe_history,
)
from services.recommender.server import serve as serve_recommender
from services.recommender.synthetic import synthetic_catalogue
from tests.conftest import client_for, recommender_config
from tests.test_malformed_input import wide_channel

STATUS = grpc.StatusCode
ERROR_BOUND = 1e-4


def engagements_of(manifest, creator_id: str) -> list[Engagement]:
    """A creator's own videos as a history, with varied engagement (as the CLI seeds it)."""
    items = manifest.items_of_creator(creator_id)
    return [
        Engagement(
            manifest.item_ids[i], watched=0.5 + 0.5 * (r % 2), liked=r % 3 == 0, commented=r % 5 == 0, recency_rank=r
        )
        for r, i in enumerate(items)
    ]


def plaintext_scores(model, weights: np.ndarray) -> np.ndarray:
    u = history_interest(model.embeddings, weights)
    return packing.plaintext_scores(model.embeddings, u, model.popularity, model.popularity_weight)


def assert_same_feed(got: np.ndarray, want: np.ndarray, creator_of: np.ndarray, seen: list[int]) -> None:
    """Equal feeds, except that items whose plaintext scores are tied within the error bound may swap."""
    feed = rank_feed(got, 10, creator_of, seen=seen, per_creator_cap=2)
    clear = rank_feed(want, 10, creator_of, seen=seen, per_creator_cap=2)
    assert len(feed) == len(clear) == 10
    for a, b in zip(feed, clear, strict=True):
        assert a == b or abs(want[a] - want[b]) < 2 * ERROR_BOUND, (feed, clear)


def test_encrypted_history_feeds_equal_plaintext_feeds_for_dataset_users(client, tiktok_model):
    manifest = client.manifest()
    rng = np.random.default_rng(9)
    creators = [manifest.creator_ids[c] for c in rng.choice(len(manifest.creator_ids), 20, replace=False)]
    worst = 0.0
    for creator in creators:
        history = engagements_of(manifest, creator)
        weights = history_weights(history, manifest.index_of, len(manifest.item_ids))
        ref = client.upload_history(weights, pin_model=manifest.model_version)
        scored = client.score_profile(ref, pin_model=manifest.model_version)
        want = plaintext_scores(tiktok_model, weights)
        error = float(np.max(np.abs(scored.scores - want)))
        worst = max(worst, error)
        assert error < ERROR_BOUND, creator
        seen = [manifest.index_of[e.item_id] for e in history]
        assert_same_feed(scored.scores, want, manifest.creator_of, seen)
    assert worst > 0  # it really was computed under encryption
    # Scoring the same reference again is answered from the result cache, with the same receipt subject.
    again = client.score_profile(ref, pin_model=manifest.model_version)
    assert again.from_cache and np.max(np.abs(again.scores - scored.scores)) < 1e-9


def test_score_history_uploads_once_and_again_after_expiry(client, recommender, tiktok_model, redis_server):
    _, core = recommender
    manifest = client.manifest()
    weights = history_weights(
        engagements_of(manifest, manifest.creator_ids[3]), manifest.index_of, core.model.item_count
    )
    first = client.score_history(weights)
    ref = client._history[1]
    redis_server.client().delete(f"cf:history:{ref}")  # Score reads only E(u) under the serving model
    client.score_history(weights)
    assert client._history[1] == ref  # not uploaded again
    redis_server.client().delete(f"cf:profile:{ref}")  # expired (the recommender itself may not delete)
    again = client.score_history(weights)
    assert client._history[1] != ref
    assert np.max(np.abs(again.scores - first.scores)) < ERROR_BOUND


def test_reprojection_after_a_model_update_equals_a_fresh_upload(keyservice, redis_server, tmp_path):
    before = synthetic_catalogue(9_000, seed=21)  # 2 blocks
    rng = np.random.default_rng(4)
    moved = before.embeddings + 0.3 * rng.standard_normal(before.embeddings.shape).astype(np.float32)
    after = replace(before, embeddings=moved / np.linalg.norm(moved, axis=1, keepdims=True), created_by="update")
    assert after.version != before.version and after.item_ids == before.item_ids
    weights = np.zeros(before.item_count)
    weights[rng.choice(before.item_count, 15, replace=False)] = rng.random(15)
    weights /= weights.sum()

    def serve(model, name):
        config = recommender_config(tmp_path / name, keyservice[0], redis_server.config_for("recommender"))
        running, core = serve_recommender(config, model)
        c = client_for(running.port, keyservice[0], tmp_path / "client")
        c.use_keys()
        c.register()
        return running, core, c

    running, core, c = serve(before, "before")
    try:
        ref = c.upload_history(weights)
        sha = c._histories[ref]
        old = c.score_profile(ref).scores
    finally:
        c.close()
        running.stop(grace=1)
        core.close()
    running, core, c = serve(after, "after")
    try:
        reprojected = c.score_profile(ref, query_sha256=sha)
        assert reprojected.model_version == after.version
        fresh = c.score_profile(c.upload_history(weights))
    finally:
        c.close()
        running.stop(grace=1)
        core.close()
    want_after = plaintext_scores(after, weights)
    assert np.max(np.abs(old - plaintext_scores(before, weights))) < ERROR_BOUND
    assert np.max(np.abs(old - want_after)) > 100 * ERROR_BOUND  # the update did change the scores
    assert np.max(np.abs(reprojected.scores - want_after)) < ERROR_BOUND
    assert np.max(np.abs(reprojected.scores - fresh.scores)) < ERROR_BOUND
    creator_of = after.creator_index.astype(np.int64)
    assert_same_feed(reprojected.scores, want_after, creator_of, [])
    assert_same_feed(fresh.scores, want_after, creator_of, [])


@pytest.fixture(scope="module")
def stub(recommender):
    with wide_channel(recommender[0], "recommender") as ch:
        yield recommender_pb2_grpc.RecommenderStub(ch)


@pytest.fixture(scope="module")
def valid_history(client, recommender):
    weights = np.zeros(recommender[1].model.item_count)
    weights[[5, 9_000, 20_000]] = 1.0
    return encrypt_history(client.keys, weights)


def upload(stub, client, blobs, key_id=None, model_version=""):
    key = common_pb2.KeyRef(key_id=client.key_id if key_id is None else key_id, version=client.key_version)
    request = recommender_pb2.UploadHistoryRequest(key=key, history_ciphertexts=blobs, model_version=model_version)
    return stub.UploadHistory(client._authorize(RECOMMENDER, "UploadHistory", key.key_id, request), timeout=60)


def signed_score(client, request):
    return client._authorize(RECOMMENDER, "Score", request.key.key_id, request)


def expect(code, fn, *args, match="", **kwargs):
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details(), info.value.details()
    return info.value.details()


def foreign_ciphertext(params: HEParams) -> bytes:
    cc = build_context(params)
    kp = cc.KeyGen()
    return serialize(cc.Encrypt(kp.publicKey, cc.MakeCKKSPackedPlaintext(np.zeros(params.slots, dtype=complex))))


def test_malformed_truncated_and_foreign_histories_get_the_statuses_queries_get(stub, client, valid_history):
    good = valid_history[0]
    keys = client.keys
    cc = keys.cc
    level1 = serialize(cc.Encrypt(keys.public_key, cc.MakeCKKSPackedPlaintext(np.zeros(4096, dtype=complex), 1, 1)))
    few_slots = serialize(
        cc.Encrypt(keys.public_key, cc.MakeCKKSPackedPlaintext(np.zeros(1024, dtype=complex), 1, 0, None, 1024))
    )
    invalid = {
        "empty": (b"", "bytes"),
        "random short": (os.urandom(100), "bytes"),
        "random right length": (os.urandom(len(good)), "crypto parameters"),
        "truncated": (good[:-1000], "bytes"),
        "header only": (good[:5000], "bytes"),
        "padded": (good + b"\x00" * 10_000, "bytes"),
        "other ring": (foreign_ciphertext(HEParams(ring_dimension=16384)), "bytes"),
        "other moduli": (foreign_ciphertext(HEParams(scaling_mod_bits=50)), "crypto parameters"),
        "level 1": (level1, "bytes"),
        "1024 slots": (few_slots, "crypto parameters"),  # the slot count is a fixed byte of the layout
    }
    contexts_before = len(openfhe.GetAllContexts())
    for name, (blob, phrase) in invalid.items():
        blobs = list(valid_history)
        blobs[1] = blob
        details = expect(STATUS.INVALID_ARGUMENT, upload, stub, client, blobs, match="history ciphertext 1")
        assert phrase in details, (name, details)
    assert len(openfhe.GetAllContexts()) == contexts_before  # nothing foreign was registered
    expect(STATUS.INVALID_ARGUMENT, upload, stub, client, valid_history[:-1], match="takes 4")
    expect(STATUS.INVALID_ARGUMENT, upload, stub, client, [*valid_history, good], match="takes 4")
    expect(STATUS.RESOURCE_EXHAUSTED, upload, stub, client, [b"\x00" * (2 * 2**20), *valid_history[1:]], match="limit")
    expect(STATUS.NOT_FOUND, upload, stub, client, valid_history, key_id="ab" * 32, match="no key")
    expect(STATUS.INVALID_ARGUMENT, upload, stub, client, valid_history, key_id="", match="key_id")
    expect(STATUS.FAILED_PRECONDITION, upload, stub, client, valid_history, model_version="0" * 64, match="serves")
    ref = upload(stub, client, valid_history).profile_ref  # still serving
    score = recommender_pb2.ScoreRequest(key=common_pb2.KeyRef(key_id=client.key_id), profile_ref=ref)
    assert len(stub.Score(signed_score(client, score), timeout=60).score_ciphertexts) == 4
    unknown = recommender_pb2.ScoreRequest(key=common_pb2.KeyRef(key_id=client.key_id), profile_ref="nope")
    expect(STATUS.NOT_FOUND, stub.Score, signed_score(client, unknown), timeout=60, match="upload it again")


def test_a_history_is_scored_only_under_the_key_it_was_uploaded_with(
    stub, client, valid_history, recommender, keyservice, tmp_path
):
    ref = upload(stub, client, valid_history).profile_ref
    second = client_for(recommender[0], keyservice[0], tmp_path)  # the same owner's other key
    second.keys, second.account = keystore.load_test_keys(client.keys), client.account
    second.register()
    other = recommender_pb2.ScoreRequest(key=common_pb2.KeyRef(key_id=second.key_id), profile_ref=ref)
    expect(STATUS.INVALID_ARGUMENT, stub.Score, signed_score(second, other), timeout=60, match="another key")
    second.close()


@pytest.mark.parametrize(
    ("kernel", "rotations"),
    [("native", 4), ("native", 1), ("openfhe", 4), ("openfhe", 1)],
)
def test_projection_strategies_and_kernels_compute_u(kernel, rotations):
    if kernel == "native" and not rnsmac.available():
        pytest.skip("cipherfeed/he/_rnsmac.c was not compiled")
    model = synthetic_catalogue(17_000, seed=5)  # 3 blocks, the last one short
    keys = keystore.generate(MESH_PARAMS)
    cc = keys.cc
    tag = f"history-test-{kernel}-{rotations}"
    globalkeys.file(cc, openfhe.DeserializeEvalKeyMapString(keys.rotation_key_bytes, openfhe.BINARY), tag)
    rng = np.random.default_rng(6)
    weights = np.zeros(model.item_count)
    weights[rng.choice(model.item_count, 30, replace=False)] = rng.random(30)
    weights /= weights.sum()
    history = []
    for blob in encrypt_history(keys, weights):
        ct = openfhe.DeserializeCiphertextString(blob, openfhe.BINARY)
        ct.SetKeyTag(tag)
        history.append(ct)
    try:
        with ThreadPoolExecutor(2) as pool:
            projector = HistoryProjector(model, MESH_PARAMS, pool, kernel=kernel, input_rotations=rotations)
            with EVAL_KEY_LOCK.read():
                profile, timing = projector.project(history)
                with pytest.raises(HistoryError):
                    projector.project(history[:2])
    finally:
        globalkeys.drop(cc, tag)
    assert (profile.GetLevel(), profile.GetNoiseScaleDeg()) == (0, 1)  # a lifted query's metadata
    stored = projector.export(profile)  # what the cache keeps: raw words, rebuilt in this context
    assert len(stored) == 4 * 8 * MESH_PARAMS.ring_dimension
    profile = projector.restore(stored)
    for bad in (stored[:-8], stored + bytes(8), b"\xff" * len(stored)):
        with pytest.raises(HistoryError):
            projector.restore(bad)
    pt = cc.Decrypt(keys.secret_key, profile)
    pt.SetLength(MESH_PARAMS.slots)
    got = np.asarray(pt.GetCKKSPackedValue()) * 2.0**-31  # held at 2^(55 + 31)
    u = history_interest(model.embeddings, weights)
    assert np.max(np.abs(got.real - np.tile(u, MESH_PARAMS.slots // 64))) < 2e-6
    assert np.max(np.abs(got.imag)) < 1e-9  # the conjugation cancelled the imaginary part
    assert timing.total_ms > 0


def test_history_records_round_trip_and_refuse_truncation():
    blobs = [b"one", b"two"]
    sha = ciphertext_sha256(blobs)
    record = HistoryRecord("k" * 64, 3, catalogue_sha256(["a", "b"]), sha, "m" * 64, b"profile")
    data = record.to_bytes()
    assert HistoryRecord.from_bytes(data) == record
    assert HistoryRecord.from_bytes(record.with_profile("", b"").to_bytes()).profile == b""
    for cut in (len(data) - 1, 10, 0):
        with pytest.raises(HistoryError):
            HistoryRecord.from_bytes(data[:cut])
    with pytest.raises(HistoryError):
        HistoryRecord.from_bytes(data + b"x")
    framed = frame_history(blobs)
    assert unframe_history(framed, sha) == blobs
    for bad in (framed[:-1], framed + b"x", frame_history([b"one", b"tw0"]), b""):
        with pytest.raises(HistoryError):
            unframe_history(bad, sha)
    assert catalogue_sha256(["ab", "c"]) != catalogue_sha256(["a", "bc"])


def test_history_layout_and_plaintext_twin():
    slots, dp = 8, 4
    w = np.arange(1.0, 21.0)
    blocks = packing.history_blocks(w, slots)
    assert len(blocks) == 2 and blocks[0][3] == 4 + 12j and blocks[1][3] == 20 + 0j
    x = np.random.default_rng(0).standard_normal((16, dp))
    diagonals = packing.history_diagonals(x, dp, slots)
    # Slot-wise: rot(w * P_k, k) summed over k and over the periods, real part times 2, is X^T w.
    total = np.zeros(slots, dtype=complex)
    for k in range(dp):
        total += np.roll(blocks[0] * diagonals[k], -k)
    folded = sum(np.roll(total, -dp * m) for m in range(slots // dp))
    assert np.allclose(2 * folded.real, np.tile(w[:16] @ x, slots // dp))
    index_of = {"a": 0, "b": 2}
    weights = history_weights([Engagement("a", liked=True), Engagement("b"), Engagement("gone")], index_of, 3)
    assert weights.sum() == pytest.approx(1.0) and weights[1] == 0 and weights[0] == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        history_weights([Engagement("gone")], index_of, 3)
