"""The CKKS parameter set of the mesh and the crypto context it produces.

Chosen by measurement on a 2-core machine (README, "Parameter choice"):

* ring 2^13, q0 = 58 bits, scale 2^55, depth 1: a query is ~263 KB and a score ciphertext one
  58-bit limb (~119 KB on the wire for 8,192 items once bit-packed, see ``wire``). 128-bit
  security (HEStd_128_classic) is enforced by OpenFHE: BV key switching needs no auxiliary
  modulus, so log Q = 113 bits, under the 218-bit bound for N = 8192. Scores are at most ~1.05
  in magnitude (unit vectors plus the prior); q0 leaves 2 bits above the scale, |s| < 4, which
  the scorer checks when it loads a model.
* BV key switching with 20-bit digits (6 digits for the two limbs): a hoisted rotation costs
  ~0.5 ms against ~1.2 ms for HYBRID; the 55-bit scale keeps the key-switching noise at ~1e-6
  in the scores.
* FIXEDMANUAL scaling: the default FLEXIBLEAUTOEXT makes ciphertext x plaintext products ~14x
  slower. COMPLEX data: two items per slot (real and imaginary part).
* Rotations: the scorer needs the query rotated by 0..15 (baby steps, a radix-4 tree of hoisted
  rotations: keys 1, 2, 3, 4, 8, 12) and partial sums rotated by 16 (giant steps, applied
  Horner-style, so 32 and 48 need no keys of their own).
* History profiles (``services/recommender/history``) sum every slot's contribution over the
  ``slots / padded_dim`` periods with a radix-4 fold (keys 64, 256, 1024: three Horner rotations
  per level) and take the real part with one conjugation key. A client generates 10 rotation keys
  and the conjugation key (~17.3 MB) instead of 63 (~100 MB).
"""

from __future__ import annotations

import hashlib
import struct
import threading
from dataclasses import dataclass

import openfhe

# OpenFHE's context factory and its static maps are not thread-safe while a context is created.
_CONTEXT_LOCK = threading.Lock()
_CONTEXTS: dict[HEParams, openfhe.CryptoContext] = {}

ALLOWED_SECURITY_LEVELS = frozenset({"HEStd_128_classic", "HEStd_192_classic", "HEStd_256_classic"})


class ParameterError(ValueError):
    """A parameter set is unsafe, unsupported or does not match the mesh's."""


