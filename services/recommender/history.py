"""History profiles: the interest vector computed under encryption, E(u) = X^T E(w).

The device uploads its engagement weights ``w`` over catalogue indices, one ciphertext per block
in the score layout (``packing.history_blocks``); the server never sees them or ``u``.

Everything happens on the query's two limbs, with no level of its own, and the result is the
*lifted* query the scorer makes from an inline query (``EncryptedScorer``: the query times the
integer 2^L, rotated on two limbs): the history ciphertexts are fresh (scale 2^55), and the
conjugate diagonals (``packing.history_diagonals``) are encoded at 2^L (the values times 2^(L-55)
at the context's scale), so every product, and so ``u``, sits at 2^(55+L) on q0 q1, where the
rotations' key-switching noise is negligible. The scorer then rescales it to one limb like any
query, and a Score by profile costs what an inline Score costs, without the lift. The ciphertexts
keep the query's metadata (level 0, scale degree 1): the products are summed over raw polynomials
(``rnsmac``) or by OpenFHE with the degree reset, as ``EvalMultNoCheck`` by an integer would leave it.

The evaluation, per history (``S`` slots, ``dp`` = 64 dimensions, ``B`` blocks):

1. ``R`` input rotations per block (``R`` = 4 for up to ``ROTATE_INPUTS_MAX_BLOCKS`` blocks, else
   1): rot(E(w_b), a) for a < R, hoisted (one precomputation per block).
2. ``dp / R`` sums t_q = sum_{b, a} rot(E(w_b), a) * rot(P_{b, a + R q}, a): 64 B products per
   limb in one kernel pass, accumulated over *all* blocks before any rotation (rotation is linear),
   read by the kernel straight from the rotated inputs' serializations (``rnsmac.multiply_accumulate_blobs``).
3. sum_q rot(t_q, R q): Horner by 16 per residue, then the baby-step levels (keys 16; 1, 2, 3;
   4, 8, 12): 63 rotations for R = 1, 15 for R = 4, whatever the catalogue size.
4. The fold over the S / dp periods (radix 4, keys 64, 256, 1024: 9 rotations) and the real part
   (one conjugation; the 1/2 is in the diagonals).

The server holds no key of its own: every rotation uses the client's registered keys.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import openfhe

from cipherfeed.he import packing, rnsmac
from cipherfeed.he.codec import ciphertext_sha256, serialize
from cipherfeed.he.onelimb import OneLimbLayout
from cipherfeed.he.params import HEParams, build_context, limb_moduli
from services.recommender.artifact import ModelArtifact
from services.recommender.scoring import QUERY_LIFT_BITS

# Below this many blocks, three hoisted input rotations per block (~3.5 ms) cost less than the
# 48 output rotations (~2.2 ms each) they save.
ROTATE_INPUTS_MAX_BLOCKS = 30
# Input rotations run on the history lifted by 2^l (an integer product), so that their
# key-switching noise (~1e-6 of a fresh ciphertext's scale, summed over every slot) shrinks by
# 2^l, while the diagonals' encoding error grows by 2^l: l = 4 balances them (largest error in u
# 5.7e-6 with l = 0, 4.9e-7 with 4, 6.6e-7 with 6, 2.9e-6 with 8; R = 1 needs no lift: 1.5e-8).
INPUT_LIFT_BITS = 4


class HistoryError(ValueError):
    """A history upload does not fit the serving catalogue."""


@dataclass(frozen=True)
class ProjectionTiming:
    """Wall time per phase. With the native kernel the input rotations run in the products'
    tasks (inputs_ms is 0) and the t_q are loaded in the rotations' tasks."""

    inputs_ms: float
    products_ms: float
    rotations_ms: float

    @property
    def total_ms(self) -> float:
        return self.inputs_ms + self.products_ms + self.rotations_ms


