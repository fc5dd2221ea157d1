"""Encrypted scoring: E(s) = sum_k diag_k * rot(E(u), k) + w * popularity, over the whole catalogue.

The work is almost all ciphertext x plaintext multiply-adds (64 per block of 8,192 items), so they
run on one limb (q0), at half the cost and half the plaintext memory of two:

* The query (scale 2^55, two limbs) is first multiplied by the integer 2^L (``lift_bits``, no
  change of level or scale degree), then rotated on two limbs, where the key-switching noise is
  negligible next to 2^(55+L), and each rotation is rescaled by q1 (~2^55) to one limb: the query
  is now held at ~2^L with only the rescale's rounding noise.
* The model's diagonals are encoded once, at load, on one limb at 2^(55-L) (the values times
  2^-L at the context's scale 2^55), so every product, and so every score, is at 2^55 on q0: a
  score ciphertext decrypts like any other at level 1, scale degree 1. L balances the query's
  rounding noise (~2^-L) against the diagonals' encoding error (~2^(L-55)); L = 31 keeps the
  largest score error near 1e-5 (measured; README "Parameter choice").
* Query rotations are computed once per request as a tree of hoisted rotations (one
  ``EvalFastRotationPrecompute`` per node) and shared by every block. For catalogues of up to
  ``BSGS_MAX_BLOCKS`` blocks (``bsgs``) only the 15 baby steps are made; each block sums four
  groups of 16 products over diagonals pre-rotated by the group's offset and joins them
  Horner-style with three rotations by 16 on one limb. Beyond that (``flat``) all 63 query
  rotations are made (roots at 16, 32, 48 by a chain of rotations, then a baby tree from each),
  and blocks need no rotations of their own (48 more query rotations against 3 per block).
* The products of a group are summed by one of two kernels with identical results (the tests
  compare the serialized bytes). ``openfhe``: EvalMult per product, EvalAddMany per group.
  ``native`` (``cipherfeed/he/_rnsmac.c``, used when it was compiled): the rotations'
  and diagonals' polynomials are read out of OpenFHE's serializations once (``onelimb``) and
  each group is summed per coefficient in 128 bits with one reduction, ~7x less work than
  OpenFHE's per-product calls; group sums go back into OpenFHE (deserialized) only where a
  giant-step rotation needs them, and the last Horner step is summed in the kernel too.
* The popularity prior is added on q0 at the end, so a score ciphertext is one limb.
* OpenFHE releases the GIL, and so does the kernel: rotations, blocks and encoding run on a pool
  of ``threads`` threads, one task per block (finer tasks measured no better: the GIL round trips
  cost what they balance).
"""

from __future__ import annotations

import importlib.metadata
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import openfhe

from cipherfeed.he import globalkeys, packing, rnsmac
from cipherfeed.he.codec import serialize
from cipherfeed.he.onelimb import OneLimbLayout
from cipherfeed.he.params import HEParams, build_context
from services.recommender.artifact import ModelArtifact

# Where the flat strategy's 48 extra query rotations cost less than 3 giant steps per block
# (measured on 2 cores): the native kernel makes blocks cheap, so it crosses over sooner.
BSGS_MAX_BLOCKS = {"native": 30, "openfhe": 60}
QUERY_LIFT_BITS = 31
T = TypeVar("T")


@dataclass(frozen=True)
class ScoreTiming:
    rotations_ms: float
    blocks_ms: float

    @property
    def total_ms(self) -> float:
        return self.rotations_ms + self.blocks_ms


OPENFHE_VERSION = importlib.metadata.version("openfhe")


class SelfCheckError(RuntimeError):
    """The native kernel's scores are not OpenFHE's bytes: the recommender must not serve."""


