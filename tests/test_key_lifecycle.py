"""Key ids across two recommender replicas sharing one Redis: rotate, disable, destroy, outages,
profiles, the result cache, and memory bounded however many users come and go."""

import grpc
import numpy as np
import psutil
import pytest
from eth_account import Account

from cipherfeed.cache import Keys
from cipherfeed.client import keystore
from cipherfeed.client.sdk import RECOMMENDER
from cipherfeed.he.params import MESH_PARAMS
from cipherfeed.v1 import keyservice_pb2, keyservice_pb2_grpc
from services.recommender.server import serve as serve_recommender
from tests.conftest import client_for, mesh_pki, recommender_config


@pytest.fixture(scope="module")
def replica_b(tiktok_model, keyservice, redis_server, tmp_path_factory):
    config = recommender_config(
        tmp_path_factory.mktemp("replica-b"), keyservice[0], redis_server.config_for("recommender")
    )
    running, core = serve_recommender(config, tiktok_model)
    yield running.port, core
    running.stop(grace=1)
    core.close()


@pytest.fixture()
def fresh_client(recommender, keyservice, tmp_path):
    c = client_for(recommender[0], keyservice[0], tmp_path)
    c.use_keys()
    c.register()
    yield c
    c.close()


def on(client, port, keyservice_port, tmp_path):
    """The same user (same keys and key id) talking to another replica."""
    other = client_for(port, keyservice_port, tmp_path)
    other.keys, other.key_id, other.key_version = client.keys, client.key_id, client.key_version
    other.account = client.account
    return other


def unit(seed):
    u = np.random.default_rng(seed).standard_normal(64)
    return u / np.linalg.norm(u)


