"""Checked (de)serialization of queries, score ciphertexts, public keys and rotation-key maps.

OpenFHE registers the crypto context embedded in anything it deserializes in a process-wide
registry and never forgets it, and it evaluates whatever ring size a ciphertext carries. So
untrusted bytes are checked against a template before OpenFHE sees them: for this parameter set a
fresh query, a public key and a rotation-key map each have one exact header (context, ring and
moduli) before their first random coefficient, and a length fixed up to a little trailing metadata
(OpenFHE writes ~200 bytes more when the public key was itself deserialized); another ring size or
level changes the length by at least one limb (64 KiB). After deserializing, the
embedded context's fingerprint, level, scale degree and slot count are checked again.
"""

from __future__ import annotations

import hashlib
import threading
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


class Kind(Enum):
    QUERY = "query ciphertext"
    PUBLIC_KEY = "public key"
    ROTATION_KEYS = "rotation key map"


METADATA_SLACK = 4096  # bytes of trailing metadata allowed above the reference length


@dataclass(frozen=True)
class ByteTemplate:
    length: int
    header: bytes

    @classmethod
    def learn(cls, first: tuple[bytes, str], second: tuple[bytes, str]) -> ByteTemplate:
        """The length and header of two serializations made under two different key pairs.

        The header ends where the per-key part begins: OpenFHE writes the key tag (a random hex
        string) first, then random coefficients. Cutting at the tag, rather than at the first
        differing byte, matters: two random tags share a first character one time in sixteen.
        """
        (a, a_tag), (b, b_tag) = first, second
        if len(a) != len(b):
            raise RuntimeError("reference serializations differ in length; OpenFHE's layout changed")
        cut = a.find(a_tag.encode())
        if cut <= 0 or b.find(b_tag.encode()) != cut or a[:cut] != b[:cut]:
            raise RuntimeError("key tag not where expected in OpenFHE's serialization; its layout changed")
        return cls(length=len(a), header=a[:cut])

    def check(self, data: bytes, kind: Kind) -> None:
        if not self.length <= len(data) <= self.length + METADATA_SLACK:
            raise MaterialError(
                f"{kind.value} is {len(data)} bytes; this parameter set's is {self.length} bytes"
                " (truncated, padded, or from another ring size or level)"
            )
        if not data.startswith(self.header):
            raise MaterialError(f"{kind.value} was not made with the mesh's crypto parameters")


def serialize(obj: object) -> bytes:
    return openfhe.Serialize(obj, openfhe.BINARY)


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
    """Validating loader for one parameter set; templates are learned once, lazily."""

    def __init__(self, params: HEParams) -> None:
        self.params = params
        self.cc = build_context(params)
        self.fingerprint = context_fingerprint(self.cc)
        self._templates: dict[Kind, ByteTemplate] = {}
        self._lock = threading.Lock()
        self._vessel: openfhe.Ciphertext | None = None

    def _reference(self, kind: Kind) -> tuple[bytes, str]:
        """A serialization of ``kind`` under a fresh key pair, and that key pair's tag."""
        kp = self.cc.KeyGen()
        tag = kp.publicKey.GetKeyTag()
        if kind is Kind.PUBLIC_KEY:
            return serialize(kp.publicKey), tag
        if kind is Kind.QUERY:
            zeros = np.zeros(self.params.slots, dtype=np.complex128)
            return serialize(self.cc.Encrypt(kp.publicKey, self.cc.MakeCKKSPackedPlaintext(zeros))), tag
        return globalkeys.generate_serialized(self.cc, kp.secretKey, self.params.rotation_indices, tag), tag

    def template(self, kind: Kind) -> ByteTemplate:
        with self._lock:
            found = self._templates.get(kind)
            if found is None:
                found = ByteTemplate.learn(self._reference(kind), self._reference(kind))
                self._templates[kind] = found
            return found

    def warm_up(self) -> None:
        """Learns every template now, so that no request pays for it."""
        for kind in Kind:
            self.template(kind)
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
        self.template(Kind.QUERY).check(data, Kind.QUERY)
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
        self.template(Kind.PUBLIC_KEY).check(data, Kind.PUBLIC_KEY)
        try:
            pk = openfhe.DeserializePublicKeyString(data, openfhe.BINARY)
        except Exception as exc:
            raise MaterialError(f"{Kind.PUBLIC_KEY.value} does not deserialize: {type(exc).__name__}") from None
        self._check_context(pk.GetCryptoContext(), Kind.PUBLIC_KEY)
        return pk

    def load_rotation_keys(self, data: bytes) -> openfhe.EvalKeyMap:
        self.template(Kind.ROTATION_KEYS).check(data, Kind.ROTATION_KEYS)
        try:
            return openfhe.DeserializeEvalKeyMapString(data, openfhe.BINARY)
        except Exception as exc:
            raise MaterialError(f"{Kind.ROTATION_KEYS.value} does not deserialize: {type(exc).__name__}") from None

    def load_scores(self, data: bytes) -> openfhe.Ciphertext:
        """Client side: a score ciphertext from the server (checked against the context too)."""
        try:
            ct = openfhe.DeserializeCiphertextString(data, openfhe.BINARY)
        except Exception as exc:
            raise MaterialError(f"score ciphertext does not deserialize: {type(exc).__name__}") from None
        if context_fingerprint(ct.GetCryptoContext()) != self.fingerprint:
            raise MaterialError("score ciphertext belongs to another crypto context")
        return ct
