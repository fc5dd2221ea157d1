"""Typed access to the compiled multiply-accumulate kernel (``_rnsmac.c``), if it was built.

``multiply_accumulate`` computes, for ciphertexts and plaintexts of one RNS limb in evaluation
form, exactly what OpenFHE's ``EvalMult(ct_j, pt_j)`` followed by ``EvalAddMany`` (and an
``EvalAdd`` of one more ciphertext or plaintext) computes, with one modular reduction per coefficient instead of
one per product and no ciphertext allocated per product. The arithmetic is public (a ciphertext is
public data); it holds no key and draws no randomness.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

try:
    from cipherfeed.he import _rnsmac  # type: ignore[attr-defined]  # a C extension: no stub

    IMPORT_ERROR: str | None = None
except ImportError as exc:  # built by `pip install` when a C compiler is present (scripts/bootstrap.sh)
    _rnsmac = None
    IMPORT_ERROR = str(exc)

# The extension is built in place: a worktree updated without a rebuild keeps an older one, which
# would fail deep inside a projection. Such a build counts as absent, and says why.
FUNCTIONS = ("mac", "mac_gather", "add_mod", "to_montgomery", "pack_planes")
if _rnsmac is not None and not all(hasattr(_rnsmac, name) for name in FUNCTIONS):
    missing = [name for name in FUNCTIONS if not hasattr(_rnsmac, name)]
    IMPORT_ERROR = f"the compiled kernel is older than _rnsmac.c (no {', '.join(missing)}): rerun scripts/bootstrap.sh"
    _rnsmac = None

Words = npt.NDArray[np.uint64]


def available() -> bool:
    return _rnsmac is not None


def _require() -> Any:  # the compiled module (untyped)
    if _rnsmac is None:
        raise RuntimeError(f"the native scoring kernel is not available: {IMPORT_ERROR}")
    return _rnsmac


def _words(a: np.ndarray, name: str) -> None:
    if a.dtype != np.uint64 or not a.flags.c_contiguous or not a.flags.aligned:
        raise ValueError(f"{name} must be a C-contiguous, 8-byte aligned uint64 array, got {a.dtype}")


def to_montgomery(values: Words, modulus: int) -> None:
    """values * 2^64 mod modulus, in place: the form ``multiply_accumulate`` takes plaintexts in."""
    _words(values, "values")
    _require().to_montgomery(values, modulus)


def multiply_accumulate(
    out: Words, ciphertexts: Words, plaintexts: Words, modulus: int, add: Words | None = None
) -> None:
    """out[g, c, i] = sum_j ciphertexts[c, i, j] * plaintexts[g, i, j] + add[g, c, i] mod modulus.

    Coefficient-major: ``ciphertexts`` (2, n, k) holds ciphertext j's polynomials c0, c1 in
    column j, of which the first ``count = plaintexts.shape[2]`` (<= k) are used; ``plaintexts``
    (groups, n, count) in Montgomery form, one sum per group, every group computed in one pass
    over the ciphertexts; ``add`` (groups, 2, n) ciphertexts, or plaintexts as (pt, 0). Every
    word below the modulus."""
    groups, n, count = plaintexts.shape
    if ciphertexts.ndim != 3 or ciphertexts.shape[:2] != (2, n) or ciphertexts.shape[2] < count:
        raise ValueError(f"shapes do not match: ciphertexts {ciphertexts.shape}, plaintexts {plaintexts.shape}")
    shape = (groups, 2, n)
    if out.shape != shape or (add is not None and add.shape != shape):
        raise ValueError(f"out and add must be {shape}, got {out.shape} and {None if add is None else add.shape}")
    for a, name in ((out, "out"), (ciphertexts, "ciphertexts"), (plaintexts, "plaintexts")):
        _words(a, name)
    if add is not None:
        _words(add, "add")
    _require().mac(out, ciphertexts, plaintexts, groups, count, ciphertexts.shape[2], n, modulus, add)


def multiply_accumulate_blobs(
    out: Words, blobs: Sequence[bytes], offsets: npt.NDArray[np.int64], plaintexts: Words, modulus: int
) -> None:
    """out[g, c, i] = sum_j word i of vector c of blobs[j] * plaintexts[g, i, j] mod modulus.

    What ``multiply_accumulate`` computes, with ciphertext j's polynomials c0, c1 of this limb
    read in place from its serialization ``blobs[j]``, at the byte offsets ``offsets[j]`` (any
    alignment; each vector must lie inside its blob, which the kernel checks): no copy of the
    ciphertexts and no transposition in between, and any number of them in one pass (the
    products are reduced in runs short enough for 128 bits). ``plaintexts`` (groups, n, count)
    in Montgomery form; every word below the modulus."""
    groups, n, count = plaintexts.shape
    if offsets.dtype != np.int64:
        raise ValueError(f"offsets must be int64, got {offsets.dtype}")
    if len(blobs) != count or offsets.shape != (count, 2):
        raise ValueError(f"{len(blobs)} blobs and offsets {offsets.shape} for {count} plaintexts")
    if out.shape != (groups, 2, n):
        raise ValueError(f"out must be {(groups, 2, n)}, got {out.shape}")
    for a, name in ((out, "out"), (offsets, "offsets"), (plaintexts, "plaintexts")):
        if not a.flags.c_contiguous or not a.flags.aligned:
            raise ValueError(f"{name} must be C-contiguous and aligned")
    _words(out, "out")
    _words(plaintexts, "plaintexts")
    _require().mac_gather(out, list(blobs), offsets, plaintexts, groups, count, n, modulus)


def add_mod(out: Words, values: Words, modulus: int) -> None:
    """out = out + values mod modulus, in place (a ciphertext or plaintext addition)."""
    if out.shape != values.shape:
        raise ValueError(f"shapes do not match: {out.shape} and {values.shape}")
    _words(out, "out")
    _words(values, "values")
    _require().add_mod(out, values, modulus)


def pack_planes(words: Words, bits: int) -> bytes:
    """``cipherfeed.he.wire``'s plane layout of values below 2**bits, in one call without the GIL."""
    if words.dtype != np.dtype("<u8") or not words.flags.c_contiguous:
        raise ValueError("words must be C-contiguous little-endian uint64")
    return _require().pack_planes(words, bits)
