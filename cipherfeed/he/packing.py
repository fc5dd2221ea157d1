"""The slot layout of queries and scores (pure numpy; no OpenFHE).

A block holds ``2 * slots`` items: item ``j`` in the real part and item ``j + slots`` in the
imaginary part of slot ``j``. The query ``u`` (padded to ``dp`` dimensions) is repeated across all
slots, so rotating it by ``k`` puts ``u[(j + k) mod dp]`` in slot ``j``. Plaintext ``k`` of a block
holds ``X[j, (j + k) mod dp] + i * X[j + slots, (j + k) mod dp]`` in slot ``j``; then
``sum_k diag_k * rot(E(u), k)`` has the two items' scores in slot ``j`` (Halevi-Shoup diagonals).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
ComplexArray = npt.NDArray[np.complex128]


def block_count(item_count: int, items_per_block: int) -> int:
    return -(-item_count // items_per_block)


def replicate_query(u: npt.ArrayLike, padded_dim: int, slots: int) -> ComplexArray:
    """The query vector zero-padded to ``padded_dim`` and repeated across every slot."""
    if padded_dim < 1 or slots % padded_dim:
        raise ValueError(f"{slots} slots are not a whole number of {padded_dim}-value periods")
    v = np.asarray(u, dtype=np.float64)
    if v.ndim != 1 or v.shape[0] > padded_dim:
        raise ValueError(f"query must be a vector of at most {padded_dim} values, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("query contains NaN or infinity")
    padded = np.zeros(padded_dim)
    padded[: v.shape[0]] = v
    return np.tile(padded, slots // padded_dim).astype(np.complex128)


def block_diagonals(block: FloatArray, padded_dim: int, slots: int) -> ComplexArray:
    """The ``padded_dim`` diagonal plaintext vectors (shape ``(padded_dim, slots)``) of one block.

    ``block`` has at most ``2 * slots`` rows; missing rows and columns are zero.
    """
    rows, dim = block.shape
    if rows > 2 * slots or dim > padded_dim:
        raise ValueError(f"block of shape {block.shape} does not fit {2 * slots} items x {padded_dim} dims")
    full = np.zeros((2 * slots, padded_dim))
    full[:rows, :dim] = block
    j = np.arange(slots)
    cols = (j[None, :] + np.arange(padded_dim)[:, None]) % padded_dim  # (k, j) -> (j + k) mod dp
    real = full[j[None, :], cols]
    imag = full[slots + j[None, :], cols]
    return real + 1j * imag


def block_values(values: FloatArray, slots: int) -> ComplexArray:
    """Per-item values (at most ``2 * slots``) laid out like the scores of one block."""
    full = np.zeros(2 * slots)
    full[: values.shape[0]] = values
    return full[:slots] + 1j * full[slots:]


def unpack_scores(blocks: list[ComplexArray], item_count: int, slots: int) -> FloatArray:
    """Item scores from the decrypted complex slots of each score ciphertext, in item order."""
    parts = []
    for z in blocks:
        z = np.asarray(z)[:slots]
        parts.append(np.concatenate([z.real, z.imag]))
    scores = np.concatenate(parts) if parts else np.zeros(0)
    if scores.shape[0] < item_count:
        raise ValueError(f"{scores.shape[0]} decrypted scores for {item_count} items")
    return scores[:item_count]


def plaintext_scores(embeddings: FloatArray, u: FloatArray, popularity: FloatArray, weight: float) -> FloatArray:
    """What the encrypted computation approximates: ``X u + weight * popularity``."""
    return embeddings.astype(np.float64) @ np.asarray(u, dtype=np.float64) + weight * popularity
