"""Checked (de)serialization of queries, score ciphertexts, public keys and rotation-key maps.

Untrusted bytes never reach OpenFHE's deserializer before they are checked completely against
the mesh's own serialization of the same object type and level (a ``StructureTemplate``):

* OpenFHE's binary format for a given object type, parameter set and level is fixed except for
  the key tag (a random lowercase hex string, each occurrence preceded by its length) and the
  coefficient vectors (cereal vectors: a uint64 length ``N``, then ``N`` words, followed by the
  limb's modulus). Two references made under two independent key pairs are diffed: every byte
  that differs must lie in a tag or in a run of ``N`` words that differ *all*; everything else
  (lengths, moduli, element counts, pointer ids, flags) is fixed and stored.
* A candidate must have exactly a template's length (no trailing bytes), equal every fixed byte,
  carry one well-formed tag in every tag slot, and every coefficient word must be below the modulus
  written after its run (itself a fixed byte, checked to divide the context's modulus).
* OpenFHE writes parameters by reference or in full depending on where a polynomial came from (a
  public key that was itself deserialized is written with ~200 bytes more; so is a ciphertext made
  under such a key). Those variants are enumerated as references of their own, each a template;
  nothing else is accepted.

So OpenFHE is only ever handed bytes it wrote itself up to tags and in-range coefficients: no
input can make it abort, register a foreign context or allocate by a length field. After
deserializing, the embedded context's fingerprint, level, scale degree and slot count are checked
again, as a second line.

Kinds are registered per (object type, context, level): ``MaterialCodec.register_ciphertext``
adds a ciphertext of any context and level with one call; ``register`` takes any reference makers.
The device checks the server's score ciphertexts the same way (``cipherfeed.he.scorecheck``).
"""

from __future__ import annotations

import hashlib
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np
import openfhe

from cipherfeed.errors import InvalidArgument, Reason
from cipherfeed.he import globalkeys
from cipherfeed.he.params import HEParams, build_context, context_fingerprint


class MaterialError(InvalidArgument):
    """Untrusted HE material was refused; the message says why and is safe to return to a caller."""

    reason = Reason.HE_MATERIAL_INVALID


class LayoutError(RuntimeError):
    """OpenFHE's reference serializations do not have the structure this module expects (its
    format changed): the service must not start."""


class Kind(Enum):
    QUERY = "query ciphertext"
    PUBLIC_KEY = "public key"
    ROTATION_KEYS = "rotation key map"


KindKey = Kind | str  # the mesh's kinds, or a label another module registered
Buffer = bytes | bytearray | memoryview
ReferenceMaker = Callable[[], list[tuple[bytes, str]]]
"""Serializations of one object type under one fresh key pair, one per legitimate layout, each
with the key pair's tag."""

TAG_PATTERN = re.compile(rb"[0-9a-f]+")


def label(kind: KindKey) -> str:
    return kind.value if isinstance(kind, Kind) else kind


@dataclass(frozen=True)
class Run:
    """A coefficient vector: ``words`` words from byte ``start``, each below ``modulus``."""

    start: int
    words: int
    modulus: int

    @property
    def end(self) -> int:
        return self.start + 8 * self.words


