"""A sharded mesh of real processes (`cipherfeed mesh up --shards 2`: Redis, anvil, key service,
ledger, two recommender shards and their coordinator, each its own process), against a one-shard
reference recommender on the same model and key service:

* it comes up with two shard processes and a coordinator, serves a real ``recommend()`` and scores
  the same ciphertexts exactly (bit for bit) as one recommender, and stops cleanly;
* with one shard killed, or frozen (SIGSTOP: it holds its connections and never answers), while
  two devices score by profile without pause: Score inline, Score by profile and UploadHistory get
  UNAVAILABLE with the coordinator's ErrorInfo (DEPENDENCY_UNAVAILABLE, dependency=shard, the
  shard's index) within the coordinator's shard deadline, far inside the client's; the coordinator
  keeps serving what needs no shard; once the shard is back the same coordinator process scores
  exactly as one recommender again; every acknowledged receipt is in the log once, anchored.

Waiting is on conditions (counters of the load, health, the ledger's answers), with deadlines.
"""

from __future__ import annotations

import dataclasses
import io
import threading
from dataclasses import replace

import grpc
import numpy as np
import pytest

from cipherfeed import trust as trustfile
from cipherfeed.client.interest import Engagement, history_weights
from cipherfeed.client.ranking import rank_feed
from cipherfeed.client.sdk import RECOMMENDER, RecommenderClient, encrypt_history
from cipherfeed.config import ClientConfig, GrpcLimits
from cipherfeed.devredis import LocalRedis
from cipherfeed.errors import Reason
from cipherfeed.grpcutil import error_info_of
from cipherfeed.he.codec import ciphertext_sha256
from cipherfeed.he.packing import plaintext_scores
from cipherfeed.mesh import MeshOptions, ProcessMesh
from cipherfeed.v1 import recommender_pb2
from services.ledger.store import LedgerStore
from services.recommender.artifact import ModelArtifact
from services.recommender.server import serve as serve_recommender
from tests.conftest import recommender_config
from tests.test_fault import PER_PHASE, Device, Load, check_log_holds_each_once, wait_receipts_delivered, wait_until

SHARD_DEADLINE = 5.0  # the coordinator's per-shard deadline (CIPHERFEED_SHARD_DEADLINE_SECONDS)
CLIENT_DEADLINE = 120.0  # the devices': a hang would end in DEADLINE_EXCEEDED, not UNAVAILABLE


@dataclasses.dataclass
class ShardedMesh:
    mesh: ProcessMesh
    model: ModelArtifact
    devices: list[Device]
    probe: RecommenderClient  # a device apart from the load: the requests made while a shard is away
    reference: RecommenderClient  # the probe's keys, talking to the one-shard recommender
    trust: trustfile.TrustAnchors
    chain_url: str


