"""Clients' rotation keys held in this process (interim, until the key service issue lands).

OpenFHE evaluates a rotation with the keys filed under the ciphertext's key tag in one global map.
Keys are filed under the key id the server derives (SHA-256 of the public key), never under a tag
the client chose, and the query is re-tagged before use, so one client cannot replace another's
keys. Insertion and eviction take the write lock; evaluation holds the read lock throughout.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import openfhe

from cipherfeed.he.codec import MaterialCodec, MaterialError
from services.recommender.rwlock import ReadWriteLock


class UnknownKeyError(LookupError):
    """No rotation keys are registered under that key id (never registered, or evicted)."""


def key_id_for(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()


class EvalKeyRegistry:
    def __init__(self, codec: MaterialCodec, capacity: int) -> None:
        self.codec = codec
        self.capacity = capacity
        self.lock = ReadWriteLock()
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._lru_lock = threading.Lock()

    def register(self, public_key: bytes, rotation_keys: bytes) -> str:
        """Validates and installs a client's rotation keys; returns the key id."""
        pk = self.codec.load_public_key(public_key)
        key_map = self.codec.load_rotation_keys(rotation_keys)
        key_id = key_id_for(public_key)
        cc = self.codec.cc
        with self.lock.write():
            cc.InsertEvalAutomorphismKey(key_map, key_id)
        try:
            self._trial_rotations(pk, key_id)
        except MaterialError:
            self._remove(key_id)
            raise
        evicted: list[str] = []
        with self._lru_lock:
            self._lru[key_id] = None
            self._lru.move_to_end(key_id)
            while len(self._lru) > self.capacity:
                evicted.append(self._lru.popitem(last=False)[0])
        for old in evicted:
            self._remove(old)
        return key_id

    def _trial_rotations(self, pk: openfhe.PublicKey, key_id: str) -> None:
        """Every required rotation must run with the installed keys on a ciphertext under ``pk``."""
        cc = self.codec.cc
        zeros = cc.MakeCKKSPackedPlaintext(np.zeros(self.codec.params.slots, dtype=np.complex128))
        probe = cc.Encrypt(pk, zeros)
        probe.SetKeyTag(key_id)
        with self.lock.read():
            try:
                pre = cc.EvalFastRotationPrecompute(probe)
                for index in self.codec.params.rotation_indices:
                    cc.EvalFastRotation(probe, index, 2 * cc.GetRingDimension(), pre)
            except Exception as exc:
                raise MaterialError(
                    f"rotation keys do not cover the required indices {self.codec.params.rotation_indices}"
                    f" or do not match the public key ({type(exc).__name__})"
                ) from None

    def _remove(self, key_id: str) -> None:
        with self.lock.write():
            self.codec.cc.InsertEvalAutomorphismKey(openfhe.EvalKeyMap(), key_id)

    def __contains__(self, key_id: str) -> bool:
        with self._lru_lock:
            return key_id in self._lru

    def __len__(self) -> int:
        with self._lru_lock:
            return len(self._lru)

    @contextmanager
    def use(self, key_id: str) -> Iterator[str]:
        """Holds the read lock while the caller evaluates with ``key_id``'s keys."""
        with self.lock.read():
            with self._lru_lock:
                if key_id not in self._lru:
                    raise UnknownKeyError(f"no rotation keys registered under key id {key_id!r}")
                self._lru.move_to_end(key_id)
            yield key_id