@dataclass(frozen=True)
class StructureTemplate:
    """One exact serialization layout: its length, its fixed bytes, its tag slots and runs."""

    length: int
    fixed_at: np.ndarray  # int64 offsets of every byte outside tags and coefficient runs
    fixed: np.ndarray  # uint8: the reference's value at each of them
    tags: tuple[int, ...]  # offsets of the key tag's occurrences
    tag_length: int
    runs: tuple[Run, ...]
    header: bytes  # every byte before the first tag (fixed)

    @classmethod
    def learn(
        cls, first: tuple[bytes, str], second: tuple[bytes, str], ring_dimension: int, modulus: int
    ) -> StructureTemplate:
        """The layout shared by two serializations of one object type under two key pairs.

        Runs are located exactly: a uint64 ``ring_dimension`` at the same offset in both, then
        ``ring_dimension`` words of which *every one* differs between the two (random residues
        collide with probability ~2^-55 per word), then a modulus that divides the context's
        ``modulus``. Every other differing byte must be a tag; anything else raises LayoutError.
        """
        (a, a_tag), (b, b_tag) = first, second
        if len(a) != len(b):
            raise LayoutError("reference serializations differ in length; OpenFHE's layout changed")
        if len(a_tag) != len(b_tag) or not TAG_PATTERN.fullmatch(a_tag.encode()) or a_tag == b_tag:
            raise LayoutError(f"unexpected key tags {a_tag!r}, {b_tag!r}")
        va, vb = np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)
        runs: list[Run] = []
        marker = struct.pack("<Q", ring_dimension)
        pos = a.find(marker)
        while pos != -1:
            start = pos + 8
            end = start + 8 * ring_dimension
            if end + 8 <= len(a) and b[pos:start] == marker and a[end : end + 8] == b[end : end + 8]:
                wa = np.frombuffer(a, "<u8", ring_dimension, start)
                wb = np.frombuffer(b, "<u8", ring_dimension, start)
                (q,) = struct.unpack_from("<Q", a, end)
                if np.all(wa != wb) and q > 1 and modulus % q == 0 and bool(np.all(wa < q) and np.all(wb < q)):
                    runs.append(Run(start, ring_dimension, q))
                    pos = a.find(marker, end)
                    continue
            pos = a.find(marker, pos + 1)
        tags = _occurrences(a, a_tag.encode())
        if not runs or not tags or _occurrences(b, b_tag.encode()) != tags:
            raise LayoutError("no coefficient runs or key tags where expected; OpenFHE's layout changed")
        fixed_mask = np.ones(len(a), dtype=bool)
        for run in runs:
            fixed_mask[run.start : run.end] = False
        for t in tags:
            fixed_mask[t : t + len(a_tag)] = False
        if np.any((va != vb) & fixed_mask):
            where = int(np.flatnonzero((va != vb) & fixed_mask)[0])
            raise LayoutError(f"reference serializations differ at byte {where}, outside tags and coefficients")
        fixed_at = np.flatnonzero(fixed_mask)
        return cls(
            length=len(a),
            fixed_at=fixed_at,
            fixed=va[fixed_at].copy(),
            tags=tuple(tags),
            tag_length=len(a_tag),
            runs=tuple(runs),
            header=a[: tags[0]],
        )

    @property
    def structure_offsets(self) -> np.ndarray:
        """Every offset that is not a coefficient word (fixed bytes and tag bytes), ascending."""
        tag_bytes = [np.arange(t, t + self.tag_length) for t in self.tags]
        return np.sort(np.concatenate([self.fixed_at, *tag_bytes]))

    def same_layout(self, other: StructureTemplate) -> bool:
        return (
            self.length == other.length
            and self.tags == other.tags
            and self.runs == other.runs
            and np.array_equal(self.fixed_at, other.fixed_at)
            and np.array_equal(self.fixed, other.fixed)
        )

    def mismatch(self, data: Buffer, what: str, tag: bytes | None = None) -> str | None:
        """Why ``data`` is not an instance of this layout, or None if it is. With ``tag`` every tag
        slot must hold exactly it (the caller knows the tag), else any one lowercase-hex tag."""
        if len(data) != self.length:
            return f"{what} is {len(data)} bytes"
        view = np.frombuffer(data, np.uint8)
        differs = view[self.fixed_at] != self.fixed
        if differs.any():
            where = int(self.fixed_at[int(np.argmax(differs))])
            return f"{what} was not made with the mesh's crypto parameters (byte {where} is not the mesh's)"
        mv = memoryview(data).cast("B")
        found = bytes(mv[self.tags[0] : self.tags[0] + self.tag_length])
        if tag is not None and found != tag:
            return f"{what} does not carry the expected key tag"
        if not (tag is not None or TAG_PATTERN.fullmatch(found)) or any(
            bytes(mv[t : t + self.tag_length]) != found for t in self.tags[1:]
        ):
            return f"{what} carries a malformed or inconsistent key tag"
        for i, run in enumerate(self.runs):
            words = np.frombuffer(data, "<u8", run.words, run.start)
            if (words >= np.uint64(run.modulus)).any():
                return f"{what} has a coefficient not below its modulus (vector {i})"
        return None