@pytest.fixture(scope="module")
def sharded(tiktok_model, tmp_path_factory):
    state = tmp_path_factory.mktemp("shard-mesh")
    model_path = state / "model.cfmodel"
    tiktok_model.save(model_path)
    options = MeshOptions(
        state_dir=state,
        chain="anvil",
        ephemeral_ports=True,
        log_format="json",
        shards=2,
        gateway=False,
        model_path=model_path,
        checkpoint_interval=0.5,
        extra_env={
            "CIPHERFEED_SCORE_RATE_PER_SECOND": "1000",
            "CIPHERFEED_SCORE_BURST": "1000",
            "CIPHERFEED_SHARD_DEADLINE_SECONDS": str(SHARD_DEADLINE),
        },
        startup_timeout=300,
    )
    mesh = ProcessMesh(options, io.StringIO())
    clients: list[RecommenderClient] = []
    single = None
    reference_redis = None
    try:
        mesh.up()
        # The one-shard reference: one recommender holding every block, in this process, on the
        # mesh's key service (so the devices' keys are known to it), no cache, no ledger.
        reference_redis = LocalRedis.start()  # its own cache: no answer found in the mesh's
        config = recommender_config(
            state / "single", mesh.children["keyservice"].port, reference_redis.config_for("recommender")
        )
        config = replace(config, tls=mesh.tls("recommender"))
        single = serve_recommender(config, tiktok_model)
        base = ClientConfig(
            target=mesh.target("recommender"),
            keyservice_target=mesh.target("keyservice"),
            ledger_target=mesh.target("ledger"),
            deadline_seconds=CLIENT_DEADLINE,
            limits=GrpcLimits(),
            tls=mesh.tls("device"),
        )
        rng = np.random.default_rng(29)
        devices = []
        for n in range(2):
            client = RecommenderClient(replace(base, home=state / f"device{n}"))
            clients.append(client)
            client.wait_ready(timeout=30)
            client.use_keys()
            client.register()
            u = rng.normal(size=tiktok_model.dim)
            u /= np.linalg.norm(u)
            expected = plaintext_scores(
                tiktok_model.embeddings, u, tiktok_model.popularity, tiktok_model.popularity_weight
            )
            devices.append(Device(client, u, expected))
        # A third device (its own key and owner account) and the same device on the reference.
        probe = RecommenderClient(replace(base, home=state / "probe"))
        clients.append(probe)
        probe.use_keys()
        probe.register()
        reference = RecommenderClient(replace(base, home=state / "probe", target=f"127.0.0.1:{single[0].port}"))
        clients.append(reference)
        reference.use_keys()
        trust = trustfile.pin(mesh.trust_file, state / "device0")
        chain_url = f"http://127.0.0.1:{mesh.children['anvil'].port}"
        yield ShardedMesh(mesh, tiktok_model, devices, probe, reference, trust, chain_url)
    finally:
        for c in clients:
            c.close()
        if single is not None:
            single[0].stop(grace=1)
            single[1].close()
        if reference_redis is not None:
            reference_redis.stop()
        mesh.down()


def same_as_one_shard(sm: ShardedMesh, u: np.ndarray, weights: np.ndarray) -> None:
    """The same query and history ciphertexts through the coordinator and the one recommender
    give identical decrypted scores: the same ciphertexts, bit for bit (CKKS noise would differ in
    the last digits otherwise)."""
    device, reference = sm.probe, sm.reference
    query = device.encrypt_query(u)
    sharded, single = device.score_ciphertext(query), reference.score_ciphertext(query)
    assert not sharded.from_cache and not single.from_cache
    assert np.array_equal(sharded.scores, single.scores)
    blobs = encrypt_history(device.keys, weights / weights.sum())
    answers = []
    for client in (device, reference):
        key = client._key_ref()
        request = recommender_pb2.UploadHistoryRequest(key=key, history_ciphertexts=blobs)
        ref = client.stub.UploadHistory(
            client._authorize(RECOMMENDER, "UploadHistory", key.key_id, request), timeout=60
        )
        answers.append(client.score_profile(ref.profile_ref, query_sha256=ciphertext_sha256(blobs)))
    assert np.array_equal(answers[0].scores, answers[1].scores)
    assert not answers[0].from_cache and not answers[1].from_cache


def test_mesh_up_with_two_shards_runs_two_shard_processes_and_a_coordinator_giving_the_one_shard_feed(sharded):
    mesh = sharded.mesh
    pids = {name: mesh.children[name].pid for name in ("shard0", "shard1", "recommender")}
    assert all(mesh.children[name].alive for name in pids) and len(set(pids.values())) == 3
    assert "coordinating 2 shards" in (mesh.logs / "recommender.log").read_text()
    device = sharded.probe
    manifest = device.manifest()
    seen = [int(i) for i in np.random.default_rng(5).choice(manifest.item_count, 20, replace=False)]
    engagements = [Engagement(item_id=manifest.item_ids[i], liked=True, recency_rank=r) for r, i in enumerate(seen)]
    feed, scored = device.recommend(engagements, k=10)  # the SDK's own path: UploadHistory, Score by profile
    assert scored.receipt is not None
    weights = history_weights(engagements, manifest.index_of, manifest.item_count)
    model = sharded.model
    want = model.embeddings @ (model.embeddings.T @ weights) + model.popularity_weight * model.popularity
    assert np.max(np.abs(scored.scores - want)) < 1e-4
    mine = rank_feed(scored.scores, 10, manifest.creator_of, seen=seen, per_creator_cap=2)
    assert [item.item_id for item in feed] == [manifest.item_ids[i] for i in mine]
    for index in (0, 1):  # both shards did encrypted work for that feed, the coordinator none
        assert "scored blocks" in (mesh.logs / f"shard{index}.log").read_text()
    assert "scored blocks" not in (mesh.logs / "recommender.log").read_text()
    # The feed as one shard gives it: the same ciphertexts scored by the one recommender.
    same_as_one_shard(sharded, sharded.devices[0].u, weights)