class HistoryProjector:
    """One model's conjugate diagonals on two limbs, and the projection E(w) -> E(u)."""

    def __init__(
        self,
        model: ModelArtifact,
        params: HEParams,
        pool: ThreadPoolExecutor,
        kernel: str = "auto",
        input_rotations: int = 0,
        lift_bits: int = QUERY_LIFT_BITS,
        input_lift_bits: int = -1,
        diagonals: bool = True,
    ) -> None:
        """``diagonals=False``: no plaintexts of the model, only what adds shares of other
        projectors (``from_partials``) and restores profiles: a sharding coordinator's."""
        if model.dim > params.padded_dim:
            raise ValueError(f"model dimension {model.dim} exceeds the parameter set's {params.padded_dim}")
        if params.baby_steps * params.giant_steps != params.padded_dim:
            raise ValueError("the history tree needs the scorer's baby and giant steps to cover the period")
        self.model = model
        self.params = params
        self.cc = build_context(params)
        self._pool = pool
        self._order = 2 * self.cc.GetRingDimension()
        self.block_count = packing.block_count(model.item_count, params.items_per_ciphertext)
        if kernel == "auto":
            kernel = "native" if rnsmac.available() else "openfhe"
        if kernel not in ("native", "openfhe"):
            raise ValueError(f"unknown kernel {kernel!r}")
        if kernel == "native" and not rnsmac.available():
            raise RuntimeError("the native kernel was asked for but is not built")
        self.kernel = kernel
        if not input_rotations:
            input_rotations = 4 if self.block_count <= ROTATE_INPUTS_MAX_BLOCKS else 1
        if input_rotations not in (1, 4) or params.padded_dim % input_rotations:
            raise ValueError(f"{input_rotations} input rotations are not supported (1 or 4)")
        self.input_rotations = input_rotations
        if input_lift_bits < 0:
            input_lift_bits = INPUT_LIFT_BITS if input_rotations > 1 else 0
        if not 0 <= input_lift_bits < lift_bits:
            raise ValueError(f"input lift of {input_lift_bits} bits is outside 0..{lift_bits - 1}")
        self._input_lift = 1 << input_lift_bits
        # The inputs sit at 2^(55 + l) after their lift; the diagonals at 2^(L - l): products at 2^(55 + L).
        self._diagonal_scale = 2.0 ** (lift_bits - input_lift_bits - params.scaling_mod_bits)
        self.sums = params.padded_dim // input_rotations  # the t_q
        self._moduli = limb_moduli(self.cc)
        n = params.ring_dimension
        self._layout, self._unit, self._fresh, self._fresh_zero = self._two_limb_reference()
        self.columns = self.block_count * input_rotations  # the (block, input rotation) pairs
        self._words: list[rnsmac.Words] = []
        self._plaintexts: list[list[list[openfhe.Plaintext]]] = []
        if not diagonals:
            pass
        elif kernel == "native":
            # The processed database, once per model: per limb (sums, n, columns) in Montgomery form.
            self._words = [np.empty((self.sums, n, self.columns), dtype=np.uint64) for _ in range(2)]
            list(pool.map(self._native_block, range(self.block_count)))
            for limb, words in enumerate(self._words):
                rnsmac.to_montgomery(words, self._moduli[limb])
        else:
            self._plaintexts = list(pool.map(self._encode, range(self.block_count)))

    # -- the model's plaintexts --------------------------------------------------------------

    def _encode(self, b: int) -> list[list[openfhe.Plaintext]]:
        """[a][q]: rot(P_{b, a + R q}, a) on two limbs at 2^L (as values times 2^(L - 55))."""
        p = self.params
        start = b * p.items_per_ciphertext
        block = self.model.embeddings[start : start + p.items_per_ciphertext].astype(np.float64)
        diagonals = packing.history_diagonals(block * self._diagonal_scale, p.padded_dim, p.slots)
        r = self.input_rotations
        return [
            [
                self.cc.MakeCKKSPackedPlaintext(np.roll(diagonals[a + r * q], -a), 1, 0, None, p.slots)
                for q in range(self.sums)
            ]
            for a in range(r)
        ]

    def _two_limb_reference(self) -> tuple[OneLimbLayout, openfhe.Ciphertext, bytes, openfhe.Ciphertext]:
        """The serialization layout of a fresh (two-limb) ciphertext, the ciphertext (1, 0) on
        both limbs (its product with a plaintext *is* the plaintext's polynomial as OpenFHE
        encoded it), a fresh ciphertext's serialization and a zero this context made."""
        kp = self.cc.KeyGen()
        zeros = np.zeros(self.params.slots, dtype=np.complex128)
        fresh = self.cc.Encrypt(kp.publicKey, self.cc.MakeCKKSPackedPlaintext(zeros))
        reference = serialize(fresh)
        layout = OneLimbLayout.learn(reference, self.params.ring_dimension, self._moduli)
        polys = np.zeros((4, self.params.ring_dimension), dtype=np.uint64)
        polys[:2] = 1  # c0 on limbs 0 and 1
        loaded = openfhe.DeserializeCiphertextString(layout.write(reference, polys), openfhe.BINARY)
        zero = self.cc.EvalSub(fresh, fresh)
        return layout, self.cc.EvalAdd(zero, loaded), reference, zero

    def export(self, profile: openfhe.Ciphertext) -> bytes:
        """E(u) as its raw polynomial words (c0 and c1 on both limbs, little-endian): what the
        cache keeps. Rebuilt by ``restore`` into this process's own ciphertext, so bytes read back
        from the cache never reach OpenFHE's deserializer as structure."""
        polys = np.empty((4, self.params.ring_dimension), dtype=np.uint64)
        self._layout.read(serialize(profile), polys)
        return polys.astype("<u8").tobytes()

    def restore(self, data: bytes) -> openfhe.Ciphertext:
        """The ciphertext of ``export`` (level 0, scale degree 1, like a lifted query); raises
        ``HistoryError`` unless ``data`` is exactly four vectors of words below their moduli."""
        polys = self.check_words(data, 1, "a stored profile")[0]
        ct = openfhe.DeserializeCiphertextString(self._layout.write(self._fresh, polys), openfhe.BINARY)
        return self.cc.EvalAdd(self._fresh_zero, ct)  # evaluates at full speed (see codec.vessel)

    def check_words(self, data: bytes, count: int, what: str) -> rnsmac.Words:
        """``count`` two-limb ciphertexts as words (count, 4, n), the layout of ``export``;
        raises ``HistoryError`` unless ``data`` is exactly that, every word below its modulus."""
        n = self.params.ring_dimension
        if len(data) != count * 4 * 8 * n:
            raise HistoryError(f"{what} is {len(data)} bytes, not {count * 4 * 8 * n}")
        polys = np.frombuffer(data, dtype="<u8").reshape(count, 4, n).astype(np.uint64)
        for vector, limb in enumerate((0, 1, 0, 1)):
            if count and int(polys[:, vector].max()) >= self._moduli[limb]:
                raise HistoryError(f"{what}'s coefficients exceed the modulus")
        return polys

    def _native_block(self, b: int) -> None:
        n = self.params.ring_dimension
        polys = np.empty((4, n), dtype=np.uint64)
        for a, row in enumerate(self._encode(b)):
            column = b * self.input_rotations + a
            for q, pt in enumerate(row):
                self._layout.read(serialize(self.cc.EvalMult(self._unit, pt)), polys)
                for limb in (0, 1):
                    self._words[limb][q, :, column] = polys[limb]

    # -- projection --------------------------------------------------------------------------

    def _rotate(self, ct: openfhe.Ciphertext, step: int) -> openfhe.Ciphertext:
        # A precomputation and a fast rotation: ~2.2 ms on two limbs, where EvalRotate takes ~5.
        return self.cc.EvalFastRotation(ct, step, self._order, self.cc.EvalFastRotationPrecompute(ct))

    def _rotated(self, ct: openfhe.Ciphertext) -> list[openfhe.Ciphertext]:
        """rot(E(w_b), a) for a < R (hoisted: one precomputation)."""
        if self._input_lift > 1:
            ct = self.cc.EvalMultNoCheck(ct, self._input_lift)
        if self.input_rotations == 1:
            return [ct]
        pre = self.cc.EvalFastRotationPrecompute(ct)
        return [ct] + [self.cc.EvalFastRotation(ct, a, self._order, pre) for a in range(1, self.input_rotations)]

    def _inputs(self, history: list[openfhe.Ciphertext]) -> list[list[openfhe.Ciphertext]]:
        return list(self._pool.map(self._rotated, history))

    def _input_blobs(self, history: list[openfhe.Ciphertext]) -> tuple[list[bytes], openfhe.Ciphertext]:
        """The rotated inputs' serializations, column by column (block-major), and the first
        input: each block's rotations and serializations in one task, so that one core
        serializes a block while the other still rotates another (no barrier in between)."""

        def block(ct: openfhe.Ciphertext) -> tuple[list[bytes], openfhe.Ciphertext]:
            rotated = self._rotated(ct)
            return [serialize(r) for r in rotated], rotated[0]

        done = list(self._pool.map(block, history))
        return [blob for blobs, _ in done for blob in blobs], done[0][1]

    def _sums_native(self, history: list[openfhe.Ciphertext], tag: str) -> Callable[[int], openfhe.Ciphertext]:
        """The t_q summed as words; returns the function that loads t_q into a ciphertext, called
        by ``_combine`` inside each Horner chain's task (the loads overlap the rotations)."""
        blobs, first = self._input_blobs(history)
        template = blobs[0]
        zero = self.cc.EvalSub(first, first)  # made by this context, under the tag
        sums = self._sum_words(blobs)

        def load(q: int) -> openfhe.Ciphertext:
            polys = np.stack([sums[0, q, 0], sums[1, q, 0], sums[0, q, 1], sums[1, q, 1]])
            ct = openfhe.DeserializeCiphertextString(self._layout.write(template, polys), openfhe.BINARY)
            ct.SetKeyTag(tag)
            return self.cc.EvalAdd(zero, ct)  # evaluates at full speed (see codec.vessel)

        return load

    def _sum_words(self, blobs: list[bytes]) -> rnsmac.Words:
        """The t_q as words (limb, t_q, c0/c1, coefficient), summed by the kernel straight from
        the inputs' serializations (one limb per core). The serializations are OpenFHE's output
        from validated history ciphertexts, so only their structure is rechecked
        (``OneLimbLayout.produced_offsets``)."""
        if len(blobs) != self.columns:
            raise HistoryError(f"{len(blobs)} rotated inputs for {self.columns} columns")
        n = self.params.ring_dimension
        starts = np.array([self._layout.produced_offsets(blob) for blob in blobs], dtype=np.int64)
        # c0 and c1 of each limb: vectors (c0 l0, c0 l1, c1 l0, c1 l1)
        offsets = [np.ascontiguousarray(starts[:, [limb, 2 + limb]]) for limb in (0, 1)]
        sums = np.empty((2, self.sums, 2, n), dtype=np.uint64)  # limb, t_q, c0/c1, coefficient

        def limb_sums(limb: int) -> None:
            rnsmac.multiply_accumulate_blobs(sums[limb], blobs, offsets[limb], self._words[limb], self._moduli[limb])

        list(self._pool.map(limb_sums, (0, 1)))
        return sums

    def _sums_openfhe(self, inputs: list[list[openfhe.Ciphertext]], tag: str) -> list[openfhe.Ciphertext]:
        scale = inputs[0][0].GetScalingFactor()

        def one(q: int) -> openfhe.Ciphertext:
            products = [
                self.cc.EvalMult(ct, self._plaintexts[b][a][q])
                for b, row in enumerate(inputs)
                for a, ct in enumerate(row)
            ]
            total = self.cc.EvalAddMany(products) if len(products) > 1 else products[0]
            # What EvalMultNoCheck by the integer 2^L leaves: the metadata of a query (see module doc).
            total.SetNoiseScaleDeg(1)
            total.SetScalingFactor(scale)
            total.SetKeyTag(tag)
            return total

        return list(self._pool.map(one, range(self.sums)))

    def _combine(self, sums: Callable[[int], openfhe.Ciphertext]) -> openfhe.Ciphertext:
        """sum_q rot(t_q, R q): Horner by the giant step per residue, then the baby levels;
        ``sums(q)`` gives t_q (each is asked for once, by the one chain it belongs to)."""
        p = self.params
        r = self.input_rotations
        residues = list(range(0, p.baby_steps, r))

        def horner(residue: int) -> openfhe.Ciphertext:
            chain = [sums((residue + g * p.baby_steps) // r) for g in range(p.giant_steps)]
            total = chain[-1]
            for partial in reversed(chain[:-1]):
                total = self.cc.EvalAdd(partial, self._rotate(total, p.baby_steps))
            return total

        at = dict(zip(residues, self._pool.map(horner, residues), strict=True))
        for level in reversed(p.baby_levels()):  # finest steps first
            unit = level[0]
            span = unit * (len(level) + 1)
            groups: dict[int, list[tuple[int, openfhe.Ciphertext]]] = {}
            for offset, ct in at.items():
                groups.setdefault(offset - offset % span, []).append((offset % span, ct))

            # Every member's rotation is its own task: one group of four (R = 4's last level)
            # would otherwise be three rotations in a row on one core.
            members = [(offset, step, ct) for offset, group in groups.items() for step, ct in group]

            def rotate(member: tuple[int, int, openfhe.Ciphertext]) -> openfhe.Ciphertext:
                return member[2] if member[1] == 0 else self._rotate(member[2], member[1])

            parts: dict[int, list[openfhe.Ciphertext]] = {}
            for (offset, _, _), part in zip(members, self._pool.map(rotate, members), strict=True):
                parts.setdefault(offset, []).append(part)
            at = {offset: self.cc.EvalAddMany(p) if len(p) > 1 else p[0] for offset, p in parts.items()}
        (total,) = at.values()
        return total

    def _fold_real(self, ct: openfhe.Ciphertext, tag: str) -> openfhe.Ciphertext:
        for step, rotations in self.params.history_fold_levels():
            total = ct
            for _ in range(rotations):
                total = self.cc.EvalAdd(ct, self._rotate(total, step))
            ct = total
        keys = self.cc.GetEvalAutomorphismKeyMap(tag)
        return self.cc.EvalAdd(ct, self.cc.EvalAutomorphism(ct, self.params.conjugation_index, keys))

    def partial_sums(self, history: list[openfhe.Ciphertext]) -> bytes:
        """This projector's share of the t_q: the products over its blocks only, as words
        (t_q, 4, n) in ``export``'s vector order. The shares of a catalogue's block ranges add
        (mod each limb's modulus) to exactly the t_q of the whole catalogue: products are summed
        before any rotation or rescale, so ``from_partials`` makes the one-projector E(u)."""
        if len(history) != self.block_count:
            raise HistoryError(f"{len(history)} history ciphertexts for {self.block_count} blocks")
        n = self.params.ring_dimension
        if self.kernel == "native":
            words = self._sum_words(self._input_blobs(history)[0])
            # (limb, q, c, n) -> (q, c, limb, n): c0 l0, c0 l1, c1 l0, c1 l1
            shares = np.ascontiguousarray(words.transpose(1, 2, 0, 3)).reshape(self.sums, 4, n)
        else:
            shares = np.empty((self.sums, 4, n), dtype=np.uint64)
            for q, ct in enumerate(self._sums_openfhe(self._inputs(history), history[0].GetKeyTag())):
                self._layout.read(serialize(ct), shares[q])
        return shares.astype("<u8").tobytes()

    def from_partials(self, partials: list[bytes], tag: str) -> tuple[openfhe.Ciphertext, ProjectionTiming]:
        """E(u) from the shares of ``partial_sums`` over every block range: added mod q, then
        the rotations of ``project`` with the client's keys filed under ``tag`` (the caller holds
        the key registry's read lock). Raises ``HistoryError`` on a malformed share."""
        t0 = time.perf_counter()
        total = np.zeros((self.sums, 4, self.params.ring_dimension), dtype=np.uint64)
        moduli = np.array([self._moduli[limb] for limb in (0, 1, 0, 1)], dtype=np.uint64)[None, :, None]
        for i, data in enumerate(partials):
            total += self.check_words(data, self.sums, f"share {i} of the history sums")
            np.subtract(total, moduli, out=total, where=total >= moduli)  # both below q < 2^58: one subtraction
        loaded = [
            openfhe.DeserializeCiphertextString(self._layout.write(self._fresh, total[q]), openfhe.BINARY)
            for q in range(self.sums)
        ]
        for ct in loaded:
            ct.SetKeyTag(tag)
        zero = self.cc.EvalSub(loaded[0], loaded[0])  # made by this context, under the tag
        sums = [self.cc.EvalAdd(zero, ct) for ct in loaded]  # evaluates at full speed (see codec.vessel)
        t1 = time.perf_counter()
        profile = self._fold_real(self._combine(sums.__getitem__), tag)
        t2 = time.perf_counter()
        return profile, ProjectionTiming(0.0, 1e3 * (t1 - t0), 1e3 * (t2 - t1))

    def project(self, history: list[openfhe.Ciphertext]) -> tuple[openfhe.Ciphertext, ProjectionTiming]:
        """E(u) (the lifted query: two limbs, level 0, scale degree 1, at 2^(55+L)) from the
        validated history ciphertexts, one per block; the client's rotation and conjugation keys
        are filed under their key tag (the caller holds the key registry's read lock)."""
        if len(history) != self.block_count:
            raise HistoryError(f"{len(history)} history ciphertexts for {self.block_count} catalogue blocks")
        tag = history[0].GetKeyTag()
        t0 = time.perf_counter()
        if self.kernel == "native":
            # The input rotations overlap their serialization (inputs_ms is 0), the loads of the
            # t_q the rotations of the sum over q (in rotations_ms).
            t1 = t0
            load = self._sums_native(history, tag)
        else:
            inputs = self._inputs(history)
            t1 = time.perf_counter()
            load = self._sums_openfhe(inputs, tag).__getitem__
        t2 = time.perf_counter()
        profile = self._fold_real(self._combine(load), tag)
        t3 = time.perf_counter()
        return profile, ProjectionTiming(1e3 * (t1 - t0), 1e3 * (t2 - t1), 1e3 * (t3 - t2))


HISTORY_MAGIC = b"CFHIST1"


@dataclass(frozen=True)
class HistoryRecord:
    """What the cache keeps for a history profile, beside the uploaded ciphertexts themselves
    (stored under their own key, read only to project them again after a model update): the
    catalogue its indices refer to, the SHA-256 the receipts name, and E(u) under the model that
    projected it."""

    key_id: str
    key_version: int
    catalogue_sha256: bytes
    history_sha256: bytes  # codec.ciphertext_sha256 of the uploaded blobs
    model_version: str = ""
    profile: bytes = b""

    def with_profile(self, model_version: str, profile: bytes) -> HistoryRecord:
        return replace(self, model_version=model_version, profile=profile)

    def to_bytes(self) -> bytes:
        kid = self.key_id.encode()
        model = self.model_version.encode()
        if len(self.catalogue_sha256) != 32 or len(self.history_sha256) != 32:
            raise ValueError("digests must be 32 bytes")
        return b"".join(
            [
                HISTORY_MAGIC,
                len(kid).to_bytes(1, "big"),
                kid,
                self.key_version.to_bytes(4, "big"),
                self.catalogue_sha256,
                self.history_sha256,
                len(model).to_bytes(1, "big"),
                model,
                len(self.profile).to_bytes(8, "big"),
                self.profile,
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> HistoryRecord:
        """Raises ``HistoryError`` on anything but a complete record."""
        if not data.startswith(HISTORY_MAGIC):
            raise HistoryError("not a history record")
        pos = len(HISTORY_MAGIC)

        def take(size: int) -> bytes:
            nonlocal pos
            if size < 0 or pos + size > len(data):
                raise HistoryError("history record is truncated")
            chunk = data[pos : pos + size]
            pos += size
            return chunk

        try:
            key_id = take(take(1)[0]).decode()
            version = int.from_bytes(take(4), "big")
            catalogue, history = take(32), take(32)
            model = take(take(1)[0]).decode()
            profile = take(int.from_bytes(take(8), "big"))
        except UnicodeDecodeError:
            raise HistoryError("history record is corrupt") from None
        if pos != len(data):
            raise HistoryError("history record has trailing bytes")
        return cls(key_id, version, catalogue, history, model, profile)


def frame_history(blobs: list[bytes]) -> bytes:
    """The uploaded ciphertexts as one cache value."""
    return HISTORY_MAGIC + len(blobs).to_bytes(4, "big") + b"".join(len(b).to_bytes(8, "big") + b for b in blobs)


def unframe_history(data: bytes, sha256: bytes) -> list[bytes]:
    """The ciphertexts of ``frame_history``, refused unless complete and hashing to ``sha256``."""
    if not data.startswith(HISTORY_MAGIC) or len(data) < len(HISTORY_MAGIC) + 4:
        raise HistoryError("stored history is unreadable")
    pos = len(HISTORY_MAGIC) + 4
    blobs = []
    for _ in range(int.from_bytes(data[pos - 4 : pos], "big")):
        size = int.from_bytes(data[pos : pos + 8], "big")
        if pos + 8 + size > len(data):
            raise HistoryError("stored history is truncated")
        blobs.append(data[pos + 8 : pos + 8 + size])
        pos += 8 + size
    if pos != len(data) or ciphertext_sha256(blobs) != sha256:
        raise HistoryError("stored history does not match its record")
    return blobs


def catalogue_sha256(item_ids: list[str]) -> bytes:
    """Binds a history to the catalogue order its indices refer to (a model update that keeps
    the catalogue keeps the history; one that changes it asks for a new upload)."""
    h = hashlib.sha256()
    for item_id in item_ids:
        encoded = item_id.encode()
        h.update(len(encoded).to_bytes(4, "big"))
        h.update(encoded)
    return h.digest()