class _RotationTree:
    """One request's hoisted rotation tree (``EncryptedScorer._rotations``), run on the pool.

    Its tasks are bound methods of this object, which holds no reference to them: a task queued
    on the pool keeps the tree alive, the tree keeps nothing that points back. Nested functions
    that submit one another (``node`` -> ``child`` -> ``node``) are a reference cycle through
    their closure cells, which also held the request's rescaled rotations and the caller's
    ``lowered`` (with its words): ~3 MB a Score that only the cyclic collector freed, and it ran
    seldom enough under load for the recommender's in-use heap to climb by ~250 MB between
    collections (the load benchmark's RSS growth). Without the cycle they are freed when the
    request's last task ends (tests/test_scoring_release.py)."""

    def __init__(
        self,
        cc: openfhe.CryptoContext,
        pool: ThreadPoolExecutor,
        levels: list[list[int]],
        count: int,
        cyclotomic_order: int,
    ) -> None:
        self._cc = cc
        self._pool = pool
        self._levels = levels
        self._count = count
        self._order = cyclotomic_order
        self._lowered: Callable[[int, openfhe.Ciphertext], None] | None = None
        self._rescaled: dict[int, openfhe.Ciphertext] = {}
        self._failures: list[BaseException] = []
        self._guard = threading.Lock()
        self._finished = threading.Event()

    def run(
        self, roots: dict[int, openfhe.Ciphertext], lowered: Callable[[int, openfhe.Ciphertext], None] | None
    ) -> list[openfhe.Ciphertext]:
        self._lowered = lowered
        for offset, ct in roots.items():
            self._pool.submit(self._node, offset, ct, 0)
        self._finished.wait()
        if self._failures:
            raise self._failures[0]
        return [self._rescaled[k] for k in range(self._count)]

    def _settle(self, offset: int, low: openfhe.Ciphertext | None, failure: BaseException | None = None) -> None:
        with self._guard:
            if failure is not None:
                self._failures.append(failure)
            else:
                self._rescaled[offset] = low
            if self._failures or len(self._rescaled) == self._count:
                self._finished.set()

    def _lower(self, offset: int, ct: openfhe.Ciphertext) -> None:
        try:
            low = self._cc.Rescale(ct)
            if self._lowered is not None:
                self._lowered(offset, low)
            self._settle(offset, low)
        except BaseException as exc:  # handed to the caller by run
            self._settle(offset, None, exc)

    def _node(self, offset: int, ct: openfhe.Ciphertext, depth: int) -> None:
        children = [(d, step) for d in range(depth, len(self._levels)) for step in self._levels[d]]
        if not children:
            self._lower(offset, ct)
            return
        self._pool.submit(self._lower, offset, ct)
        try:
            pre = self._cc.EvalFastRotationPrecompute(ct)
        except BaseException as exc:  # its children will never come: fail the whole tree
            self._settle(offset, None, exc)
            return
        for d, step in children:
            self._pool.submit(self._child, offset + step, ct, step, pre, d + 1)

    def _child(self, offset: int, parent: openfhe.Ciphertext, step: int, pre: object, depth: int) -> None:
        try:
            ct = self._cc.EvalFastRotation(parent, step, self._order, pre)
        except BaseException as exc:
            self._settle(offset, None, exc)
            return
        self._node(offset, ct, depth)