def refused_by_the_missing_shard(call) -> None:
    """``call`` fails with the coordinator's own refusal for shard 1: UNAVAILABLE, not the
    client's DEADLINE_EXCEEDED (the coordinator did not hang on the shard)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (info.value.code(), info.value.details())
    error = error_info_of(info.value)
    assert error is not None and error.reason == Reason.DEPENDENCY_UNAVAILABLE.value
    assert dict(error.metadata) == {"dependency": "shard", "shard": "1"}


def check_receipts(sm: ShardedMesh, load: Load) -> None:
    """Every acknowledged receipt verified to its anchor and in the log exactly once; the
    coordinator's spool drained with nothing quarantined; the ledger's store consistent."""
    state = sm.mesh.options.state_dir
    wait_receipts_delivered(sm.devices[0].client, sm.trust, sm.chain_url, load, state)
    store = LedgerStore(f"sqlite:///{state / 'ledger' / 'ledger.db'}", serving=False)
    try:
        report = check_log_holds_each_once(store, sm.trust, load)
    finally:
        store.close()
    assert report.ok, report.problems


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_shard_away_under_load_gives_unavailable_at_once_and_its_return_scores_exactly_again(sharded, fault):
    mesh, probe = sharded.mesh, sharded.probe
    shard = mesh.children["shard1"]
    coordinator_pid = mesh.children["recommender"].pid
    rng = np.random.default_rng(41 if fault == "killed" else 43)
    u = rng.normal(size=sharded.model.dim)
    u /= np.linalg.norm(u)
    weights = rng.random(sharded.model.item_count)
    probe.upload_profile(u)  # uploads need no shard; scoring them does
    history_ref = probe.upload_history(weights)
    load = Load(sharded.devices, fresh=True)  # the coordinator's result cache would answer repeats
    stop = threading.Event()
    threads = load.run(stop)
    try:
        wait_until(lambda: load.successes >= PER_PHASE, 120, "successes before the fault")
        if fault == "killed":
            mesh.kill("shard1")
        else:
            shard.pause()  # alive, connected, silent: only the coordinator's shard deadline ends a call
        during = load.attempts
        refused_by_the_missing_shard(lambda: probe.score(u))  # inline
        refused_by_the_missing_shard(lambda: probe.score(u, use_profile=True))  # by profile
        refused_by_the_missing_shard(lambda: probe.score_profile(history_ref))  # by history
        refused_by_the_missing_shard(lambda: probe.upload_history(weights * 2))
        # What needs no shard is still served by the same coordinator.
        assert probe.model_info().version == sharded.model.version
        assert probe.manifest(refresh=True).item_count == sharded.model.item_count
        assert probe.upload_profile(u)
        wait_until(lambda: load.attempts >= during + PER_PHASE, 120, "the load's requests while the shard is away")
        if fault == "killed":
            mesh.restart("shard1")
        else:
            shard.resume()
        after = load.successes
        wait_until(lambda: load.successes >= after + PER_PHASE, 180, "successes after the shard's return")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
        if fault == "frozen":
            shard.resume()  # never leave a stopped process behind a failed assertion
    print(f"load: {load.successes} answers, {load.unavailable} UNAVAILABLE retried, {len(load.receipts)} receipts")
    assert load.unavailable > 0  # the load saw the shard away, and retried
    assert mesh.children["recommender"].pid == coordinator_pid  # the same coordinator throughout
    same_as_one_shard(sharded, u, weights)
    check_receipts(sharded, load)


def test_the_sharded_mesh_stops_every_process_cleanly(sharded):
    mesh = sharded.mesh
    procs = {name: mesh.children[name].proc for name in mesh.order}
    mesh.down()
    for name, proc in procs.items():
        assert proc is not None and proc.poll() is not None, f"{name} still running"
        if name != "anvil":  # anvil answers SIGTERM with its own status
            assert proc.returncode == 0, f"{name} exited with {proc.returncode}"
