"""Clients' public key material: framing, hashing, installing in and removing from OpenFHE's
map (through ``globalkeys``), and validation. Keys are filed under tags this process chooses,
never under a tag a client supplied."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import numpy as np

from cipherfeed.he import globalkeys
from cipherfeed.he.codec import MaterialCodec, MaterialError
from cipherfeed.he.globalkeys import EVAL_KEY_LOCK

__all__ = ["EVAL_KEY_LOCK", "KeyMaterial", "install", "installed_tag", "remove", "validate"]


def installed_tag(key_id: str, version: int) -> str:
    """The tag a recommender files a client's rotation keys under and sets on its query, so the tag
    every score ciphertext it returns carries (the device checks it: ``scorecheck``)."""
    return f"{key_id}:{version}"


@dataclass(frozen=True)
class KeyMaterial:
    """A client's public HE material: its public key and its rotation-key map (both OpenFHE binary)."""

    public_key: bytes
    rotation_keys: bytes

    @property
    def sha256(self) -> bytes:
        h = hashlib.sha256()
        for part in (self.public_key, self.rotation_keys):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return h.digest()

    @property
    def size(self) -> int:
        return len(self.public_key) + len(self.rotation_keys)

    def to_bytes(self) -> bytes:
        return len(self.public_key).to_bytes(8, "big") + self.public_key + self.rotation_keys

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyMaterial:
        if len(data) < 8:
            raise MaterialError("framed key material is truncated")
        n = int.from_bytes(data[:8], "big")
        if n > len(data) - 8:
            raise MaterialError("framed key material is truncated")
        return cls(public_key=data[8 : 8 + n], rotation_keys=data[8 + n :])


def install(codec: MaterialCodec, tag: str, rotation_keys: bytes) -> int:
    """Deserializes (checked) and files the rotation keys under ``tag``; returns the filing's
    generation (for ``remove``)."""
    return globalkeys.file(codec.cc, codec.load_rotation_keys(rotation_keys), tag)


def remove(codec: MaterialCodec, tag: str, generation: int | None = None) -> None:
    """Frees the keys filed under ``tag`` (only if they are still the filing ``generation``)."""
    globalkeys.drop(codec.cc, tag, generation)


def validate(codec: MaterialCodec, material: KeyMaterial) -> None:
    """Refuses material that is not the mesh's, or whose rotation keys miss a required index.

    Every required rotation is run once on a ciphertext under the public key, with the keys filed
    under a random staging tag that is removed afterwards. (Whether the rotation keys belong to that
    public key cannot be checked without the secret key; wrong ones only garble their owner's scores.)
    """
    pk = codec.load_public_key(material.public_key)
    tag = "staging-" + secrets.token_hex(16)
    generation = install(codec, tag, material.rotation_keys)
    try:
        cc = codec.cc
        try:
            probe = cc.Encrypt(pk, cc.MakeCKKSPackedPlaintext(np.zeros(codec.params.slots, dtype=np.complex128)))
        except Exception as exc:  # OpenFHE raises RuntimeError when the key does not fit the context
            raise MaterialError(
                f"public key does not encrypt under the mesh's context ({type(exc).__name__})"
            ) from None
        probe.SetKeyTag(tag)
        with EVAL_KEY_LOCK.read():
            try:
                pre = cc.EvalFastRotationPrecompute(probe)
                for index in codec.params.rotation_indices:
                    cc.EvalFastRotation(probe, index, 2 * cc.GetRingDimension(), pre)
            except Exception as exc:
                raise MaterialError(
                    f"rotation keys do not cover the required indices {codec.params.rotation_indices}"
                    f" ({type(exc).__name__})"
                ) from None
            try:
                conjugation = codec.params.conjugation_index
                cc.EvalAutomorphism(probe, conjugation, cc.GetEvalAutomorphismKeyMap(tag))
            except Exception as exc:
                raise MaterialError(f"rotation keys lack the conjugation key ({type(exc).__name__})") from None
    finally:
        remove(codec, tag, generation)