class EncryptedScorer:
    """Holds one model's pre-encoded plaintexts and scores encrypted queries against them."""

    def __init__(
        self,
        model: ModelArtifact,
        params: HEParams,
        pool: ThreadPoolExecutor,
        strategy: str = "auto",
        lift_bits: int = QUERY_LIFT_BITS,
        kernel: str = "auto",
        diagonals: bool = True,
    ) -> None:
        """``diagonals=False``: no model plaintexts, only the query's rotations
        (``rotation_words``): a sharding coordinator's, which rotates once for every shard."""
        if not 0 < lift_bits < params.scaling_mod_bits:
            raise ValueError(f"query lift of {lift_bits} bits is outside 1..{params.scaling_mod_bits - 1}")
        if model.dim > params.padded_dim:
            raise ValueError(f"model dimension {model.dim} exceeds the parameter set's {params.padded_dim}")
        # |score| <= |x| |u| + w * popularity with a unit query: it must fit q0's headroom.
        largest = float(np.linalg.norm(model.embeddings, axis=1).max()) if model.item_count else 0.0
        bound = largest + model.popularity_weight * float(np.abs(model.popularity).max(initial=0.0))
        if bound >= params.score_bound / 2:
            raise ValueError(f"scores may reach {bound:.2f}; the parameter set decrypts below {params.score_bound}")
        self.model = model
        self.params = params
        self.cc = build_context(params)
        self._pool = pool
        self._lift = 1 << lift_bits
        self._diagonal_scale = 2.0**-lift_bits
        self._cyclotomic_order = 2 * self.cc.GetRingDimension()
        self.block_count = packing.block_count(model.item_count, params.items_per_ciphertext)
        if kernel == "auto":
            kernel = "native" if rnsmac.available() else "openfhe"
        if kernel not in ("native", "openfhe"):
            raise ValueError(f"unknown scoring kernel {kernel!r}")
        if kernel == "native" and not rnsmac.available():
            raise RuntimeError("the native scoring kernel was asked for but is not built")
        self.kernel = kernel
        if strategy == "auto":
            strategy = "bsgs" if self.block_count <= BSGS_MAX_BLOCKS[kernel] else "flat"
        if strategy not in ("flat", "bsgs"):
            raise ValueError(f"unknown scoring strategy {strategy!r}")
        self.strategy = strategy
        baby = params.baby_steps
        # bsgs: each block sums giant_steps groups of `baby` products and joins them Horner-style,
        # rotating by `baby` on one limb; flat: the query is rotated by every offset, no giant steps.
        self._groups = [g * baby for g in range(params.giant_steps)] if strategy == "bsgs" else [0]
        self._per_group = baby if strategy == "bsgs" else params.padded_dim
        # A short last block is folded (see packing): 1/F of the products, no giant steps.
        # One rule for both strategies (and for the client, which checks it): at most giant_steps.
        self.tail_fold = packing.tail_fold(model.item_count, params.slots, params.padded_dim, params.giant_steps)
        # (groups, products per group) of each block
        self._shape = [(len(self._groups), self._per_group)] * self.block_count
        if self.tail_fold > 1:
            folded = len(self._groups) // self.tail_fold, self._per_group
            if strategy == "flat":
                folded = 1, self._per_group // self.tail_fold
            self._shape[-1] = folded
        self._modulus = int(self.cc.GetModulusCKKS())  # q0: the one limb every product lives on
        if kernel == "native":
            self._layout, self._unit = self._one_limb_reference()
        if not diagonals:
            return
        self._popularity: list[openfhe.Plaintext] = list(pool.map(self._encode_popularity, range(self.block_count)))
        if kernel == "native":
            # Each block's diagonals as words (groups, n, products) in Montgomery form, and its
            # popularity prior as the words (2, n) of (pt, 0): OpenFHE's own encodings, read out once.
            native = list(pool.map(self._native_block, range(self.block_count)))
            self._diagonal_words = [d for d, _ in native]
            self._prior_words = [p for _, p in native]
        else:
            self._diagonals: list[list[openfhe.Plaintext]] = list(pool.map(self._encode_block, range(self.block_count)))

    def _folded(self, b: int) -> bool:
        return self.tail_fold > 1 and b == self.block_count - 1

    def _encode_block(self, b: int) -> list[openfhe.Plaintext]:
        p = self.params
        start = b * p.items_per_ciphertext
        block = self.model.embeddings[start : start + p.items_per_ciphertext].astype(np.float64)
        block *= self._diagonal_scale
        if self._folded(b):
            block = packing.folded_block(block, self.tail_fold, p.slots, p.padded_dim)
        diagonals = packing.block_diagonals(block, p.padded_dim, p.slots)
        groups, products = self._shape[b]
        # Group g uses diag_{g+j} rotated by -g, so that rot(sum_j pt * rot(u, j), g) is exact.
        return [
            self.cc.MakeCKKSPackedPlaintext(np.roll(diagonals[g + j], g), 1, 1, None, p.slots)
            for g in self._groups[:groups]
            for j in range(products)
        ]

    def _one_limb_reference(self) -> tuple[OneLimbLayout, openfhe.Ciphertext]:
        """The serialization layout of a one-limb ciphertext, and a one-limb ciphertext (1, 0):
        c0 = 1 at every evaluation point, so that its product with a plaintext *is* the
        plaintext's polynomial as OpenFHE encoded it."""
        kp = self.cc.KeyGen()
        zeros = np.zeros(self.params.slots, dtype=np.complex128)
        fresh = self.cc.Encrypt(kp.publicKey, self.cc.MakeCKKSPackedPlaintext(zeros))
        one_limb = self.cc.Rescale(self.cc.EvalMultNoCheck(fresh, self._lift))
        reference = serialize(one_limb)
        layout = OneLimbLayout.learn(reference, self.params.ring_dimension, (self._modulus,))
        polys = np.zeros((2, self.params.ring_dimension), dtype=np.uint64)
        polys[0] = 1
        loaded = openfhe.DeserializeCiphertextString(layout.write(reference, polys), openfhe.BINARY)
        # Added to a zero this context made, like every deserialized ciphertext here (see
        # _native_block_scores): the sum evaluates at full speed.
        return layout, self.cc.EvalAdd(self.cc.EvalSub(one_limb, one_limb), loaded)

    def _plaintext_words(self, pt: openfhe.Plaintext) -> rnsmac.Words:
        polys = np.empty((2, self.params.ring_dimension), dtype=np.uint64)
        self._layout.read(serialize(self.cc.EvalMult(self._unit, pt)), polys)
        return polys[0]

    def _native_block(self, b: int) -> tuple[rnsmac.Words, rnsmac.Words]:
        groups, products = self._shape[b]
        plaintexts = self._encode_block(b)
        words = np.empty((groups, self.params.ring_dimension, products), dtype=np.uint64)
        for i, pt in enumerate(plaintexts):
            words[i // products, :, i % products] = self._plaintext_words(pt)
        rnsmac.to_montgomery(words, self._modulus)
        prior = np.zeros((2, self.params.ring_dimension), dtype=np.uint64)  # a plaintext adds to c0 only
        prior[0] = self._plaintext_words(self._popularity[b])
        return words, prior

    def _encode_popularity(self, b: int) -> openfhe.Plaintext:
        start = b * self.params.items_per_ciphertext
        prior = self.model.popularity_weight * self.model.popularity[start : start + self.params.items_per_ciphertext]
        if self._folded(b):
            values = packing.folded_values(prior, self.tail_fold, self.params.slots)
        else:
            values = packing.block_values(prior, self.params.slots)
        # Level 1, scale 2^55: where the scores live.
        return self.cc.MakeCKKSPackedPlaintext(values, 1, 1, None, self.params.slots)

    def _rotations(
        self,
        query: openfhe.Ciphertext,
        lowered: Callable[[int, openfhe.Ciphertext], None] | None = None,
        lifted: bool = False,
    ) -> list[openfhe.Ciphertext]:
        """rot(2^L query, k) for k < per_group, on two limbs, each rescaled to one limb (and
        handed to ``lowered(k, ct)`` in the task that made it).

        Roots sit at the giant offsets (flat only: a chain of rotations by ``baby_steps``). Every
        node spawns the baby-step tree below it as soon as it exists: a node made at tree depth d
        is precomputed once and rotated by the steps of every level from d on (the root by 4, 8,
        12 and by 1, 2, 3 at once), its children submitted as soon as the precomputation is
        done, and its own rescale submitted before it starts, so neither thread waits for a level
        to finish (nor, at the root, for the first precomputation)."""
        root = query if lifted else self.cc.EvalMultNoCheck(query, self._lift)
        roots = {0: root}
        for offset in range(self.params.baby_steps, self._per_group, self.params.baby_steps):
            root = self.cc.EvalRotate(root, self.params.baby_steps)
            roots[offset] = root
        tree = _RotationTree(self.cc, self._pool, self.params.baby_levels(), self._per_group, self._cyclotomic_order)
        return tree.run(roots, lowered)

    def _group(
        self, b: int, g: int, rotations: list[openfhe.Ciphertext], diagonals: list[openfhe.Plaintext]
    ) -> openfhe.Ciphertext:
        """sum_j diag'_{g+j} * rot(u, j): one group's products, on one limb. EvalAddMany sums them
        in one call: fewer trips through the GIL than one EvalAddInPlace per product (~13% on 2
        threads)."""
        count = self._shape[b][1]
        products = [self.cc.EvalMult(rotations[j], diagonals[g * count + j]) for j in range(count)]
        return self.cc.EvalAddMany(products)

    def _join(self, groups: list[openfhe.Ciphertext]) -> openfhe.Ciphertext:
        """Horner: P_0 + rot(P_1 + rot(P_2 + ..., step), step)."""
        total = groups[-1]
        for partial in reversed(groups[:-1]):
            total = self.cc.EvalRotate(total, self.params.baby_steps)
            self.cc.EvalAddInPlace(total, partial)
        return total

    def _block(self, b: int, rotations: list[openfhe.Ciphertext], diagonals: list[openfhe.Plaintext]) -> bytes:
        """One block's serialized score ciphertext, with OpenFHE's products."""
        total = self._join([self._group(b, g, rotations, diagonals) for g in range(self._shape[b][0])])
        self.cc.EvalAddInPlace(total, self._popularity[b])
        return serialize(total)

    def _native_block_scores(self, b: int, words: rnsmac.Words, template: bytes, zero: openfhe.Ciphertext) -> bytes:
        """The same ciphertext with the fused kernel: every group's products summed in one pass.

        A block of one group is its sum plus the prior, written straight into the serialization.
        Otherwise groups 1.. are loaded into OpenFHE (each added to ``zero`` first: OpenFHE
        evaluates a deserialized ciphertext's own additions ~12x slower, as it carries its own
        copy of the parameters) and joined Horner-style; the last rotation's result comes back
        out as words and is added to group 0 and the prior, written into that rotation's own
        serialization (so the bytes are those of the OpenFHE path)."""
        groups = self._shape[b][0]
        n = self.params.ring_dimension
        diagonals, prior = self._diagonal_words[b], self._prior_words[b]
        sums = np.empty((groups, 2, n), dtype=np.uint64)
        if groups == 1:
            rnsmac.multiply_accumulate(sums, words, diagonals, self._modulus, prior[None])
            return self._layout.write(template, sums[0])
        rnsmac.multiply_accumulate(sums, words, diagonals, self._modulus)
        loaded = [
            self.cc.EvalAdd(zero, openfhe.DeserializeCiphertextString(self._layout.write(template, p), openfhe.BINARY))
            for p in sums[1:]
        ]
        rotated = serialize(self.cc.EvalRotate(self._join(loaded), self.params.baby_steps))
        joined = np.empty((2, n), dtype=np.uint64)
        self._layout.read(rotated, joined)
        rnsmac.add_mod(sums[0], joined, self._modulus)
        rnsmac.add_mod(sums[0], prior, self._modulus)
        return self._layout.write(rotated, sums[0])

    def vector_runs(self, blob: bytes) -> list[tuple[int, int]] | None:
        """(byte offset, word count) of a score serialization's two polynomials, if known."""
        if self.kernel != "native":
            return None
        return [(start, self.params.ring_dimension) for start in self._layout.offsets(blob)]

    @property
    def rotation_shape(self) -> tuple[int, int, int]:
        """The shape of ``rotation_words``: (2, n, per_group - 1) words."""
        return 2, self.params.ring_dimension, self._per_group - 1

    @property
    def modulus(self) -> int:
        return self._modulus

    def rotation_words(self, query: openfhe.Ciphertext, lifted: bool = False) -> rnsmac.Words:
        """rot(2^L query, k), rescaled to one limb, for k = 1 .. per_group - 1, as words
        (``rotation_shape``): what every block needs of the query except rotation 0 (a rescale
        only, made where the query is loaded). The native kernel only; rotation keys filed under
        the query's key tag, as for ``score``."""
        if self.kernel != "native":
            raise RuntimeError("shipped rotations are words of the native kernel")
        words = np.empty(self.rotation_shape, dtype=np.uint64)

        def lowered(offset: int, low: openfhe.Ciphertext) -> None:
            if offset:
                self._layout.read(serialize(low), words[:, :, offset - 1])

        self._rotations(query, lowered, lifted)
        return words

    def _native_inputs(
        self, query: openfhe.Ciphertext, lifted: bool = False, shipped: rnsmac.Words | None = None
    ) -> tuple[rnsmac.Words, bytes, openfhe.Ciphertext]:
        """The query's rotations as words (2, n, per_group), a product's serialization to write
        scores into and a zero under the query's tag. ``shipped``: rotations 1.. as another
        process made them (``rotation_words``), so only rotation 0 (a rescale) is made here."""
        n = self.params.ring_dimension
        words = np.empty((2, n, self._per_group), dtype=np.uint64)
        first: list[tuple[bytes, openfhe.Ciphertext]] = []

        def lowered(offset: int, low: openfhe.Ciphertext) -> None:
            self._layout.read(serialize(low), words[:, :, offset])
            if offset == 0:  # outputs carry OpenFHE's metadata for a product under this key tag
                product = self.cc.EvalMult(low, self._popularity[0])
                first.append((serialize(product), self.cc.EvalSub(product, product)))

        if shipped is None:
            self._rotations(query, lowered, lifted)
        else:
            if shipped.shape != self.rotation_shape:
                raise ValueError(f"shipped rotations of shape {shipped.shape}, expected {self.rotation_shape}")
            # Rotation 0 exactly as _rotations makes it: the lifted query rescaled.
            lowered(0, self.cc.Rescale(query if lifted else self.cc.EvalMultNoCheck(query, self._lift)))
            words[:, :, 1:] = shipped
        template, zero = first[0]
        return words, template, zero

    def self_check(self, load_query: Callable[[bytes], openfhe.Ciphertext] | None = None) -> list[int]:
        """Scores the first block (and a folded or short last one) of a random query under a
        throwaway key both ways, with the native kernel and with OpenFHE's own products, and raises
        SelfCheckError unless the serialized bytes are equal. The kernel reads and writes
        OpenFHE's serializations at byte offsets, so another OpenFHE build could make it write
        wrong scores; this refuses to serve them. ``load_query`` loads the query the way requests
        are loaded (it gets the serialized query). Returns the blocks checked; nothing to compare
        without the native kernel."""
        if self.kernel != "native":
            return []
        cc = self.cc
        kp = cc.KeyGen()
        rotation = globalkeys.generate_serialized(
            cc, kp.secretKey, self.params.rotation_indices, kp.publicKey.GetKeyTag()
        )
        tag = "self-check:" + secrets.token_hex(8)
        generation = globalkeys.file(cc, openfhe.DeserializeEvalKeyMapString(rotation, openfhe.BINARY), tag)
        rng = np.random.default_rng()
        u = rng.standard_normal(self.model.dim)
        values = packing.replicate_query(u / np.linalg.norm(u), self.params.padded_dim, self.params.slots)
        fresh = cc.Encrypt(kp.publicKey, cc.MakeCKKSPackedPlaintext(values))
        query = load_query(serialize(fresh)) if load_query is not None else fresh
        query.SetKeyTag(tag)
        blocks = sorted({0, self.block_count - 1})
        try:
            with globalkeys.EVAL_KEY_LOCK.read():
                words, template, zero = self._native_inputs(query)
                native = [self._native_block_scores(b, words, template, zero) for b in blocks]
                rotations = self._rotations(query)
                reference = [self._block(b, rotations, self._encode_block(b)) for b in blocks]
        finally:
            globalkeys.drop(cc, tag, generation)
        for b, mine, theirs in zip(blocks, native, reference, strict=True):
            if mine != theirs:
                first = next(
                    (i for i, (x, y) in enumerate(zip(mine, theirs, strict=False)) if x != y),
                    min(len(mine), len(theirs)),
                )
                raise SelfCheckError(
                    f"scoring self-check failed: block {b}'s native-kernel ciphertext ({len(mine)} bytes) differs from"
                    f" OpenFHE's ({len(theirs)} bytes) from byte {first} on; openfhe {OPENFHE_VERSION} does not"
                    " serialize as the kernel expects: refusing to serve"
                )
        return blocks

    def score(
        self,
        query: openfhe.Ciphertext,
        finish: Callable[[int, bytes], T] = lambda b, blob: blob,  # type: ignore[assignment,return-value]
        lifted: bool = False,
        shipped: rnsmac.Words | None = None,
    ) -> tuple[list[T], ScoreTiming]:  # (mypy cannot type a default for a TypeVar-typed parameter)
        """The serialized encrypted scores of every block, each passed through ``finish(b, blob)``
        (e.g. pack and hash) in the block's own task, so that it overlaps other blocks' work;
        rotation keys must be filed under the query's key tag (the caller holds the key
        registry's read lock). ``lifted``: the query is already multiplied by 2^L (a history
        profile, ``history.HistoryProjector``). ``shipped``: the query's rotations 1.. as words
        (``rotation_words``, native kernel only; ignored by the openfhe kernel, which makes its own)."""
        t0 = time.perf_counter()
        if self.kernel == "native":
            words, template, zero = self._native_inputs(query, lifted, shipped)

            def block(b: int) -> T:
                return finish(b, self._native_block_scores(b, words, template, zero))

        else:
            rotations = self._rotations(query, lifted=lifted)

            def block(b: int) -> T:
                return finish(b, self._block(b, rotations, self._diagonals[b]))

        t1 = time.perf_counter()
        outputs = list(self._pool.map(block, range(self.block_count)))
        t2 = time.perf_counter()
        return outputs, ScoreTiming(rotations_ms=1e3 * (t1 - t0), blocks_ms=1e3 * (t2 - t1))
