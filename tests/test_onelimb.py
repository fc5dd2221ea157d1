"""Reading and writing a one-limb ciphertext's polynomials inside OpenFHE's serialization."""

import numpy as np
import openfhe
import pytest

from cipherfeed.client import keystore
from cipherfeed.he.codec import serialize
from cipherfeed.he.onelimb import LayoutError, OneLimbLayout
from cipherfeed.he.params import MESH_PARAMS

N = MESH_PARAMS.ring_dimension


@pytest.fixture(scope="module")
def keys():
    return keystore.generate(MESH_PARAMS)


def one_limb(keys, values: np.ndarray, tag: str | None = None) -> openfhe.Ciphertext:
    """values * 1 at scale 2^110 on two limbs, rescaled: values at 2^55 on one limb."""
    cc = keys.cc
    ct = cc.Encrypt(keys.public_key, cc.MakeCKKSPackedPlaintext(values.astype(np.complex128)))
    if tag is not None:
        ct.SetKeyTag(tag)
    ones = cc.MakeCKKSPackedPlaintext(np.ones(MESH_PARAMS.slots, dtype=np.complex128))
    return cc.Rescale(cc.EvalMult(ct, ones))


def decrypt(keys, ct: openfhe.Ciphertext) -> np.ndarray:
    pt = keys.cc.Decrypt(keys.secret_key, ct)
    pt.SetLength(MESH_PARAMS.slots)
    return np.real(np.asarray(pt.GetCKKSPackedValue()))


def test_words_read_and_written_back_are_the_same_bytes(keys):
    blob = serialize(one_limb(keys, np.full(MESH_PARAMS.slots, 0.5)))
    layout = OneLimbLayout.learn(blob, N)
    words = np.empty((2, N), dtype=np.uint64)
    layout.read(blob, words)
    q0 = int(keys.cc.GetModulusCKKS())
    assert int(words.max()) < q0 and np.count_nonzero(words) > N  # reduced, and random-looking
    assert layout.write(blob, words) == blob


def test_another_ciphertexts_polynomials_carry_its_message(keys):
    x, y = np.linspace(-1, 1, MESH_PARAMS.slots), np.linspace(1, -1, MESH_PARAMS.slots)
    a, b = serialize(one_limb(keys, x)), serialize(one_limb(keys, y))
    layout = OneLimbLayout.learn(a, N)
    words = np.empty((2, N), dtype=np.uint64)
    layout.read(b, words)
    moved = openfhe.DeserializeCiphertextString(layout.write(a, words), openfhe.BINARY)
    assert np.max(np.abs(decrypt(keys, moved) - y)) < 1e-6


def test_key_tags_of_any_length_are_found_from_the_end(keys):
    layout = OneLimbLayout.learn(serialize(one_limb(keys, np.zeros(4))), N)  # a 64-hex-digit tag
    short = serialize(one_limb(keys, np.ones(4), tag="k:1"))
    words = np.empty((2, N), dtype=np.uint64)
    layout.read(short, words)
    assert layout.write(short, words) == short


def test_other_layouts_are_refused_not_misread(keys):
    layout = OneLimbLayout.learn(serialize(one_limb(keys, np.zeros(4))), N)
    fresh = keys.cc.Encrypt(keys.public_key, keys.cc.MakeCKKSPackedPlaintext(np.zeros(4, dtype=np.complex128)))
    words = np.empty((2, N), dtype=np.uint64)
    with pytest.raises(LayoutError, match="found 4"):
        layout.read(serialize(fresh), words)  # two limbs: four vectors of n words
    with pytest.raises(LayoutError):
        layout.read(serialize(one_limb(keys, np.zeros(4)))[:-40_000], words)  # c1 cut short
    with pytest.raises(LayoutError, match="expected 2 vectors"):
        OneLimbLayout.learn(serialize(fresh), N)
    with pytest.raises(LayoutError, match="expected 2 vectors"):
        OneLimbLayout.learn(np.random.default_rng(0).bytes(200_000), N)