def _occurrences(blob: bytes, needle: bytes) -> list[int]:
    found, pos = [], blob.find(needle)
    while pos != -1:
        found.append(pos)
        pos = blob.find(needle, pos + len(needle))
    return found


@dataclass(frozen=True)
class KindTemplates:
    """Every legitimate layout of one kind (see the module docstring on variants)."""

    what: str
    variants: tuple[StructureTemplate, ...]

    def check(self, data: Buffer, tag: bytes | None = None) -> StructureTemplate:
        """The variant ``data`` is an instance of; MaterialError unless there is one."""
        reasons = []
        for variant in self.variants:
            reason = variant.mismatch(data, self.what, tag)
            if reason is None:
                return variant
            reasons.append(reason)
        if all(len(data) != v.length for v in self.variants):
            lengths = " or ".join(str(v) for v in sorted({v.length for v in self.variants}))
            raise MaterialError(
                f"{self.what} is {len(data)} bytes; this parameter set's is {lengths} bytes"
                " (truncated, padded, or from another ring size or level)"
            )
        raise MaterialError(next(r for r, v in zip(reasons, self.variants, strict=True) if len(data) == v.length))

    @property
    def header(self) -> bytes:
        return self.variants[0].header

    @property
    def length(self) -> int:
        return self.variants[0].length


ByteTemplate = KindTemplates  # the name this module's callers knew


def serialize(obj: object) -> bytes:
    return openfhe.Serialize(obj, openfhe.BINARY)


def ciphertext_references(cc: openfhe.CryptoContext, slots: int, level: int = 0) -> ReferenceMaker:
    """Reference serializations of a fresh CKKS ciphertext of ``cc`` at ``level`` with ``slots``
    slots, in every layout a legitimate client writes: encrypted under its key pair's public key,
    or under that key after a save and load, each as encrypted or as saved and loaded again."""

    def make() -> list[tuple[bytes, str]]:
        kp = cc.KeyGen()
        tag = kp.publicKey.GetKeyTag()
        loaded = openfhe.DeserializePublicKeyString(serialize(kp.publicKey), openfhe.BINARY)
        zeros = np.zeros(slots, dtype=np.complex128)
        out = []
        for pk in (kp.publicKey, loaded):
            blob = serialize(cc.Encrypt(pk, cc.MakeCKKSPackedPlaintext(zeros, 1, level, None, slots)))
            out += [(blob, tag), (serialize(openfhe.DeserializeCiphertextString(blob, openfhe.BINARY)), tag)]
        return out

    return make


def public_key_references(cc: openfhe.CryptoContext) -> ReferenceMaker:
    def make() -> list[tuple[bytes, str]]:
        kp = cc.KeyGen()
        blob = serialize(kp.publicKey)
        again = serialize(openfhe.DeserializePublicKeyString(blob, openfhe.BINARY))
        return [(blob, kp.publicKey.GetKeyTag()), (again, kp.publicKey.GetKeyTag())]

    return make


def rotation_key_references(cc: openfhe.CryptoContext, indices: list[int]) -> ReferenceMaker:
    """Maps generated from a fresh or a loaded secret key, each as generated or saved and loaded."""

    def make() -> list[tuple[bytes, str]]:
        kp = cc.KeyGen()
        tag = kp.publicKey.GetKeyTag()
        loaded_sk = openfhe.DeserializePrivateKeyString(serialize(kp.secretKey), openfhe.BINARY)
        out = []
        for sk in (kp.secretKey, loaded_sk):
            blob = globalkeys.generate_serialized(cc, sk, indices, tag)
            again = serialize(openfhe.DeserializeEvalKeyMapString(blob, openfhe.BINARY))
            out += [(blob, tag), (again, tag)]
        return out

    return make


