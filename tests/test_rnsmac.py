"""The compiled multiply-accumulate kernel against Python's exact integers, and its refusals."""

import numpy as np
import pytest

from cipherfeed.he import rnsmac
from cipherfeed.he.params import MESH_PARAMS, build_context

pytestmark = pytest.mark.skipif(
    not rnsmac.available(), reason="cipherfeed/he/_rnsmac.c was not compiled (no C compiler at install)"
)

Q0 = int(build_context(MESH_PARAMS).GetModulusCKKS())  # the mesh's 58-bit first modulus
R = 1 << 64


def reference(ciphertexts: np.ndarray, plaintexts: np.ndarray, q: int, add: np.ndarray | None) -> np.ndarray:
    count, _, n = ciphertexts.shape
    out = np.empty((2, n), dtype=np.uint64)
    for c in range(2):
        for i in range(n):
            total = sum(int(ciphertexts[j, c, i]) * int(plaintexts[j, i]) for j in range(count))
            if add is not None:
                total += int(add[c, i])
            out[c, i] = total % q
    return out


def montgomery(values: np.ndarray, q: int) -> np.ndarray:
    converted = values.copy()
    rnsmac.to_montgomery(converted, q)
    return converted


@pytest.mark.parametrize(
    ("q", "count", "n", "with_add"),
    [
        (Q0, 1, 7, False),  # the mesh's 58-bit first modulus
        (Q0, 16, 300, True),
        (Q0, 64, 513, False),
        ((1 << 62) - 57, 4, 300, True),  # the largest modulus, with as many products as it allows
        (1_000_003, 64, 300, True),
    ],
)
def test_products_summed_match_exact_integers(q, count, n, with_add):
    rng = np.random.default_rng(count * n)
    cts = rng.integers(0, q, (count, 2, n), dtype=np.uint64)
    pts = rng.integers(0, q, (count, n), dtype=np.uint64)
    cts[0, :, 0] = pts[:, 0] = q - 1  # the largest words: the 128-bit accumulator's worst case
    add = rng.integers(0, q, (2, n), dtype=np.uint64) if with_add else None
    out = np.empty((2, n), dtype=np.uint64)
    rnsmac.multiply_accumulate(out, cts, montgomery(pts, q), q, add)
    assert np.array_equal(out, reference(cts, pts, q, add))


def test_montgomery_form_is_times_two_to_the_64():
    values = np.array([0, 1, 2, Q0 - 1, 12345678901234567], dtype=np.uint64)
    assert [int(v) for v in montgomery(values, Q0)] == [int(v) * R % Q0 for v in values]


@pytest.mark.parametrize(
    ("q", "count", "message"),
    [
        (Q0 + 1, 4, "odd"),
        (1 << 62 | 1, 4, "2\\^62"),
        (1, 4, "between 3"),
        ((1 << 62) - 57, 5, "too many products"),  # 5 * q > 2^64: the sum could overflow
    ],
)
def test_unsafe_moduli_and_counts_are_refused(q, count, message):
    out = np.empty((2, 4), dtype=np.uint64)
    with pytest.raises(ValueError, match=message):
        rnsmac.multiply_accumulate(out, np.zeros((count, 2, 4), np.uint64), np.zeros((count, 4), np.uint64), q)


def test_shapes_dtypes_and_buffer_sizes_are_checked():
    out = np.empty((2, 8), dtype=np.uint64)
    cts, pts = np.zeros((3, 2, 8), np.uint64), np.zeros((3, 8), np.uint64)
    with pytest.raises(ValueError, match="shapes do not match"):
        rnsmac.multiply_accumulate(out, cts[:2], pts, Q0)
    with pytest.raises(ValueError, match="shapes do not match"):
        rnsmac.multiply_accumulate(out, cts, pts, Q0, np.zeros(8, np.uint64))  # add is (2, n)
    with pytest.raises(ValueError, match="uint64"):
        rnsmac.multiply_accumulate(out, cts.astype(np.int64), pts, Q0)
    with pytest.raises(ValueError, match="C-contiguous"):
        rnsmac.multiply_accumulate(out, cts, np.zeros((3, 16), np.uint64)[:, ::2], Q0)
    # Below the typed wrapper, the C function checks every buffer's size itself.
    from cipherfeed.he import _rnsmac

    with pytest.raises(ValueError, match="plaintexts holds 184 bytes; expected 192"):
        _rnsmac.mac(out, cts, pts.ravel()[:-1], 3, 8, Q0)
    with pytest.raises(TypeError):
        _rnsmac.mac(b"read-only", cts, pts, 3, 8, Q0)
    with pytest.raises(ValueError, match="whole 64-bit words"):
        _rnsmac.to_montgomery(bytearray(12), Q0)
