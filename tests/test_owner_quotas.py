"""Per-owner quotas in the key service, the Score rate limit per owner in the recommender, and the
operator's power to disable any key, over real gRPC."""

from dataclasses import replace

import grpc
import numpy as np
import pytest
from eth_account import Account

from cipherfeed.client import keystore
from cipherfeed.config import OwnerQuotas, ScoreRateLimit
from cipherfeed.grpcutil import reason_of, retry_delay_of
from cipherfeed.v1 import keyservice_pb2, keyservice_pb2_grpc
from services.keyservice.server import serve as serve_keyservice
from services.recommender.server import serve as serve_recommender
from tests.conftest import client_for, keyservice_config, recommender_config

STATUS = grpc.StatusCode


def unit(seed):
    u = np.random.default_rng(seed).standard_normal(64)
    return u / np.linalg.norm(u)


@pytest.fixture(scope="module")
def shared_keys(client):
    return client.keys  # one rotation-key set; each user below gets a fresh public key (a new key id)


@pytest.fixture(scope="module")
def small_keyservice(redis_server, master_key_file, tmp_path_factory, shared_keys):
    size = len(shared_keys.public_key_bytes) + len(shared_keys.rotation_key_bytes)
    config = replace(
        keyservice_config(tmp_path_factory.mktemp("quota-ks"), master_key_file, redis_server.config_for("keyservice")),
        owner_quotas=OwnerQuotas(max_keys=3, max_bytes=int(4.5 * size)),
    )
    running, core = serve_keyservice(config)
    yield running.port, core, size
    running.stop(grace=1)
    core.close()


def user(keyservice_port, home, shared, account, recommender_port=0):
    c = client_for(recommender_port, keyservice_port, home)
    c.keys, c.account = keystore.load_test_keys(shared), account
    return c


def test_a_registration_flood_from_one_owner_stops_at_the_quota(small_keyservice, shared_keys, tmp_path):
    port, core, size = small_keyservice
    flooder = Account.create()
    outcomes = []
    for i in range(6):
        c = user(port, tmp_path / f"f{i}", shared_keys, flooder)
        try:
            c.register()
            outcomes.append("ok")
        except grpc.RpcError as exc:
            outcomes.append(exc.code())
            assert "limit per owner is 3" in exc.details() and reason_of(exc) == "OWNER_QUOTA"
        finally:
            c.close()
    assert outcomes == ["ok"] * 3 + [STATUS.RESOURCE_EXHAUSTED] * 3
    assert core.store.owner_usage(flooder.address) == (3, 3 * size)  # the disk stopped growing at 3 keys
    bystander = user(port, tmp_path / "b", shared_keys, Account.create())
    bystander.register()  # another owner is not affected
    # Destroying a key gives its share back.
    victim = user(port, tmp_path / "v", shared_keys, flooder)
    victim.key_id = core.store.db.query("SELECT key_id FROM he_keys WHERE owner = ? LIMIT 1", (flooder.address,))[0][0]
    victim.destroy()
    victim.keys = keystore.load_test_keys(shared_keys)
    victim.register()
    victim.close()
    bystander.close()


def test_stored_bytes_per_owner_are_bounded_across_rotations(small_keyservice, shared_keys, tmp_path):
    port, core, size = small_keyservice
    owner = Account.create()
    first = user(port, tmp_path / "a", shared_keys, owner)
    first.register()
    first.rotate(keystore.load_test_keys(shared_keys))  # 2 key sets
    second = user(port, tmp_path / "b", shared_keys, owner)
    second.register()  # 3 key sets, 2 keys
    second.rotate(keystore.load_test_keys(shared_keys))  # 4 key sets
    with pytest.raises(grpc.RpcError) as info:
        first.rotate(keystore.load_test_keys(shared_keys))  # a 5th would pass 4.5 sets' bytes
    assert info.value.code() == STATUS.RESOURCE_EXHAUSTED and "bytes" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        user(port, tmp_path / "c", shared_keys, owner).register()
    assert info.value.code() == STATUS.RESOURCE_EXHAUSTED
    assert core.store.owner_usage(owner.address) == (2, 4 * size)
    first.close()
    second.close()