def learn_templates(what: str, make: ReferenceMaker, cc: openfhe.CryptoContext) -> KindTemplates:
    """Every distinct layout among two rounds of ``make``'s references."""
    ring, modulus = cc.GetRingDimension(), int(cc.GetElementParams().GetModulus())
    first, second = make(), make()
    if len(first) != len(second) or not first:
        raise LayoutError(f"reference maker for {what} returned {len(first)} and {len(second)} references")
    variants: list[StructureTemplate] = []
    for a, b in zip(first, second, strict=True):
        learned = StructureTemplate.learn(a, b, ring, modulus)
        if not any(learned.same_layout(v) for v in variants):
            variants.append(learned)
    return KindTemplates(what, tuple(variants))


def ciphertext_sha256(blobs: list[bytes]) -> bytes:
    """SHA-256 over each blob's 8-byte big-endian length and bytes, in order."""
    digest = OrderedDigest(len(blobs))
    for i, blob in enumerate(blobs):
        digest.add(i, blob)
    return digest.digest()


class OrderedDigest:
    """``ciphertext_sha256`` of ``count`` blobs handed over in any order (e.g. by the threads that
    make them): each is hashed as soon as every blob before it is in, so hashing overlaps the
    work still going on instead of following it."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._next = 0
        self._waiting: dict[int, bytes] = {}
        self._hash = hashlib.sha256()
        self._lock = threading.Lock()

    def add(self, index: int, blob: bytes) -> None:
        with self._lock:
            if not self._next <= index < self._count or index in self._waiting:
                raise ValueError(f"blob {index} is out of range or already added")
            self._waiting[index] = blob
            while self._next in self._waiting:
                ready = self._waiting.pop(self._next)
                self._hash.update(len(ready).to_bytes(8, "big"))
                self._hash.update(ready)
                self._next += 1

    def digest(self) -> bytes:
        with self._lock:
            if self._next != self._count:
                raise RuntimeError(f"{self._count - self._next} of {self._count} blobs are missing")
            return self._hash.digest()


class MaterialCodec:
    """Validating loader for one parameter set; templates are learned once, lazily (``warm_up``
    learns them all before serving)."""

    def __init__(self, params: HEParams) -> None:
        self.params = params
        self.cc = build_context(params)
        self.fingerprint = context_fingerprint(self.cc)
        self._makers: dict[str, tuple[ReferenceMaker, openfhe.CryptoContext]] = {}
        self._templates: dict[str, KindTemplates] = {}
        self._lock = threading.Lock()
        self._vessel: openfhe.Ciphertext | None = None
        self.register(Kind.QUERY, ciphertext_references(self.cc, params.slots), self.cc)
        self.register(Kind.PUBLIC_KEY, public_key_references(self.cc), self.cc)
        self.register(Kind.ROTATION_KEYS, rotation_key_references(self.cc, params.rotation_indices), self.cc)

    def register(self, kind: KindKey, make: ReferenceMaker, cc: openfhe.CryptoContext) -> None:
        """Adds (or replaces) a kind of material: ``make`` returns reference serializations of it
        in ``cc`` under one fresh key pair, one per legitimate layout."""
        with self._lock:
            self._makers[label(kind)] = (make, cc)
            self._templates.pop(label(kind), None)

    def register_ciphertext(self, kind: KindKey, cc: openfhe.CryptoContext, slots: int, level: int = 0) -> None:
        """A fresh CKKS ciphertext of ``cc`` at ``level``: the one call another ciphertext kind needs."""
        self.register(kind, ciphertext_references(cc, slots, level), cc)

    def template(self, kind: KindKey) -> KindTemplates:
        name = label(kind)
        with self._lock:
            found = self._templates.get(name)
            if found is None:
                make, cc = self._makers[name]
                found = learn_templates(name, make, cc)
                self._templates[name] = found
            return found

    def check(self, kind: KindKey, data: Buffer, tag: bytes | None = None) -> StructureTemplate:
        """MaterialError unless ``data`` is, byte for byte outside tags and coefficients, one of the
        mesh's own serializations of ``kind``, with every coefficient below its modulus (and, when
        given, exactly ``tag`` in every tag slot)."""
        return self.template(kind).check(data, tag)

    def warm_up(self) -> None:
        """Learns every template now, so that no request pays for it."""
        with self._lock:
            names = list(self._makers)
        for name in names:
            self.template(name)
        self.vessel()

    def vessel(self) -> openfhe.Ciphertext:
        """An encryption of zero with every polynomial zero, made by this process's context: a
        deserialized query is added to it before use.

        OpenFHE evaluates a deserialized ciphertext more slowly (~5x for a ciphertext x plaintext
        product at N = 8192, ~12x for an addition, measured with openfhe 1.6.1): its polynomials
        carry their own copy of the parameters. The sum with a ciphertext this context made has
        the same polynomials and evaluates at full speed; it costs one addition (~0.05 ms), where
        moving the polynomials into a clone (SetElements) cost ~0.5 ms.
        """
        with self._lock:
            if self._vessel is None:
                kp = self.cc.KeyGen()
                zeros = np.zeros(self.params.slots, dtype=np.complex128)
                fresh = self.cc.Encrypt(kp.publicKey, self.cc.MakeCKKSPackedPlaintext(zeros))
                self._vessel = self.cc.EvalSub(fresh, fresh)
            return self._vessel

    def _check_context(self, obj_context: openfhe.CryptoContext, kind: Kind) -> None:
        if context_fingerprint(obj_context) != self.fingerprint:
            raise MaterialError(f"{kind.value} belongs to another crypto context")

    def load_query(self, data: bytes) -> openfhe.Ciphertext:
        self.check(Kind.QUERY, data)
        try:
            ct = openfhe.DeserializeCiphertextString(data, openfhe.BINARY)
        except Exception as exc:  # OpenFHE raises RuntimeError or cereal errors on garbage
            raise MaterialError(f"{Kind.QUERY.value} does not deserialize: {type(exc).__name__}") from None
        self._check_context(ct.GetCryptoContext(), Kind.QUERY)
        if ct.NumberCiphertextElements() != 2:
            raise MaterialError(f"query has {ct.NumberCiphertextElements()} elements; expected 2")
        if ct.GetLevel() != 0 or ct.GetNoiseScaleDeg() != 1:
            raise MaterialError(
                f"query is at level {ct.GetLevel()} with scale degree {ct.GetNoiseScaleDeg()}; "
                "expected a fresh ciphertext (level 0, degree 1)"
            )
        if ct.GetSlots() != self.params.slots:
            raise MaterialError(f"query uses {ct.GetSlots()} slots; the mesh uses {self.params.slots}")
        if ct.GetEncodingType() != openfhe.PlaintextEncodings.CKKS_PACKED_ENCODING:
            raise MaterialError("query is not a CKKS packed ciphertext")
        vessel = self.vessel()
        if ct.GetScalingFactor() != vessel.GetScalingFactor():
            raise MaterialError("query's scaling factor is not the parameter set's")
        ct.SetKeyTag(vessel.GetKeyTag())  # the caller files the query under its own tag afterwards
        return self.cc.EvalAdd(vessel, ct)  # same level, scale degree, slots, encoding and scale, checked above

    def load_public_key(self, data: bytes) -> openfhe.PublicKey:
        self.check(Kind.PUBLIC_KEY, data)
        try:
            pk = openfhe.DeserializePublicKeyString(data, openfhe.BINARY)
        except Exception as exc:
            raise MaterialError(f"{Kind.PUBLIC_KEY.value} does not deserialize: {type(exc).__name__}") from None
        self._check_context(pk.GetCryptoContext(), Kind.PUBLIC_KEY)
        return pk

    def load_rotation_keys(self, data: bytes) -> openfhe.EvalKeyMap:
        self.check(Kind.ROTATION_KEYS, data)
        try:
            return openfhe.DeserializeEvalKeyMapString(data, openfhe.BINARY)
        except Exception as exc:
            raise MaterialError(f"{Kind.ROTATION_KEYS.value} does not deserialize: {type(exc).__name__}") from None