@dataclass(frozen=True)
class HEParams:
    ring_dimension: int = 8192
    first_mod_bits: int = 58
    scaling_mod_bits: int = 55
    multiplicative_depth: int = 1
    key_switch_digit_bits: int = 20
    security_level: str = "HEStd_128_classic"
    scaling_technique: str = "FIXEDMANUAL"
    key_switch_technique: str = "BV"
    embedding_dim: int = 64
    rotation_radix: int = 4
    baby_steps: int = 16
    history_fold_radix: int = 4

    def __post_init__(self) -> None:
        if self.security_level not in ALLOWED_SECURITY_LEVELS:
            raise ParameterError(f"security level {self.security_level!r} is not allowed (128-bit or more)")
        if self.ring_dimension & (self.ring_dimension - 1) or self.ring_dimension < 1024:
            raise ParameterError(f"ring dimension {self.ring_dimension} is not a power of two >= 1024")
        if self.embedding_dim < 1 or self.padded_dim > self.slots:
            raise ParameterError(f"embedding dimension {self.embedding_dim} does not fit {self.slots} slots")
        if self.rotation_radix < 2:
            raise ParameterError("rotation radix must be at least 2")
        if self.baby_steps < 1 or self.padded_dim % self.baby_steps:
            raise ParameterError(f"{self.baby_steps} baby steps do not divide the {self.padded_dim}-slot period")
        reached = {0}
        for level in self.baby_levels():
            reached = {base + step for base in reached for step in [0, *level]}
        if reached != set(range(self.baby_steps)):
            raise ParameterError(f"a radix-{self.rotation_radix} tree does not reach {self.baby_steps} baby steps")
        if self.history_fold_radix < 2:
            raise ParameterError("history fold radix must be at least 2")

    @property
    def slots(self) -> int:
        """Complex slots per ciphertext."""
        return self.ring_dimension // 2

    @property
    def items_per_ciphertext(self) -> int:
        """Two items per complex slot."""
        return 2 * self.slots

    @property
    def padded_dim(self) -> int:
        """The embedding dimension rounded up to a power of two (the query's period in slots)."""
        return 1 << max(0, (self.embedding_dim - 1).bit_length())

    def baby_levels(self) -> list[list[int]]:
        """The hoisted rotation tree reaching offsets 0..baby_steps-1, widest steps first: level l
        rotates by multiples of radix^l."""
        levels: list[list[int]] = []
        step = 1
        while step < self.baby_steps:
            levels.append([step * i for i in range(1, min(self.rotation_radix, self.baby_steps // step))])
            step *= self.rotation_radix
        return levels[::-1]

    @property
    def giant_steps(self) -> int:
        """Rotations by multiples of ``baby_steps`` that complete the period (Horner: one key)."""
        return self.padded_dim // self.baby_steps

    @property
    def score_bound(self) -> float:
        """Scores must stay below this in magnitude to decrypt correctly (q0 / 2 over the scale)."""
        return 2.0 ** (self.first_mod_bits - 1 - self.scaling_mod_bits)

    def history_fold_levels(self) -> list[tuple[int, int]]:
        """(step, rotations) of each level of the fold that sums a history profile's
        ``slots / padded_dim`` periods: level by level, ``x <- x + rot(x + rot(x + ..., s), s)``
        with ``rotations`` Horner rotations by ``s``, multiplying the summed width by
        ``rotations + 1`` (the radix, or what is left of the period count at the last level)."""
        levels: list[tuple[int, int]] = []
        width = self.padded_dim
        while width < self.slots:
            factor = min(self.history_fold_radix, self.slots // width)
            levels.append((width, factor - 1))
            width *= factor
        return levels

    @property
    def conjugation_index(self) -> int:
        """OpenFHE's automorphism index of complex conjugation (X -> X^(2N-1))."""
        return 2 * self.ring_dimension - 1

    @property
    def rotation_indices(self) -> list[int]:
        """The rotation keys a client generates: the baby-step tree's, the giant step and the
        history fold's (the conjugation key comes with them, see ``conjugation_index``)."""
        indices = {k for level in self.baby_levels() for k in level}
        if self.giant_steps > 1:
            indices.add(self.baby_steps)
        indices.update(step for step, _ in self.history_fold_levels())
        return sorted(indices)


MESH_PARAMS = HEParams()


def build_context(params: HEParams = MESH_PARAMS) -> openfhe.CryptoContext:
    """The crypto context for a parameter set (created once per process and shared)."""
    with _CONTEXT_LOCK:
        cached = _CONTEXTS.get(params)
        if cached is not None:
            return cached
        p = openfhe.CCParamsCKKSRNS()
        p.SetMultiplicativeDepth(params.multiplicative_depth)
        p.SetScalingModSize(params.scaling_mod_bits)
        p.SetFirstModSize(params.first_mod_bits)
        p.SetRingDim(params.ring_dimension)
        p.SetBatchSize(params.slots)
        p.SetSecurityLevel(getattr(openfhe.SecurityLevel, params.security_level))
        p.SetScalingTechnique(getattr(openfhe.ScalingTechnique, params.scaling_technique))
        p.SetKeySwitchTechnique(getattr(openfhe.KeySwitchTechnique, params.key_switch_technique))
        p.SetDigitSize(params.key_switch_digit_bits)
        p.SetCKKSDataType(openfhe.CKKSDataType.COMPLEX)
        try:
            cc = openfhe.GenCryptoContext(p)
        except RuntimeError as exc:  # OpenFHE refuses parameters below the security level
            raise ParameterError(f"OpenFHE refused the parameter set: {exc}") from exc
        for feature in (
            openfhe.PKESchemeFeature.PKE,
            openfhe.PKESchemeFeature.KEYSWITCH,
            openfhe.PKESchemeFeature.LEVELEDSHE,
            openfhe.PKESchemeFeature.ADVANCEDSHE,  # EvalAddMany: a group of products summed in one call
        ):
            cc.Enable(feature)
        if cc.GetRingDimension() != params.ring_dimension:
            raise ParameterError(f"OpenFHE chose ring dimension {cc.GetRingDimension()}, not {params.ring_dimension}")
        _CONTEXTS[params] = cc
        return cc


def context_fingerprint(cc: openfhe.CryptoContext) -> bytes:
    """SHA-256 of the serialized context: equal exactly when every parameter and modulus is."""
    return hashlib.sha256(openfhe.Serialize(cc, openfhe.BINARY)).digest()


def limb_moduli(cc: openfhe.CryptoContext) -> tuple[int, int]:
    """(q0, q1) of a depth-1 context. The binding gives q0 exactly but Q = q0 q1 only as a float;
    q1 is the one number = 1 mod 2N within the float's error (a few units, far below 2N) of
    Q / q0, and it must appear as a word in the serialized context."""
    q0 = int(cc.GetModulusCKKS())
    order = 2 * cc.GetRingDimension()
    estimate = round(float(cc.GetModulus()) / q0)
    q1 = estimate - (estimate - 1) % order
    if estimate - q1 > order // 2:
        q1 += order
    if struct.pack("<Q", q1) not in openfhe.Serialize(cc, openfhe.BINARY):
        raise RuntimeError("could not identify the context's second modulus; OpenFHE's API changed")
    return q0, q1
