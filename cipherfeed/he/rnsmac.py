"""Typed access to the compiled multiply-accumulate kernel (``_rnsmac.c``), if it was built.

``multiply_accumulate`` computes, for ciphertexts and plaintexts of one RNS limb in evaluation
form, exactly what OpenFHE's ``EvalMult(ct_j, pt_j)`` followed by ``EvalAddMany`` (and an
``EvalAdd`` of one more ciphertext or plaintext) computes, with one modular reduction per coefficient instead of
one per product and no ciphertext allocated per product. The arithmetic is public (a ciphertext is
public data); it holds no key and draws no randomness.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

try:
    from cipherfeed.he import _rnsmac
except ImportError:  # built by `pip install` when a C compiler is present (scripts/bootstrap.sh)
    _rnsmac = None

Words = npt.NDArray[np.uint64]


def available() -> bool:
    return _rnsmac is not None


def _require() -> object:
    if _rnsmac is None:
        raise RuntimeError("the native scoring kernel is not built (cipherfeed/he/_rnsmac.c needs a C compiler)")
    return _rnsmac


def _words(a: np.ndarray, name: str) -> None:
    if a.dtype != np.uint64 or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous uint64 array, got {a.dtype}")


def to_montgomery(values: Words, modulus: int) -> None:
    """values * 2^64 mod modulus, in place: the form ``multiply_accumulate`` takes plaintexts in."""
    _words(values, "values")
    _require().to_montgomery(values, modulus)


def multiply_accumulate(
    out: Words, ciphertexts: Words, plaintexts: Words, modulus: int, add: Words | None = None
) -> None:
    """out (2, n) = sum_j ciphertexts[j] (2, n) * plaintexts[j] (n,) + add (2, n) mod modulus (a
    plaintext is added as (pt, 0)). ``plaintexts`` in Montgomery form; every word below the modulus."""
    count, n = plaintexts.shape
    if ciphertexts.shape != (count, 2, n) or out.shape != (2, n) or (add is not None and add.shape != (2, n)):
        raise ValueError(
            f"shapes do not match: out {out.shape}, ciphertexts {ciphertexts.shape}, plaintexts {plaintexts.shape}"
        )
    for a, name in ((out, "out"), (ciphertexts, "ciphertexts"), (plaintexts, "plaintexts")):
        _words(a, name)
    if add is None:
        _require().mac(out, ciphertexts, plaintexts, count, n, modulus)
    else:
        _words(add, "add")
        _require().mac(out, ciphertexts, plaintexts, count, n, modulus, add)