@pytest.fixture(scope="module")
def limited_recommender(tiktok_model, keyservice, redis_server, tmp_path_factory):
    config = replace(
        recommender_config(
            tmp_path_factory.mktemp("limited"), keyservice[0], redis_server.config_for("recommender"), max_keys=2
        ),
        score_rate=ScoreRateLimit(per_second=0.05, burst=2),
    )
    running, core = serve_recommender(config, tiktok_model)
    yield running.port, core
    running.stop(grace=1)
    core.close()


def test_scores_are_rate_limited_per_owner_with_retry_info(limited_recommender, keyservice, shared_keys, tmp_path):
    port, _ = limited_recommender
    heavy = user(keyservice[0], tmp_path / "h", shared_keys, Account.create(), port)
    heavy.register()
    heavy.score(unit(1))
    heavy.score(unit(2))
    with pytest.raises(grpc.RpcError) as info:
        heavy.score(unit(3))
    err = info.value
    assert err.code() == STATUS.RESOURCE_EXHAUSTED and "too many scores" in err.details()
    assert reason_of(err) == "RATE_LIMITED"
    assert 0 < retry_delay_of(err) <= 20  # one token back at 0.05/s
    # A second key of the same owner shares the owner's bucket; another owner has its own.
    same_owner = user(keyservice[0], tmp_path / "s", shared_keys, heavy.account, port)
    same_owner.register()
    with pytest.raises(grpc.RpcError) as info:
        same_owner.score(unit(4))
    assert info.value.code() == STATUS.RESOURCE_EXHAUSTED
    light = user(keyservice[0], tmp_path / "l", shared_keys, Account.create(), port)
    light.register()
    assert light.score(unit(5)).scores.size
    for c in (heavy, same_owner, light):
        c.close()


@pytest.fixture(scope="module")
def operator_stub(keyservice, pki):
    """The key service as the mesh's operator sees it: mutual TLS with the operator's certificate."""
    with pki.channel(keyservice[0], "keyservice", "operator") as ch:
        yield keyservice_pb2_grpc.KeyServiceStub(ch)


def test_an_operator_may_disable_any_key_and_the_audit_says_who(operator_stub, recommender, keyservice, tmp_path):
    owner = client_for(recommender[0], keyservice[0], tmp_path)
    owner.use_keys()
    owner.register()
    request = keyservice_pb2.KeyStateRequest(key_id=owner.key_id)
    assert operator_stub.DisableKey(request, timeout=5).state == keyservice_pb2.DISABLED
    with pytest.raises(grpc.RpcError) as info:
        owner.score(unit(7))
    assert info.value.code() == STATUS.FAILED_PRECONDITION
    # Disabling is the operator's only power over a key: enabling, rotating, destroying are the owner's.
    for method in ("EnableKey", "DestroyKey"):
        with pytest.raises(grpc.RpcError) as info:
            getattr(operator_stub, method)(request, timeout=5)
        assert info.value.code() == STATUS.UNAUTHENTICATED
    owner.enable()
    entries = operator_stub.ListAudit(keyservice_pb2.ListAuditRequest(key_id=owner.key_id), timeout=5).entries
    assert [e.action for e in entries] == ["key.register", "key.disabled", "key.enabled"]
    assert '"by": "operator:operator"' in entries[1].detail
    assert f'"by": "{owner.account.address}"' in entries[2].detail
    whole = operator_stub.ListAudit(keyservice_pb2.ListAuditRequest(limit=1000), timeout=5).entries
    assert owner.key_id in {e.subject for e in whole}  # operators read the whole log
    assert owner.score(unit(7)).scores.size
    owner.close()
