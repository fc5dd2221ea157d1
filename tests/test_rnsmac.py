"""The compiled multiply-accumulate kernel against Python's exact integers, and its refusals."""

import shutil

import numpy as np
import pytest

from cipherfeed.he import rnsmac
from cipherfeed.he.params import MESH_PARAMS, build_context

needs_kernel = pytest.mark.skipif(
    not rnsmac.available(), reason="cipherfeed/he/_rnsmac.c was not compiled (no C compiler at install)"
)


def test_the_kernel_is_built_wherever_a_c_compiler_is():
    """The extension is optional at install, so a broken build would only show as slow scoring."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here: the scorer uses OpenFHE's products")
    assert rnsmac.available(), f"the kernel did not import: {rnsmac.IMPORT_ERROR} (rerun scripts/bootstrap.sh)"


Q0 = int(build_context(MESH_PARAMS).GetModulusCKKS())  # the mesh's 58-bit first modulus
R = 1 << 64


def reference(ciphertexts: np.ndarray, plaintexts: np.ndarray, q: int, add: np.ndarray | None) -> np.ndarray:
    groups, n, count = plaintexts.shape
    out = np.empty((groups, 2, n), dtype=np.uint64)
    for g in range(groups):
        for c in range(2):
            for i in range(n):
                total = sum(int(ciphertexts[c, i, j]) * int(plaintexts[g, i, j]) for j in range(count))
                if add is not None:
                    total += int(add[g, c, i])
                out[g, c, i] = total % q
    return out


def montgomery(values: np.ndarray, q: int) -> np.ndarray:
    converted = values.copy()
    rnsmac.to_montgomery(converted, q)
    return converted


@needs_kernel
@pytest.mark.parametrize(
    ("q", "groups", "count", "stride", "n", "with_add"),
    [
        (Q0, 1, 1, 1, 7, False),  # the mesh's 58-bit first modulus
        (Q0, 4, 16, 16, 300, False),  # a block's four groups in one pass
        (Q0, 1, 16, 16, 300, True),
        (Q0, 1, 4, 16, 300, True),  # a folded block: the first 4 of 16 rotations
        (Q0, 1, 64, 64, 513, False),  # the flat strategy's one group of 64
        ((1 << 62) - 57, 2, 4, 4, 300, True),  # the largest modulus, with as many products as it allows
        (1_000_003, 3, 64, 64, 300, True),
    ],
)
def test_products_summed_match_exact_integers(q, groups, count, stride, n, with_add):
    rng = np.random.default_rng(count * n + stride + groups)
    cts = rng.integers(0, q, (2, n, stride), dtype=np.uint64)
    pts = rng.integers(0, q, (groups, n, count), dtype=np.uint64)
    cts[:, 0, :] = q - 1  # the largest words: the 128-bit accumulator's worst case
    pts[:, 0, :] = q - 1
    add = rng.integers(0, q, (groups, 2, n), dtype=np.uint64) if with_add else None
    out = np.empty((groups, 2, n), dtype=np.uint64)
    rnsmac.multiply_accumulate(out, cts, montgomery(pts, q), q, add)
    assert np.array_equal(out, reference(cts, pts, q, add))


@needs_kernel
def test_montgomery_form_is_times_two_to_the_64():
    values = np.array([0, 1, 2, Q0 - 1, 12345678901234567], dtype=np.uint64)
    assert [int(v) for v in montgomery(values, Q0)] == [int(v) * R % Q0 for v in values]


@needs_kernel
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
    out = np.empty((1, 2, 4), dtype=np.uint64)
    with pytest.raises(ValueError, match=message):
        rnsmac.multiply_accumulate(out, np.zeros((2, 4, count), np.uint64), np.zeros((1, 4, count), np.uint64), q)


@needs_kernel
def test_shapes_dtypes_and_buffer_sizes_are_checked():
    out = np.empty((2, 2, 8), dtype=np.uint64)
    cts, pts = np.zeros((2, 8, 3), np.uint64), np.zeros((2, 8, 3), np.uint64)
    with pytest.raises(ValueError, match="shapes do not match"):
        rnsmac.multiply_accumulate(out, cts[:, :, :2], pts, Q0)  # fewer ciphertexts than plaintexts
    with pytest.raises(ValueError, match="must be \\(2, 2, 8\\)"):
        rnsmac.multiply_accumulate(out, cts, pts, Q0, np.zeros((2, 8), np.uint64))
    with pytest.raises(ValueError, match="must be \\(2, 2, 8\\)"):
        rnsmac.multiply_accumulate(out[:1], cts, pts, Q0)
    with pytest.raises(ValueError, match="uint64"):
        rnsmac.multiply_accumulate(out, cts.astype(np.int64), pts, Q0)
    with pytest.raises(ValueError, match="C-contiguous"):
        rnsmac.multiply_accumulate(out, cts, np.zeros((2, 8, 6), np.uint64)[:, :, ::2], Q0)
    # Below the typed wrapper, the C function checks every buffer's size itself.
    from cipherfeed.he import _rnsmac

    with pytest.raises(ValueError, match="plaintexts holds 376 bytes; expected 384"):
        _rnsmac.mac(out, cts, pts.ravel()[:-1], 2, 3, 3, 8, Q0)
    with pytest.raises(ValueError, match="count <= stride"):
        _rnsmac.mac(out, cts, pts, 2, 3, 2, 8, Q0)
    with pytest.raises(ValueError, match="groups > 0"):
        _rnsmac.mac(out, cts, pts, 0, 3, 3, 8, Q0)
    with pytest.raises(ValueError, match="add holds 8 bytes"):
        _rnsmac.mac(out, cts, pts, 2, 3, 3, 8, Q0, np.zeros(1, np.uint64))
    with pytest.raises(TypeError):
        _rnsmac.mac(b"read-only", cts, pts, 2, 3, 3, 8, Q0)
    with pytest.raises(TypeError):
        _rnsmac.mac(out, cts, pts, 2, 3, 3, 8, Q0, "not a buffer")
    with pytest.raises(ValueError, match="whole 64-bit words"):
        _rnsmac.to_montgomery(bytearray(12), Q0)
    with pytest.raises(ValueError, match="same number of 64-bit words"):
        _rnsmac.add_mod(bytearray(16), bytes(8), Q0)


@needs_kernel
def test_modular_addition_in_place():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, Q0, 1000, dtype=np.uint64), rng.integers(0, Q0, 1000, dtype=np.uint64)
    a[0] = b[0] = Q0 - 1
    out = a.copy()
    rnsmac.add_mod(out, b, Q0)
    assert [int(v) for v in out] == [(int(x) + int(y)) % Q0 for x, y in zip(a, b, strict=True)]
    with pytest.raises(ValueError, match="shapes do not match"):
        rnsmac.add_mod(out, b[:-1], Q0)


def _serialization_like(vectors: np.ndarray, header: int, rng: np.random.Generator) -> tuple[bytes, list[int]]:
    """Random bytes with the vectors (c0, c1) at unaligned offsets, as inside a serialization."""
    parts, offsets, pos = [], [], 0
    for vector in vectors:
        gap = rng.bytes(header)
        parts += [gap, vector.astype("<u8").tobytes()]
        offsets.append(pos + header)
        pos += header + 8 * len(vector)
    return b"".join(parts) + rng.bytes(3), offsets


@needs_kernel
@pytest.mark.parametrize(
    ("q", "groups", "count", "n"),
    [
        (Q0, 16, 52, 64),  # 100k items' 13 blocks x 4 input rotations, 16 sums
        (Q0, 3, 130, 37),  # more ciphertexts than one 128-bit run holds (runs reduced and added), n not a tile
        ((1 << 62) - 57, 2, 9, 16),  # the largest modulus: runs of 4 products
    ],
)
def test_products_read_from_serializations_match_exact_integers_and_the_copied_kernel(q, groups, count, n):
    rng = np.random.default_rng(count + n)
    cts = rng.integers(0, q, (2, n, count), dtype=np.uint64)
    cts[:, 0, :] = q - 1
    pts = rng.integers(0, q, (groups, n, count), dtype=np.uint64)
    pts[:, 0, :] = q - 1
    blobs, offsets = [], []
    for j in range(count):
        blob, at = _serialization_like(cts[:, :, j], 5 + j % 7, rng)  # odd offsets: unaligned words
        blobs.append(blob)
        offsets.append(at)
    out = np.empty((groups, 2, n), dtype=np.uint64)
    rnsmac.multiply_accumulate_blobs(out, blobs, np.array(offsets, dtype=np.int64), montgomery(pts, q), q)
    assert np.array_equal(out, reference(cts, pts, q, None))
    if count * q < R:
        copied = np.empty_like(out)
        rnsmac.multiply_accumulate(copied, np.ascontiguousarray(cts), montgomery(pts, q), q)
        assert np.array_equal(out, copied)


@needs_kernel
def test_vectors_outside_their_serialization_are_refused():
    n, count = 8, 2
    blob = bytes(8 * n + 16)
    out = np.empty((1, 2, n), dtype=np.uint64)
    pts = np.zeros((1, n, count), np.uint64)
    good = np.array([[0, 16], [8, 16]], dtype=np.int64)
    rnsmac.multiply_accumulate_blobs(out, [blob, blob], good, pts, Q0)
    outside = (([[0, 17], [8, 16]], "vector 1 of blob 0 lies outside"), ([[0, 16], [-1, 16]], "vector 0 of blob 1"))
    for bad, message in outside:
        with pytest.raises(ValueError, match=message):
            rnsmac.multiply_accumulate_blobs(out, [blob, blob], np.array(bad, dtype=np.int64), pts, Q0)
    with pytest.raises(ValueError, match="1 blobs"):
        rnsmac.multiply_accumulate_blobs(out, [blob], good, pts, Q0)
    with pytest.raises(ValueError, match="int64"):
        rnsmac.multiply_accumulate_blobs(out, [blob, blob], good.astype(np.int32), pts, Q0)
    from cipherfeed.he import _rnsmac

    with pytest.raises(TypeError, match="bytes"):
        _rnsmac.mac_gather(out, [blob, bytearray(blob)], good, pts, 1, count, n, Q0)  # mutable: refused
    with pytest.raises(ValueError, match="offsets holds"):
        _rnsmac.mac_gather(out, [blob, blob], good[:1], pts, 1, count, n, Q0)
