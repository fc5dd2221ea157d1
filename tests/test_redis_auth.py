"""Redis is not trusted: each service has its own ACL user, and what a recommender reads back (key
states, key sets, profiles, results) counts only when the key service or a recommender sealed it.
A value planted by anyone else is ignored, counted, and the source of truth is asked instead."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import redis

from cipherfeed.cache import Keys, Sealer, read_secret_file
from cipherfeed.he.packing import plaintext_scores
from cipherfeed.keystate import KeyState, KeyStatus
from tests.conftest import client_for


def unit(i: int) -> np.ndarray:
    return np.eye(64)[i]


@pytest.fixture()
def fresh(recommender, keyservice, tmp_path):
    made = []

    def make(name: str):
        c = client_for(recommender[0], keyservice[0], tmp_path / name)
        c.use_keys()
        c.register()
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def clear_scores(model, u):
    return plaintext_scores(model.embeddings, u, model.popularity, model.popularity_weight)


def test_each_service_has_its_own_user_and_the_recommender_cannot_write_key_states(redis_server):
    admin = redis_server.client()
    rec = redis_server.client("recommender")
    ks = redis_server.client("keyservice")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=redis_server.port).ping()  # `default` is off
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=redis_server.port, username="recommender", password="guess").ping()
    ks.set("cf:keystate:acl-test", b"state")
    assert rec.get("cf:keystate:acl-test") == b"state"  # read...
    with pytest.raises(redis.exceptions.NoPermissionError):
        rec.set("cf:keystate:acl-test", b"forged")  # ...but never written
    with pytest.raises(redis.exceptions.NoPermissionError):
        rec.delete("cf:keystate:acl-test")
    with pytest.raises(redis.exceptions.NoPermissionError):
        rec.set("other:key", b"x")  # nothing outside its own patterns
    with pytest.raises(redis.exceptions.NoPermissionError):
        rec.flushall()
    rec.set("cf:result:acl-test", b"r", ex=60)
    with pytest.raises(redis.exceptions.NoPermissionError):
        ks.get("cf:result:acl-test")  # the key service reads nothing
    with pytest.raises(redis.exceptions.NoPermissionError):
        ks.set("cf:profile:acl-test", b"p")
    assert admin.get("cf:keystate:acl-test") == b"state"
    for user in ("keyservice", "recommender", "admin"):
        assert redis_server.password_file(user).stat().st_mode & 0o777 == 0o600
    assert redis_server.mac_key_file.stat().st_mode & 0o777 == 0o600
    admin.delete("cf:keystate:acl-test", "cf:result:acl-test")
    for c in (admin, rec, ks):
        c.close()


def test_a_planted_key_state_no_longer_disables_a_user(fresh, recommender, redis_server, tiktok_model):
    victim = fresh("victim")
    _, core = recommender
    admin = redis_server.client()
    planted = KeyStatus(victim.key_id, KeyState.DISABLED, 1, 1, {1: "00" * 32})
    before = core.cache.stats.rejected
    admin.set(Keys.key_state(victim.key_id), planted.to_json(), ex=60)  # the unsealed JSON that used to count
    scored = victim.score(unit(3))
    np.testing.assert_allclose(scored.scores, clear_scores(tiktok_model, unit(3)), atol=1e-4)
    assert core.cache.stats.rejected == before + 1
    # Sealed by the mesh, but for another key (moved) or long ago (replayed): still not believed.
    sealer = Sealer(read_secret_file(redis_server.mac_key_file, "key"))
    other = KeyStatus("ab" * 32, KeyState.DISABLED, 1, 1, {1: "00" * 32})
    admin.set(Keys.key_state(victim.key_id), sealer.seal(Keys.key_state("ab" * 32), other.to_json()))
    victim.score(unit(4))
    replay = sealer.seal(Keys.key_state(victim.key_id), planted.to_json(), now=1_700_000_000.0)
    admin.set(Keys.key_state(victim.key_id), replay)
    victim.score(unit(5))
    assert core.cache.stats.rejected == before + 3
    admin.close()


def test_a_planted_key_set_no_longer_makes_scores_garbage(fresh, recommender, keyservice, redis_server, tiktok_model):
    victim, attacker = fresh("victim"), fresh("attacker")
    _, core = recommender
    _, ks_core = keyservice
    theirs = ks_core.store.material(attacker.key_id, 1)  # valid rotation keys, of another key pair
    admin = redis_server.client()
    forged_state = KeyStatus(victim.key_id, KeyState.ENABLED, 1, 1, {1: theirs.sha256.hex()})
    admin.set(Keys.key_state(victim.key_id), forged_state.to_json(), ex=60)
    admin.set(Keys.eval_keys(victim.key_id, 1), theirs.to_bytes(), ex=60)
    before = core.cache.stats.rejected
    scored = victim.score(unit(6))  # first request: the keys are fetched and installed now
    np.testing.assert_allclose(scored.scores, clear_scores(tiktok_model, unit(6)), atol=1e-4)
    assert core.cache.stats.rejected == before + 2  # the state, then the key set against the true digest
    assert core.installed.stats.fetched_from_keyservice >= 1
    admin.close()


def test_a_planted_result_or_profile_is_not_served(fresh, recommender, redis_server, tiktok_model):
    user = fresh("user")
    _, core = recommender
    admin = redis_server.client()
    query = user.encrypt_query(unit(7))
    name = Keys.result(core.model_version, user.key_id, 1, hashlib.sha256(query).hexdigest())
    admin.set(name, b"\x00" * 64, ex=60)
    before = core.cache.stats.rejected
    scored = user.score_ciphertext(query)
    assert not scored.from_cache
    np.testing.assert_allclose(scored.scores, clear_scores(tiktok_model, unit(7)), atol=1e-4)
    assert core.cache.stats.rejected == before + 1
    ref = user.upload_profile(unit(8))
    admin.set(Keys.profile(ref), json.dumps({"forged": True}).encode(), ex=60)
    again = user.score(unit(8), use_profile=True)  # the planted profile reads as expired: re-uploaded
    np.testing.assert_allclose(again.scores, clear_scores(tiktok_model, unit(8)), atol=1e-4)
    assert core.cache.stats.rejected == before + 2
    admin.close()
