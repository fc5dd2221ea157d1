"""The slot layout, checked in the clear by simulating rotations with numpy."""

import numpy as np
import pytest

from cipherfeed.he import packing


def simulate(x: np.ndarray, u: np.ndarray, dp: int, slots: int) -> np.ndarray:
    q = packing.replicate_query(u, dp, slots)
    diags = packing.block_diagonals(x, dp, slots)
    acc = sum(diags[k] * np.roll(q, -k) for k in range(dp))  # rot(q, k)[j] = q[j + k]
    return packing.unpack_scores([acc], x.shape[0], slots)


@pytest.mark.parametrize(
    ("items", "dim", "dp", "slots"), [(16, 8, 8, 8), (11, 5, 8, 8), (128, 64, 64, 64), (3, 64, 64, 64)]
)
def test_diagonal_layout_computes_matrix_vector_product(items, dim, dp, slots):
    rng = np.random.default_rng(items + dim)
    x = rng.standard_normal((items, dim))
    u = rng.standard_normal(dim)
    np.testing.assert_allclose(simulate(x, u, dp, slots), x @ u, atol=1e-12)


@pytest.mark.parametrize(("items", "fold"), [(5, 2), (16, 2), (3, 4), (8, 4), (1, 4)])
def test_a_folded_block_needs_a_fold_th_of_the_diagonals(items, fold):
    dp, slots = 8, 32
    rng = np.random.default_rng(items * fold)
    x = rng.standard_normal((items, dp))
    u = rng.standard_normal(dp)
    q = packing.replicate_query(u, dp, slots)
    diags = packing.block_diagonals(packing.folded_block(x, fold, slots, dp), dp, slots)
    acc = sum(diags[k] * np.roll(q, -k) for k in range(dp // fold))  # only the first dp / fold
    acc = acc + packing.folded_values(np.arange(items, dtype=float), fold, slots)
    got = packing.unpack_scores([acc], items, slots, fold=fold, padded_dim=dp)
    np.testing.assert_allclose(got, x @ u + np.arange(items), atol=1e-12)


def test_tail_fold_is_the_widest_that_fits():
    assert [packing.tail_fold(n, 4096, 64, 4) for n in (1, 2048, 2049, 4096, 4097, 8192)] == [4, 4, 2, 2, 1, 1]
    # Only the last block counts: 8192 + 1696 items (the 100k catalogue's tail) folds 4 ways.
    assert [packing.tail_fold(n, 4096, 64, 4) for n in (0, 8192 + 1696, 8192 + 3000, 2 * 8192)] == [1, 4, 2, 1]
    assert packing.tail_fold(100, 4096, 64, max_fold=2) == 2
    assert packing.tail_fold(100, 64, 64, max_fold=4) == 1  # a piece must hold whole query periods


def test_items_fill_real_then_imaginary_parts():
    values = np.arange(6, dtype=float)
    z = packing.block_values(values, slots=4)
    assert list(z.real) == [0, 1, 2, 3] and list(z.imag) == [4, 5, 0, 0]
    assert list(packing.unpack_scores([z], 6, 4)) == list(values)


def test_block_count_rounds_up():
    assert [packing.block_count(n, 8192) for n in (1, 8192, 8193, 100_000)] == [1, 1, 2, 13]


def test_query_rejects_wrong_shapes_and_non_finite_values():
    with pytest.raises(ValueError, match="at most 8"):
        packing.replicate_query(np.ones(9), 8, 16)
    with pytest.raises(ValueError, match="NaN"):
        packing.replicate_query(np.array([1.0, np.nan]), 8, 16)


def test_query_period_must_divide_slot_count():
    with pytest.raises(ValueError, match="whole number"):
        packing.replicate_query(np.ones(4), 64, 32)


def test_block_larger_than_two_ciphertext_halves_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        packing.block_diagonals(np.ones((17, 4)), 4, 8)


def test_too_few_decrypted_scores_is_an_error():
    with pytest.raises(ValueError, match="decrypted scores"):
        packing.unpack_scores([np.zeros(4, dtype=complex)], 9, 4)