def refused(fn, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


def test_disable_is_refused_by_every_replica_on_the_next_request(
    fresh_client, recommender, replica_b, keyservice, tmp_path
):
    a = fresh_client
    b = on(a, replica_b[0], keyservice[0], tmp_path)
    u = unit(1)
    query = a.encrypt_query(u)
    first = a.score_ciphertext(query)
    assert not first.from_cache
    recommender[1].results.flush()  # results are written behind the response
    retried = b.score_ciphertext(query)  # same bytes on the other replica: from the shared cache
    assert retried.from_cache
    np.testing.assert_array_equal(retried.scores, first.scores)
    a.disable()
    for replica in (a, b):  # no wait: the very next request is refused, cached result or not
        err = refused(replica.score_ciphertext, query)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "DISABLED" in err.details()
    a.enable()
    assert b.score(unit(2)).scores.size
    b.close()


def test_rotation_keeps_old_versions_until_the_minimum_is_raised(fresh_client, replica_b, keyservice, tmp_path):
    a = fresh_client
    v1_keys, v1 = a.keys, a.key_version
    v2 = a.rotate(keystore.generate(MESH_PARAMS))
    assert (v1, v2) == (1, 2)
    b = on(a, replica_b[0], keyservice[0], tmp_path)
    new = b.score(unit(3))  # v2 keys, fetched by replica B from Redis or the key service
    old = client_for(replica_b[0], keyservice[0], tmp_path)
    old.keys, old.key_id, old.key_version, old.account = v1_keys, a.key_id, v1, a.account
    assert old.score(unit(3)).scores.size == new.scores.size  # v1 still usable
    a.rotate(keystore.generate(MESH_PARAMS), min_version=3)
    err = refused(old.score, unit(4))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "retired" in err.details()
    assert a.score(unit(4)).scores.size
    b.close()
    old.close()


def test_destroy_removes_material_everywhere(fresh_client, replica_b, keyservice, redis_server, tmp_path):
    a = fresh_client
    b = on(a, replica_b[0], keyservice[0], tmp_path)
    b.score(unit(5))
    key_id = a.key_id
    r = redis_server.client()
    assert r.exists(Keys.eval_keys(key_id, 1))
    record = a.destroy()
    assert record.state == keyservice_pb2.DESTROYED and not record.versions[0].material_sha256
    assert not r.exists(Keys.eval_keys(key_id, 1))
    for replica in (a, b):
        assert refused(replica.score, unit(5)).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not any(t.startswith(key_id) for t in replica_b[1].installed._lru)
    as_recommender = keyservice_pb2_grpc.KeyServiceStub(mesh_pki().channel(keyservice[0], "keyservice", "recommender"))
    err = refused(as_recommender.GetEvalKeys, keyservice_pb2.GetKeyRequest(key_id=key_id), timeout=5)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    err = refused(a.enable)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    _, ks_core = keyservice
    assert ks_core.store.material(key_id, 1) is None  # the tombstone keeps the id, not the keys
    b.close()


def test_scoring_survives_redis_going_away_and_caching_resumes(fresh_client, recommender, keyservice, redis_server):
    a = fresh_client
    _, core = recommender
    reference = a.score(unit(6)).scores
    redis_server.stop()
    try:
        during = a.score(unit(6))  # state from the key service, keys still installed in process
        np.testing.assert_allclose(during.scores, reference, atol=1e-4)
        assert not during.from_cache
        a.disable()
        assert refused(a.score, unit(6)).code() == grpc.StatusCode.FAILED_PRECONDITION  # still enforced
        a.enable()
    finally:
        redis_server.restart()  # empty, like a flushed cache
    # Both circuit breakers would ask Redis again within a second by themselves; do it now.
    core.cache.retry_now()
    keyservice[1].cache.retry_now()
    query = a.encrypt_query(unit(7))
    a.score_ciphertext(query)
    r = redis_server.client()
    assert r.exists(Keys.key_state(a.key_id))  # caching resumed by itself
    assert a.score_ciphertext(query).from_cache


def test_profiles_score_by_reference_and_reupload_after_a_flush(fresh_client, redis_server):
    a = fresh_client
    u = unit(8)
    inline = a.score(u).scores
    ref = a.upload_profile(u)
    by_ref = a.score(u, use_profile=True)
    np.testing.assert_allclose(by_ref.scores, inline, atol=1e-4)
    assert by_ref.query_bytes == 0  # only the reference went over the wire
    redis_server.client().flushall()
    again = a.score(u, use_profile=True)  # NOT_FOUND, re-upload, retry: transparent
    np.testing.assert_allclose(again.scores, inline, atol=1e-4)
    assert a._profile is not None and a._profile[1] != ref


def test_profile_uploaded_under_another_key_is_refused(fresh_client, client):
    ref = fresh_client.upload_profile(unit(9))
    from cipherfeed.v1 import recommender_pb2

    request = recommender_pb2.ScoreRequest(key=client._key_ref(), profile_ref=ref)
    err = refused(client.stub.Score, client._authorize(RECOMMENDER, "Score", client.key_id, request), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_memory_stays_bounded_as_many_users_come_and_go(tiktok_model, keyservice, redis_server, tmp_path):
    config = recommender_config(tmp_path, keyservice[0], redis_server.config_for("recommender"), max_keys=2)
    running, core = serve_recommender(config, tiktok_model)
    shared = keystore.generate(MESH_PARAMS)  # one rotation-key set, many public keys: same bytes per user
    process = psutil.Process()
    rss = []
    try:
        for i in range(24):
            user = client_for(running.port, keyservice[0], tmp_path / f"u{i}")
            user.keys, user.account = keystore.load_test_keys(shared), Account.create()
            user.register()
            user.score(unit(100 + i))
            user.close()
            assert core.installed.count <= 2
            assert core.installed.bytes <= 2 * len(shared.rotation_key_bytes)
            rss.append(process.memory_info().rss)
    finally:
        running.stop(grace=1)
        core.close()
    assert core.installed.stats.evictions >= 22
    assert not core.keys._fetch_locks  # nothing per user outlives its fetch
    # 20 more users' keys (~14 MB each, more once deserialized) would add ~300 MB if kept.
    assert rss[-1] - rss[3] < 120 * 2**20, [r // 2**20 for r in rss]
