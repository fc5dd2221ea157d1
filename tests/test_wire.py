"""The score ciphertext wire encoding is lossless and smaller."""

import os

import numpy as np
import openfhe
import pytest

from cipherfeed.client import keystore
from cipherfeed.he import wire
from cipherfeed.he.codec import serialize
from cipherfeed.he.params import MESH_PARAMS


def test_real_score_ciphertexts_round_trip_and_shrink():
    keys = keystore.generate(MESH_PARAMS)
    cc = keys.cc
    ct = cc.Encrypt(keys.public_key, cc.MakeCKKSPackedPlaintext(np.full(4096, 0.5 + 0.25j)))
    score = cc.Rescale(cc.EvalMult(ct, cc.MakeCKKSPackedPlaintext(np.ones(4096, dtype=complex), 1, 0, None, 4096)))
    blob = serialize(score)
    packed = wire.pack(blob, (MESH_PARAMS.ring_dimension,))
    assert wire.unpack(packed) == blob
    # Two polynomials of 8192 coefficients below 2^58: 6 bits saved per coefficient.
    assert len(blob) - len(packed) >= 2 * 8192 * 6 // 8 - 64
    pt = cc.Decrypt(keys.secret_key, openfhe.DeserializeCiphertextString(wire.unpack(packed), openfhe.BINARY))
    pt.SetLength(2)
    np.testing.assert_allclose(pt.GetCKKSPackedValue(), [0.5 + 0.25j] * 2, atol=1e-6)
    # Given the vectors' offsets (the scorer knows them), packing skips the scan: same bytes.
    runs = wire.find_runs(blob, (MESH_PARAMS.ring_dimension,))
    assert wire.pack(blob, (MESH_PARAMS.ring_dimension,), runs) == packed
    with pytest.raises(ValueError, match="overlap or fall outside"):
        wire.pack(blob, (8192,), [(runs[0][0], 8192), (runs[0][0] + 8, 8192)])
    with pytest.raises(ValueError, match="overlap or fall outside"):
        wire.pack(blob, (8192,), [(len(blob) - 8, 8192)])


@pytest.mark.parametrize("size", [0, 1, 7, 8, 100, 70_000, 200_000])
def test_any_bytes_round_trip(size):
    data = os.urandom(size)
    assert wire.unpack(wire.pack(data, (8192,))) == data
    # A marker followed by small words, as in a header: still exact.
    crafted = b"\x00" * 11 + (8192).to_bytes(8, "little") + np.arange(8192, dtype="<u8").tobytes() + data
    assert wire.unpack(wire.pack(crafted, (8192,))) == crafted


def test_malformed_packed_bytes_are_refused():
    packed = wire.pack(os.urandom(300_000), (8192,))
    for bad in (b"", b"nope", packed[:-5], packed + b"x", wire.MAGIC + b"\x01\x00\x00\x00"):
        with pytest.raises(wire.WireError):
            wire.unpack(bad)


@pytest.mark.parametrize("bits", [22, 23, 31, 40, 55, 58, 63])
@pytest.mark.parametrize("n", [1, 7, 100, 8192])
def test_word_packing_is_exact_for_every_width(bits, n):
    values = np.frombuffer(os.urandom(8 * n), dtype="<u8") & np.uint64((1 << bits) - 1)
    assert np.array_equal(wire._unpack_words(wire._pack_words(values, bits), n, bits), values)


@pytest.mark.skipif(not wire._NATIVE_PLANES, reason="cipherfeed/he/_rnsmac.c was not compiled")
@pytest.mark.parametrize("bits", [22, 23, 31, 32, 40, 47, 48, 55, 56, 57, 58, 63])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 8192])
def test_compiled_planes_are_the_numpy_planes(monkeypatch, bits, n):
    words = np.random.default_rng(bits * n).integers(0, 1 << bits, n, dtype=np.uint64)
    native = wire._pack_words(words, bits)
    monkeypatch.setattr(wire, "_NATIVE_PLANES", False)
    assert wire._pack_words(words, bits) == native
    assert np.array_equal(wire._unpack_words(native, n, bits), words)
