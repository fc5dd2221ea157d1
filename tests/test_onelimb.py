"""Reading and writing a one-limb ciphertext's polynomials inside OpenFHE's serialization."""

import struct

import numpy as np
import openfhe
import pytest

from cipherfeed.client import keystore
from cipherfeed.he.codec import serialize
from cipherfeed.he.onelimb import LayoutError, OneLimbLayout
from cipherfeed.he.params import MESH_PARAMS, limb_moduli

N = MESH_PARAMS.ring_dimension


@pytest.fixture(scope="module")
def keys():
    return keystore.generate(MESH_PARAMS)


@pytest.fixture(scope="module")
def q0(keys):
    return limb_moduli(keys.cc)[0]


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


def test_words_read_and_written_back_are_the_same_bytes(keys, q0):
    blob = serialize(one_limb(keys, np.full(MESH_PARAMS.slots, 0.5)))
    layout = OneLimbLayout.learn(blob, N, (q0,))
    words = np.empty((2, N), dtype=np.uint64)
    layout.read(blob, words)
    assert int(words.max()) < q0 and np.count_nonzero(words) > N  # reduced, and random-looking
    assert layout.write(blob, words) == blob


def test_another_ciphertexts_polynomials_carry_its_message(keys, q0):
    x, y = np.linspace(-1, 1, MESH_PARAMS.slots), np.linspace(1, -1, MESH_PARAMS.slots)
    a, b = serialize(one_limb(keys, x)), serialize(one_limb(keys, y))
    layout = OneLimbLayout.learn(a, N, (q0,))
    words = np.empty((2, N), dtype=np.uint64)
    layout.read(b, words)
    moved = openfhe.DeserializeCiphertextString(layout.write(a, words), openfhe.BINARY)
    assert np.max(np.abs(decrypt(keys, moved) - y)) < 1e-6


def test_key_tags_of_any_length_are_found_from_the_end(keys, q0):
    layout = OneLimbLayout.learn(serialize(one_limb(keys, np.zeros(4))), N, (q0,))  # a 64-hex-digit tag
    short = serialize(one_limb(keys, np.ones(4), tag="k:1"))
    words = np.empty((2, N), dtype=np.uint64)
    layout.read(short, words)
    assert layout.write(short, words) == short


def test_other_layouts_are_refused_not_misread(keys, q0):
    layout = OneLimbLayout.learn(serialize(one_limb(keys, np.zeros(4))), N, (q0,))
    fresh = keys.cc.Encrypt(keys.public_key, keys.cc.MakeCKKSPackedPlaintext(np.zeros(4, dtype=np.complex128)))
    words = np.empty((2, N), dtype=np.uint64)
    with pytest.raises(LayoutError, match="found 4"):
        layout.read(serialize(fresh), words)  # two limbs: four vectors of n words
    with pytest.raises(LayoutError):
        layout.read(serialize(one_limb(keys, np.zeros(4)))[:-40_000], words)  # c1 cut short
    with pytest.raises(LayoutError, match="expected 2 vectors"):
        OneLimbLayout.learn(serialize(fresh), N, (q0,))
    with pytest.raises(LayoutError, match="expected 2 vectors"):
        OneLimbLayout.learn(np.random.default_rng(0).bytes(200_000), N, (q0,))


def _small_first_coefficient(blob: bytes, layout: OneLimbLayout) -> bytes:
    """``blob`` with c0's first coefficient set to 5: still a ciphertext (every word below q0),
    one whose first word no longer looks like a random coefficient."""
    edited = bytearray(blob)
    struct.pack_into("<Q", edited, layout.offsets(blob)[0], 5)
    return bytes(edited)


def test_a_small_coefficient_does_not_move_the_vectors_into_the_header(keys, q0):
    """A header field matches the length word too (the key tag's length and first bytes, at an
    odd byte offset); the old size heuristic picked it whenever a sampled coefficient was below
    2^40, about one serialization in a thousand, and writing (1, 0) there overwrote the
    header's lengths: std::bad_alloc in DeserializeCiphertextString (the scorer's rare flake)."""
    blob = serialize(one_limb(keys, np.zeros(4)))
    edited = _small_first_coefficient(blob, OneLimbLayout.learn(blob, N, (q0,)))
    openfhe.DeserializeCiphertextString(edited, openfhe.BINARY)  # a valid serialization
    layout = OneLimbLayout.learn(edited, N, (q0,))
    words = np.empty((2, N), dtype=np.uint64)
    layout.read(edited, words)
    assert int(words[0, 0]) == 5
    unit = np.zeros((2, N), dtype=np.uint64)
    unit[0] = 1
    openfhe.DeserializeCiphertextString(layout.write(edited, unit), openfhe.BINARY)


def test_two_limb_vectors_are_found_with_both_moduli(keys):
    moduli = limb_moduli(keys.cc)
    fresh = keys.cc.Encrypt(keys.public_key, keys.cc.MakeCKKSPackedPlaintext(np.zeros(4, dtype=np.complex128)))
    blob = serialize(fresh)
    layout = OneLimbLayout.learn(blob, N, moduli)
    edited = _small_first_coefficient(blob, layout)
    words = np.empty((4, N), dtype=np.uint64)
    OneLimbLayout.learn(edited, N, moduli).read(edited, words)
    assert int(words[0, 0]) == 5
    assert [int(w.max()) < q for w, q in zip(words, moduli * 2, strict=True)] == [True] * 4
    with pytest.raises(LayoutError, match="found 4"):
        OneLimbLayout.learn(blob, N, moduli[:1])  # one limb expected: four vectors are not two


def test_produced_serializations_are_rechecked_for_structure_and_new_lengths_in_full(keys):
    moduli = limb_moduli(keys.cc)
    fresh = keys.cc.Encrypt(keys.public_key, keys.cc.MakeCKKSPackedPlaintext(np.zeros(4, dtype=np.complex128)))
    blob = serialize(fresh)
    layout = OneLimbLayout.learn(blob, N, moduli)
    assert layout.produced_offsets(blob) == layout.offsets(blob)
    start = layout.offsets(blob)[1]
    moved = bytearray(blob)
    struct.pack_into("<Q", moved, start + 8 * N, moduli[0])  # limb 1's modulus word replaced: not this layout
    with pytest.raises(LayoutError):
        layout.produced_offsets(bytes(moved))
    # Word values are not rechecked at a learned length (OpenFHE's own output), only by offsets ...
    large = bytearray(blob)
    struct.pack_into("<Q", large, start, moduli[1])  # a word equal to its modulus
    assert layout.produced_offsets(bytes(large)) == layout.offsets(blob)
    with pytest.raises(LayoutError):
        layout.offsets(bytes(large))
    # ... while a length never learned is scanned and checked in full.
    with pytest.raises(LayoutError):
        layout.produced_offsets(bytes(large) + b"\0")
