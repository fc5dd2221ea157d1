"""Encrypted scoring without gRPC: several blocks, a ragged last block, the popularity prior."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openfhe
import pytest

from cipherfeed.client import keystore
from cipherfeed.he import globalkeys, packing, rnsmac
from cipherfeed.he.params import MESH_PARAMS
from services.recommender.scoring import EncryptedScorer
from services.recommender.synthetic import synthetic_catalogue


@pytest.mark.parametrize("strategy", ["flat", "bsgs"])
@pytest.mark.parametrize(("items", "fold"), [(20_000, 2), (17_000, 4), (21_384, 1)])
def test_synthetic_catalogue_scores_match_plaintext_across_blocks(strategy, items, fold):
    model = synthetic_catalogue(items, seed=7)  # 3 blocks, the last one ragged: folded or not
    keys = keystore.generate(MESH_PARAMS)
    cc = keys.cc
    tag = "engine-test"
    globalkeys.file(cc, openfhe.DeserializeEvalKeyMapString(keys.rotation_key_bytes, openfhe.BINARY), tag)
    with ThreadPoolExecutor(2) as pool:
        scorer = EncryptedScorer(model, MESH_PARAMS, pool, strategy=strategy)
        assert scorer.strategy == strategy
        assert scorer.block_count == 3
        assert scorer.tail_fold == fold
        rng = np.random.default_rng(1)
        u = rng.standard_normal(64)
        u /= np.linalg.norm(u)
        ct = cc.Encrypt(keys.public_key, cc.MakeCKKSPackedPlaintext(packing.replicate_query(u, 64, 4096)))
        ct.SetKeyTag(tag)
        outputs, timing = scorer.score(ct)
    globalkeys.drop(cc, tag)
    assert scorer.kernel == ("native" if rnsmac.available() else "openfhe")
    cts = [openfhe.DeserializeCiphertextString(o, openfhe.BINARY) for o in outputs]
    assert all(ct.GetLevel() == 1 for ct in cts)  # one limb left: the smallest modulus
    decrypted = []
    for o in cts:
        pt = cc.Decrypt(keys.secret_key, o)
        pt.SetLength(4096)
        decrypted.append(np.asarray(pt.GetCKKSPackedValue()))
    got = packing.unpack_scores(decrypted, model.item_count, 4096, scorer.tail_fold, 64)
    want = packing.plaintext_scores(model.embeddings, u, model.popularity, model.popularity_weight)
    assert np.max(np.abs(got - want)) < 1e-4
    assert list(np.argsort(-got)[:10]) == list(np.argsort(-want)[:10])
    assert timing.rotations_ms > 0 and timing.blocks_ms > 0


@pytest.mark.skipif(not rnsmac.available(), reason="cipherfeed/he/_rnsmac.c was not compiled")
@pytest.mark.parametrize("strategy", ["flat", "bsgs"])
@pytest.mark.parametrize("items", [20_000, 17_000, 21_384])  # the last block folded 2, 4 ways, not folded
def test_the_native_kernel_returns_openfhes_bytes_exactly(strategy, items):
    model = synthetic_catalogue(items, seed=11)
    keys = keystore.generate(MESH_PARAMS)
    cc = keys.cc
    tag = "kernel-test:1"
    globalkeys.file(cc, openfhe.DeserializeEvalKeyMapString(keys.rotation_key_bytes, openfhe.BINARY), tag)
    u = np.random.default_rng(2).standard_normal(64)
    ct = cc.Encrypt(
        keys.public_key, cc.MakeCKKSPackedPlaintext(packing.replicate_query(u / np.linalg.norm(u), 64, 4096))
    )
    ct.SetKeyTag(tag)
    with ThreadPoolExecutor(2) as pool:
        native = EncryptedScorer(model, MESH_PARAMS, pool, strategy=strategy, kernel="native")
        reference = EncryptedScorer(model, MESH_PARAMS, pool, strategy=strategy, kernel="openfhe")
        got, _ = native.score(ct)
        want, _ = reference.score(ct)
    globalkeys.drop(cc, tag)
    assert len(got) == 3
    assert got == want  # every coefficient, the level, scale and key tag: the same serialization


def test_an_unknown_or_unbuilt_kernel_is_refused():
    model = synthetic_catalogue(100, seed=1)
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="unknown scoring kernel"):
            EncryptedScorer(model, MESH_PARAMS, pool, kernel="gpu")
        if not rnsmac.available():
            with pytest.raises(RuntimeError, match="not built"):
                EncryptedScorer(model, MESH_PARAMS, pool, kernel="native")


def test_a_failing_rotation_is_raised_not_waited_for():
    model = synthetic_catalogue(9_000, seed=3)
    keys = keystore.generate(MESH_PARAMS)
    cc = keys.cc
    with ThreadPoolExecutor(2) as pool:
        scorer = EncryptedScorer(model, MESH_PARAMS, pool)
        ct = cc.Encrypt(keys.public_key, cc.MakeCKKSPackedPlaintext(packing.replicate_query(np.ones(64) / 8, 64, 4096)))
        ct.SetKeyTag("no-keys-filed-under-this-tag")
        with pytest.raises(RuntimeError, match="not generated"):
            scorer.score(ct)
