"""The slot layout of queries and scores (pure numpy; no OpenFHE).

A block holds ``2 * slots`` items: item ``j`` in the real part and item ``j + slots`` in the
imaginary part of slot ``j``. The query ``u`` (padded to ``dp`` dimensions) is repeated across all
slots, so rotating it by ``k`` puts ``u[(j + k) mod dp]`` in slot ``j``. Plaintext ``k`` of a block
holds ``X[j, (j + k) mod dp] + i * X[j + slots, (j + k) mod dp]`` in slot ``j``; then
``sum_k diag_k * rot(E(u), k)`` has the two items' scores in slot ``j`` (Halevi-Shoup diagonals).

A last block with at most ``2 * slots / F`` items is *folded* (F = 2 or 4): each item is placed F
times, piece ``h`` of it in slot ``h * w + (c + h * dp / F) mod w`` (``w = slots / F``), where the
first ``dp / F`` diagonals alone sum its dimensions ``h * dp / F ..`` onwards. The block then needs
1/F of the products and no giant-step rotations, and the client adds the F partial sums of each
item after decryption (``unfold_scores``).

A *history* (weights ``w`` over catalogue items, encrypted on the device) uses the score layout:
block ``b`` holds ``w[b*2S + j] + i * w[b*2S + j + S]`` in slot ``j`` (``history_blocks``). The
server multiplies it by the *conjugate* diagonals ``history_diagonals``: plaintext ``k`` holds
``(X[j, (j - k) mod dp] - i * X[j + S, (j - k) mod dp]) / 2`` in slot ``j``, so the real part of
the product is half of ``w_j X[j, d] + w_{j+S} X[j+S, d]`` with ``d = (j - k) mod dp``; rotating
product ``k`` by ``k`` puts dimension ``j mod dp`` in slot ``j``, summing the ``S / dp`` periods
puts every item's contribution there, and adding the complex conjugate doubles the real part and
cancels the imaginary one: ``u = X^T w`` repeated across all slots, the layout of a query.
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
    return np.asarray(real + 1j * imag, dtype=np.complex128)


def block_values(values: FloatArray, slots: int) -> ComplexArray:
    """Per-item values (at most ``2 * slots``) laid out like the scores of one block."""
    full = np.zeros(2 * slots)
    full[: values.shape[0]] = values
    return full[:slots] + 1j * full[slots:]


FOLDS = (4, 2)


def tail_fold(item_count: int, slots: int, padded_dim: int, max_fold: int) -> int:
    """The widest fold (at most ``max_fold``) that the last block of a catalogue of ``item_count``
    items fits; 1 for none. Server and client both apply this rule."""
    if item_count < 1:
        return 1
    items = item_count - (block_count(item_count, 2 * slots) - 1) * 2 * slots  # in the last block
    for fold in FOLDS:
        width = slots // fold
        if fold <= max_fold and items <= 2 * width and padded_dim % fold == 0 and width % padded_dim == 0:
            return fold
    return 1


def fold_slots(fold: int, slots: int, padded_dim: int) -> npt.NDArray[np.intp]:
    """Shape ``(fold, slots / fold)``: the slot of piece ``h`` of the item(s) of complex slot ``c``."""
    width = slots // fold
    c = np.arange(width)
    h = np.arange(fold)[:, None]
    return np.asarray(h * width + (c[None, :] + (padded_dim // fold) * h) % width, dtype=np.intp)


def folded_block(block: FloatArray, fold: int, slots: int, padded_dim: int) -> FloatArray:
    """Rows (``2 * slots`` of them, for ``block_diagonals``) holding every item once per piece."""
    rows, dim = block.shape
    width = slots // fold
    if rows > 2 * width:
        raise ValueError(f"{rows} items do not fit a {fold}-fold block of {2 * width}")
    full = np.zeros((2 * width, dim))
    full[:rows] = block
    out = np.zeros((2 * slots, dim))
    positions = fold_slots(fold, slots, padded_dim).reshape(-1)  # piece-major, as np.tile repeats
    for part in (0, 1):
        out[part * slots + positions] = np.tile(full[part * width : (part + 1) * width], (fold, 1))
    return out


def folded_values(values: FloatArray, fold: int, slots: int) -> ComplexArray:
    """Per-item values of a folded block, in the slots of piece 0 (added once per item)."""
    width = slots // fold
    full = np.zeros(2 * width)
    full[: values.shape[0]] = values
    z = np.zeros(slots, dtype=np.complex128)
    z[:width] = full[:width] + 1j * full[width:]
    return z


def unfold_scores(z: ComplexArray, fold: int, slots: int, padded_dim: int) -> FloatArray:
    """The ``2 * slots / fold`` item scores of a folded block: each item's pieces summed."""
    sums = np.asarray(z)[:slots][fold_slots(fold, slots, padded_dim)].sum(axis=0)
    return np.concatenate([sums.real, sums.imag])


def unpack_scores(
    blocks: list[ComplexArray], item_count: int, slots: int, fold: int = 1, padded_dim: int = 64
) -> FloatArray:
    """Item scores from the decrypted complex slots of each score ciphertext, in item order; the
    last block is unfolded when ``fold`` > 1."""
    parts = []
    for i, z in enumerate(blocks):
        z = np.asarray(z)[:slots]
        if fold > 1 and i == len(blocks) - 1:
            parts.append(unfold_scores(z, fold, slots, padded_dim))
        else:
            parts.append(np.concatenate([z.real, z.imag]))
    scores = np.concatenate(parts) if parts else np.zeros(0)
    if scores.shape[0] < item_count:
        raise ValueError(f"{scores.shape[0]} decrypted scores for {item_count} items")
    return scores[:item_count]


def plaintext_scores(embeddings: FloatArray, u: FloatArray, popularity: FloatArray, weight: float) -> FloatArray:
    """What the encrypted computation approximates: ``X u + weight * popularity``."""
    return embeddings.astype(np.float64) @ np.asarray(u, dtype=np.float64) + weight * popularity


def history_blocks(weights: npt.ArrayLike, slots: int) -> list[ComplexArray]:
    """A weight vector over the catalogue as the slot vectors of its history ciphertexts."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] < 1:
        raise ValueError(f"history weights must be a non-empty vector, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("history weights contain NaN or infinity")
    per_block = 2 * slots
    return [block_values(w[start : start + per_block], slots) for start in range(0, w.shape[0], per_block)]


def history_diagonals(block: FloatArray, padded_dim: int, slots: int) -> ComplexArray:
    """The ``padded_dim`` conjugate diagonals (shape ``(padded_dim, slots)``) of one block for a
    history product: row ``k`` holds ``(X[j, (j - k) mod dp] - i X[j + slots, (j - k) mod dp]) / 2``."""
    rows, dim = block.shape
    if rows > 2 * slots or dim > padded_dim:
        raise ValueError(f"block of shape {block.shape} does not fit {2 * slots} items x {padded_dim} dims")
    full = np.zeros((2 * slots, padded_dim))
    full[:rows, :dim] = block
    j = np.arange(slots)
    cols = (j[None, :] - np.arange(padded_dim)[:, None]) % padded_dim  # (k, j) -> (j - k) mod dp
    diagonals: ComplexArray = 0.5 * (full[j[None, :], cols] - 1j * full[slots + j[None, :], cols])
    return diagonals
