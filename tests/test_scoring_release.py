"""A Score's memory is freed when it ends, not when Python's cyclic collector next runs.

Under the load benchmark the recommender's in-use heap climbed by ~250 MB between collections and
its RSS by +39 % (README, load section): each Score's rotation tree was a reference cycle holding
its rotations. These tests keep the collector off, score, and then ask it what it would have had
to free: no cyclic garbage may hold a ciphertext or an array.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openfhe
import pytest

from cipherfeed.client import keystore
from cipherfeed.he import globalkeys, packing
from cipherfeed.he.params import MESH_PARAMS
from services.recommender.scoring import EncryptedScorer
from services.recommender.synthetic import synthetic_catalogue


def _heavy(obj: object) -> bool:
    return isinstance(obj, openfhe.Ciphertext) or (isinstance(obj, np.ndarray) and obj.nbytes >= 4096)


def _holds_material(obj: object) -> bool:
    """``obj`` is, or refers to, a ciphertext or an array, directly or through containers the
    collector does not track (a dict of ciphertexts is untracked: pybind11 objects are not
    containers to it), which therefore never show up in ``gc.garbage`` themselves."""
    if _heavy(obj):
        return True
    pending = list(gc.get_referents(obj))
    while pending:
        r = pending.pop()
        if _heavy(r):
            return True
        if isinstance(r, (dict, list, tuple)) and not gc.is_tracked(r):
            pending.extend(gc.get_referents(r))
    return False


def cyclic_garbage_holding_material() -> list[object]:
    """What the collector finds unreachable now, restricted to what holds (or is) a ciphertext or
    an array of at least 4 KB. Collected with DEBUG_SAVEALL and then freed."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = [o for o in gc.garbage if _holds_material(o)]
        described = [f"{type(o).__name__} {getattr(o, '__qualname__', '')}".strip() for o in found]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()  # the saved objects are cycles again: free them now
    return described


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("strategy", ["bsgs", "flat"])
@pytest.mark.parametrize("kernel", ["native", "openfhe"])
def test_a_score_leaves_no_cycle_holding_its_rotations(strategy, kernel, collector_off):
    from cipherfeed.he import rnsmac

    if kernel == "native" and not rnsmac.available():
        pytest.skip("cipherfeed/he/_rnsmac.c was not compiled")
    model = synthetic_catalogue(17_000, seed=3)  # 3 blocks, the last one folded
    keys = keystore.generate(MESH_PARAMS)
    cc = keys.cc
    tag = "release-test"
    globalkeys.file(cc, openfhe.DeserializeEvalKeyMapString(keys.rotation_key_bytes, openfhe.BINARY), tag)
    u = np.random.default_rng(4).standard_normal(64)
    query = cc.Encrypt(
        keys.public_key, cc.MakeCKKSPackedPlaintext(packing.replicate_query(u / np.linalg.norm(u), 64, 4096))
    )
    query.SetKeyTag(tag)
    try:
        with ThreadPoolExecutor(2) as pool:
            scorer = EncryptedScorer(model, MESH_PARAMS, pool, strategy=strategy, kernel=kernel)
            assert cyclic_garbage_holding_material() == []  # the check starts from nothing
            for _ in range(3):
                outputs, _ = scorer.score(query)
                assert len(outputs) == 3
            assert cyclic_garbage_holding_material() == []
    finally:
        globalkeys.drop(cc, tag)


def test_the_check_sees_a_cycle_that_holds_a_ciphertext(collector_off):
    """The probe itself: a ciphertext kept by a cycle of closures (what the rotation tree was)."""
    keys = keystore.generate(MESH_PARAMS)
    ct = keys.cc.Encrypt(keys.public_key, keys.cc.MakeCKKSPackedPlaintext([0.5] * 8))

    def make(ciphertext: openfhe.Ciphertext) -> None:
        held = {0: ciphertext}

        def ping() -> object:
            return pong, held

        def pong() -> object:
            return ping

        ping()

    make(ct)
    del ct
    assert "cell" in cyclic_garbage_holding_material()


def test_a_score_through_the_server_leaves_no_cycle_holding_material(client, collector_off):
    """The whole request path on a real recommender over gRPC (in this process): inline and by
    profile reference."""
    rng = np.random.default_rng(5)
    u = rng.standard_normal(64)
    client.score(u / np.linalg.norm(u))  # keys fetched and installed, lazily built state made
    assert cyclic_garbage_holding_material() == []
    for use_profile in (False, True, False, True):
        u = rng.standard_normal(64)
        client.score(u / np.linalg.norm(u), use_profile=use_profile)
    assert cyclic_garbage_holding_material() == []


@pytest.fixture(scope="module")
def two_shards(keyservice, redis_server, tmp_path_factory):
    from tests.test_shard import Mesh

    m = Mesh(synthetic_catalogue(17_000, seed=13), keyservice, redis_server, tmp_path_factory.mktemp("release"))
    try:
        running, _ = m.coordinator("coordinator", m.shards(2, "shard"))
        m.device = m.client(running.port)
        yield m
    finally:
        m.close()


def test_a_sharded_score_leaves_no_cycle_holding_material(two_shards, collector_off):
    """A coordinator (which rotates the query for its shards) and two shards, all in this process."""
    device = two_shards.device
    rng = np.random.default_rng(6)
    u = rng.standard_normal(64)
    device.score(u / np.linalg.norm(u))
    assert cyclic_garbage_holding_material() == []
    for use_profile in (False, True, False, True):
        u = rng.standard_normal(64)
        device.score(u / np.linalg.norm(u), use_profile=use_profile)
    assert cyclic_garbage_holding_material() == []
