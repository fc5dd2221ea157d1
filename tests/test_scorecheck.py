"""The device's score-ciphertext templates match every layout the real scorer writes, and nothing else.

``cipherfeed.he.scorecheck`` derives its templates from the operations the scorer ends with; here
the real ``EncryptedScorer`` (both kernels, both strategies, a folded last block) scores a query
encrypted under a reloaded public key, as a device's is, and every block it writes must load and
decrypt to the plaintext scores. Scoring by history goes through the same checks in the SDK tests
against the real mesh (tests/test_history.py, tests/test_hostile_server.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openfhe
import pytest

from cipherfeed.he import globalkeys, packing, rnsmac, scorecheck, wire
from cipherfeed.he.codec import MaterialError, serialize
from cipherfeed.he.keymap import installed_tag
from cipherfeed.he.params import MESH_PARAMS
from services.recommender.scoring import EncryptedScorer
from services.recommender.synthetic import synthetic_catalogue

KEY_ID = "5e" * 32
KERNELS = (
    [("native", "bsgs"), ("openfhe", "flat")] if rnsmac.available() else [("openfhe", "bsgs"), ("openfhe", "flat")]
)


@pytest.fixture(scope="module")
def model():
    return synthetic_catalogue(17_000, seed=5)  # 3 blocks, the last one folded 4 times


@pytest.fixture(scope="module")
def checker():
    return scorecheck.for_params(MESH_PARAMS)


def scored(model, kernel: str, strategy: str, tag: str):
    """The scorer's packed blocks for a random unit query, the secret key and the query."""
    with ThreadPoolExecutor(2) as pool:
        scorer = EncryptedScorer(model, MESH_PARAMS, pool, strategy=strategy, kernel=kernel)
        cc = scorer.cc
        kp = cc.KeyGen()
        keys = globalkeys.generate_serialized(cc, kp.secretKey, MESH_PARAMS.rotation_indices, kp.publicKey.GetKeyTag())
        generation = globalkeys.file(cc, openfhe.DeserializeEvalKeyMapString(keys, openfhe.BINARY), tag)
        loaded_pk = openfhe.DeserializePublicKeyString(serialize(kp.publicKey), openfhe.BINARY)
        u = np.random.default_rng(7).standard_normal(model.dim)
        u /= np.linalg.norm(u)
        values = packing.replicate_query(u, MESH_PARAMS.padded_dim, MESH_PARAMS.slots)
        query = scorecheck.for_params(MESH_PARAMS).codec.load_query(
            serialize(cc.Encrypt(loaded_pk, cc.MakeCKKSPackedPlaintext(values)))
        )
        query.SetKeyTag(tag)
        try:
            with globalkeys.EVAL_KEY_LOCK.read():
                blobs, _ = scorer.score(query, lambda b, blob: wire.pack(blob, (MESH_PARAMS.ring_dimension,)))
        finally:
            globalkeys.drop(cc, tag, generation)
        return blobs, kp.secretKey, u, scorer.tail_fold, cc


@pytest.mark.parametrize(("kernel", "strategy"), KERNELS)
def test_every_block_the_scorer_writes_loads_and_decrypts_right(model, checker, kernel, strategy):
    tag = installed_tag(KEY_ID, 1)
    blobs, secret, u, fold, cc = scored(model, kernel, strategy, tag)
    decrypted = []
    for blob in blobs:
        pt = cc.Decrypt(secret, checker.load(blob, tag))
        pt.SetLength(MESH_PARAMS.slots)
        decrypted.append(np.asarray(pt.GetCKKSPackedValue()))
    got = packing.unpack_scores(decrypted, model.item_count, MESH_PARAMS.slots, fold, MESH_PARAMS.padded_dim)
    want = packing.plaintext_scores(model.embeddings, u, model.popularity, model.popularity_weight)
    assert float(np.abs(got - want).max()) < 1e-4
    lengths = {len(wire.unpack(b)) for b in blobs}
    assert lengths == ({132_013, 132_117} if strategy == "bsgs" else {132_117})  # Horner-joined, one group
    with pytest.raises(MaterialError, match="expected key tag"):
        checker.load(blobs[0], installed_tag("5f" * 32, 1))  # another key's tag, same length
    with pytest.raises(MaterialError, match="bytes"):
        checker.load(blobs[0], installed_tag(KEY_ID, 12))  # a tag of another length: other layouts


def test_a_two_digit_key_version_has_templates_of_its_own(model, checker):
    tag = installed_tag(KEY_ID, 12)
    blobs, *_ = scored(model, *KERNELS[0], tag)
    for blob in blobs:
        checker.load(blob, tag)
    assert {v.length for v in checker.templates(len(tag)).variants} == {132_014, 132_118}


def test_oversized_or_overpromising_blobs_are_refused_before_unpacking(checker, monkeypatch):
    tag = installed_tag(KEY_ID, 1)
    longest = max(v.length for v in checker.templates(len(tag)).variants)
    # A segment header promising 2^24 words of 63 bits, with its words present: 126 MiB unpacked.
    n, bits = 1 << 24, 63
    framing = wire.MAGIC + (1).to_bytes(4, "little") + (0).to_bytes(4, "little") + n.to_bytes(4, "little")
    promising = framing + bytes([bits]) + bytes(wire._packed_size(n, bits)) + (0).to_bytes(4, "little")
    with pytest.raises(wire.WireError, match="unpacks to more than"):
        wire.unpack(promising, limit=longest)

    def never(*args, **kwargs):
        raise AssertionError("unpacked")

    monkeypatch.setattr(wire, "_unpack_words", never)
    for blob in (promising, wire.MAGIC + bytes(longest + 64)):
        with pytest.raises(MaterialError, match="bytes packed"):
            checker.load(blob, tag)
    small = framing + bytes([bits]) + bytes(64) + (0).to_bytes(4, "little")  # promises more than it holds
    with pytest.raises(MaterialError, match="truncated"):
        checker.load(small, tag)
    with pytest.raises(MaterialError, match="tag of 200"):
        checker.load(small, "x" * 200)
