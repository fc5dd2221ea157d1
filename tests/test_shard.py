"""Sharded scale-out: a coordinator recommender fanning every Score out to 2 or 3 shards gives
exactly (bit for bit) the one-recommender answer, inline and by history, with one receipt that
verifies to the chain; a shard down gives UNAVAILABLE and never a partial feed; shards of another
model are refused. Real OpenFHE, gRPC over mutual TLS on loopback, Redis, a ledger on py-evm."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from cipherfeed import errors
from cipherfeed.cache import Keys
from cipherfeed.client.sdk import RECOMMENDER, encrypt_history
from cipherfeed.config import ShardConfig
from cipherfeed.grpcutil import reason_of
from cipherfeed.he import rnsmac
from cipherfeed.he.codec import ciphertext_sha256
from cipherfeed.v1 import common_pb2, ledger_pb2_grpc, recommender_pb2, recommender_pb2_grpc, shard_pb2, shard_pb2_grpc
from services.ledger.server import serve as serve_ledger
from services.ledger.signers import LocalSigner
from services.recommender.history import HistoryRecord
from services.recommender.server import serve as serve_recommender
from services.recommender.sharding import block_range
from services.recommender.synthetic import synthetic_catalogue
from tests.conftest import client_for, mesh_pki, recommender_config
from tests.test_ledger import ORIGIN, ledger_config, settle, verify

STATUS = grpc.StatusCode


@pytest.fixture(scope="module")
def model():
    return synthetic_catalogue(17_000, seed=13)  # 3 blocks, the last one short (folded)


class Mesh:
    def __init__(self, model, keyservice, redis_server, tmp):
        self.model, self.keyservice, self.redis_server, self.tmp = model, keyservice, redis_server, tmp
        self.signer = LocalSigner(ORIGIN)
        self.ledger, self.ledger_core = serve_ledger(
            ledger_config(tmp / "ledger"), signer=self.signer, background_anchoring=False
        )
        self.running = []
        self.clients = []

    def config(self, name, shard=None, ledger=True, listen="127.0.0.1:0"):
        base = recommender_config(self.tmp / name, self.keyservice[0], self.redis_server.config_for("recommender"))
        target = f"127.0.0.1:{self.ledger.port}" if ledger else None
        return dataclasses.replace(base, listen=listen, ledger_target=target, shard=shard or ShardConfig())

    def serve(self, name, shard=None, model=None, listen="127.0.0.1:0"):
        running, core = serve_recommender(self.config(name, shard, listen=listen), model or self.model)
        self.running.append((running, core))
        return running, core

    def shards(self, count, prefix):
        return [self.serve(f"{prefix}-{i}", ShardConfig(index=i, count=count)) for i in range(count)]

    def coordinator(self, name, shards, model=None):
        targets = tuple(f"127.0.0.1:{r.port}" for r, _ in shards)
        return self.serve(name, ShardConfig(targets=targets), model)

    def client(self, port):
        c = client_for(port, self.keyservice[0], self.tmp / "client")  # one device, one key, every entry point
        c.config = dataclasses.replace(c.config, ledger_target=f"127.0.0.1:{self.ledger.port}")
        c.use_keys()
        c.register()
        self.clients.append(c)
        return c

    def close(self):
        for c in self.clients:
            c.close()
        for running, core in reversed(self.running):
            running.stop(grace=1)
            core.close()
        self.ledger.stop(grace=1)
        self.ledger_core.close()


@pytest.fixture(scope="module")
def mesh(model, keyservice, redis_server, tmp_path_factory):
    m = Mesh(model, keyservice, redis_server, tmp_path_factory.mktemp("shard-mesh"))
    try:
        single = m.serve("single")  # the reference: one recommender holding every block
        two, three = m.shards(2, "two"), m.shards(3, "three")
        m.entry = {"one": single, "two": m.coordinator("coord-two", two), "three": m.coordinator("coord-three", three)}
        m.shard_sets = {"two": two, "three": three}
        m.devices = {name: m.client(r.port) for name, (r, _) in m.entry.items()}
        yield m
    finally:
        m.close()


def forget_results(mesh):
    """Every entry point shares the Redis result cache; an answer must be computed, not found."""
    for _, core in mesh.entry.values():
        core.results.flush()
    admin = mesh.redis_server.client()
    for key in admin.scan_iter("cf:result:*"):
        admin.delete(key)


def test_block_ranges_are_contiguous_balanced_and_cover_the_catalogue():
    for blocks in range(1, 12):
        for count in range(1, blocks + 1):
            ranges = [block_range(blocks, i, count) for i in range(count)]
            assert [r.first for r in ranges] == [0] + [r.stop for r in ranges[:-1]] and ranges[-1].stop == blocks
            assert max(r.blocks for r in ranges) - min(r.blocks for r in ranges) <= 1
    with pytest.raises(ValueError):
        block_range(2, 0, 3)  # an empty shard is refused


def test_two_and_three_shards_score_exactly_as_one_recommender_with_one_verifiable_receipt(mesh):
    u = np.random.default_rng(7).standard_normal(mesh.model.dim)
    query = mesh.devices["one"].encrypt_query(u / np.linalg.norm(u))
    answers = {}
    for name, device in mesh.devices.items():
        forget_results(mesh)
        answers[name] = device.score_ciphertext(query)
        assert not answers[name].from_cache
    one = answers["one"]
    for name in ("two", "three"):
        assert np.array_equal(answers[name].scores, one.scores), name  # decrypted: identical
        assert answers[name].receipt.response_sha256 == one.receipt.response_sha256  # ciphertexts: identical
        assert answers[name].model_version == one.model_version == mesh.model.version
    want = mesh.model.embeddings @ (u / np.linalg.norm(u)) + mesh.model.popularity_weight * mesh.model.popularity
    assert np.max(np.abs(one.scores - want)) < 1e-4
    for name in ("two", "three"):  # with the native kernel the coordinators rotated the query once, for every shard
        assert (mesh.entry[name][1].rotator is not None) == rnsmac.available()
    # One receipt per merged answer, in the coordinator's spool, verifying down to the anchor.
    for name in ("two", "three"):
        settle(mesh.entry[name][1], mesh.ledger_core)
        with mesh_pki().channel(mesh.ledger.port, "ledger", "device") as ch:
            verified = verify(ledger_pb2_grpc.LedgerStub(ch), mesh.ledger_core, mesh.signer, answers[name].receipt_id)
        assert verified.receipt == answers[name].receipt


def test_a_history_projected_on_shards_is_the_one_recommender_profile(mesh):
    rng = np.random.default_rng(11)
    weights = np.zeros(mesh.model.item_count)
    weights[rng.choice(mesh.model.item_count, 25, replace=False)] = rng.random(25)
    device = mesh.devices["one"]
    blobs = encrypt_history(device.keys, weights / weights.sum())  # the same ciphertexts to every entry point
    scores, profiles = {}, {}
    for name, d in mesh.devices.items():
        key = d._key_ref()
        request = recommender_pb2.UploadHistoryRequest(key=key, history_ciphertexts=blobs)
        ref = d.stub.UploadHistory(d._authorize(RECOMMENDER, "UploadHistory", key.key_id, request), timeout=60)
        forget_results(mesh)
        scores[name] = d.score_profile(ref.profile_ref, query_sha256=ciphertext_sha256(blobs))
        assert not scores[name].from_cache
        profiles[name] = HistoryRecord.from_bytes(mesh.entry[name][1].cache.get(Keys.profile(ref.profile_ref)))
    for name in ("two", "three"):  # E(u) added from the shards' shares is the one recommender's, word for word
        assert profiles[name].profile == profiles["one"].profile, name
        assert profiles[name].history_sha256 == profiles["one"].history_sha256 == ciphertext_sha256(blobs)
        assert np.array_equal(scores[name].scores, scores["one"].scores), name
        assert scores[name].receipt.response_sha256 == scores["one"].receipt.response_sha256


def test_shards_serve_only_the_coordinator_and_only_their_model(mesh):
    (shard_running, shard_core), _ = mesh.shard_sets["two"]
    device = mesh.devices["one"]
    key = common_pb2.KeyRef(key_id=device.key_id, version=device.key_version)
    query = device.encrypt_query(np.eye(mesh.model.dim)[0])
    as_device = shard_pb2_grpc.RecommenderShardStub(mesh_pki().channel(shard_running.port, "recommender", "device"))
    with pytest.raises(grpc.RpcError) as info:
        as_device.ScoreBlocks(shard_pb2.ScoreBlocksRequest(key=key, query_ciphertext=query), timeout=10)
    assert info.value.code() == STATUS.PERMISSION_DENIED
    public = recommender_pb2_grpc.RecommenderStub(mesh_pki().channel(shard_running.port, "recommender", "device"))
    with pytest.raises(grpc.RpcError) as info:  # a shard's blocks are never a client's answer
        public.GetModelInfo(recommender_pb2.GetModelInfoRequest(), timeout=10)
    assert info.value.code() == STATUS.UNIMPLEMENTED
    as_peer = shard_pb2_grpc.RecommenderShardStub(mesh_pki().channel(shard_running.port, "recommender", "recommender"))
    info_reply = as_peer.GetShardInfo(shard_pb2.GetShardInfoRequest(), timeout=10)
    assert (info_reply.shard_index, info_reply.shard_count, info_reply.first_block) == (0, 2, 0)
    assert info_reply.model_version == mesh.model.version
    for model_version in ("", "0" * 64):
        request = shard_pb2.ScoreBlocksRequest(key=key, model_version=model_version, query_ciphertext=query)
        with pytest.raises(grpc.RpcError) as info:
            as_peer.ScoreBlocks(request, timeout=10)
        assert info.value.code() == STATUS.FAILED_PRECONDITION
        assert reason_of(info.value) == errors.Reason.MODEL_MISMATCH.value
    good = as_peer.ScoreBlocks(
        shard_pb2.ScoreBlocksRequest(key=key, model_version=mesh.model.version, query_ciphertext=query), timeout=30
    )
    assert good.first_block == 0 and len(good.score_ciphertexts) == shard_core.blocks.blocks == 1
    # Rotations shipped by a coordinator are checked: the exact size, every word below q0.
    shape = shard_core.scorer.rotation_shape
    too_big = np.full(shape, shard_core.scorer.modulus, dtype="<u8").tobytes()
    for rotations in (b"\0" * 8, too_big):
        request = shard_pb2.ScoreBlocksRequest(
            key=key, model_version=mesh.model.version, query_ciphertext=query, query_rotations=rotations
        )
        with pytest.raises(grpc.RpcError) as info:
            as_peer.ScoreBlocks(request, timeout=30)
        assert info.value.code() == STATUS.INVALID_ARGUMENT
        assert reason_of(info.value) == errors.Reason.HE_MATERIAL_INVALID.value
    # A coordinator of another model refuses to start over these shards.
    other = dataclasses.replace(mesh.model, created_by="another model, same items", _bytes=None)
    assert other.version != mesh.model.version
    with pytest.raises(RuntimeError, match="serves model"):
        mesh.coordinator("coord-other", mesh.shard_sets["two"], model=other)


def test_a_shard_down_gives_unavailable_never_a_partial_feed_and_its_return_serves_again(mesh):
    device = mesh.devices["two"]
    u = np.eye(mesh.model.dim)[3]
    weights = np.ones(mesh.model.item_count)
    before = device.score(u)
    ref = device.upload_history(weights)
    coord_core = mesh.entry["two"][1]
    settle(coord_core, mesh.ledger_core)
    logged = mesh.ledger_core.log.tree.size
    running, core = mesh.shard_sets["two"][1]
    port = running.port
    running.stop(grace=1)
    core.close()
    mesh.running.remove((running, core))
    for attempt in (
        lambda: device.score(u + 0.5),
        lambda: device.upload_history(weights * 2),
        lambda: device.score_profile(ref),
    ):
        forget_results(mesh)
        with pytest.raises(grpc.RpcError) as info:
            attempt()
        assert info.value.code() == STATUS.UNAVAILABLE
        assert reason_of(info.value) == errors.Reason.DEPENDENCY_UNAVAILABLE.value
    settle(coord_core, mesh.ledger_core)
    assert mesh.ledger_core.log.tree.size == logged  # no receipt for an answer never given
    mesh.serve("two-1-again", ShardConfig(index=1, count=2), listen=f"127.0.0.1:{port}")
    assert coord_core.shards.wait_ready(timeout=60)  # a condition wait: the coordinator reconnected
    forget_results(mesh)
    again = device.score(u)  # the same coordinator, its channel reconnected
    assert np.max(np.abs(again.scores - before.scores)) < 1e-4 and not again.from_cache
    assert device.score_profile(ref).scores.shape == (mesh.model.item_count,)
