"""The one owner of OpenFHE's process-wide rotation-key map.

OpenFHE keeps rotation keys in a static map keyed by tag, with no lock, and its Python binding can
only clear the whole map: ``InsertEvalAutomorphismKey(empty_map, tag)`` does *not* remove a tag's
keys (measured with openfhe 1.6.1: every "removed" 9-key set stayed, ~13.5 MB each). So this module
holds the Python ``EvalKeyMap`` of every tag it filed; removing a tag clears the whole map and
files the survivors again (pointer copies, ~0.15 ms), under the write lock.

Evaluations hold the read lock; filing and removal take the write lock.
"""

from __future__ import annotations

import threading

import openfhe

from cipherfeed.he.rwlock import ReadWriteLock

EVAL_KEY_LOCK = ReadWriteLock()
_FILED: dict[str, openfhe.EvalKeyMap] = {}
_FILED_GUARD = threading.Lock()


def file(cc: openfhe.CryptoContext, key_map: openfhe.EvalKeyMap, tag: str) -> None:
    with EVAL_KEY_LOCK.write():
        with _FILED_GUARD:
            _FILED[tag] = key_map
        cc.InsertEvalAutomorphismKey(key_map, tag)


def _rebuild(cc: openfhe.CryptoContext) -> None:
    """Clears the whole map and files every tag held here again (caller holds the write lock)."""
    with _FILED_GUARD:
        survivors = list(_FILED.items())
    cc.ClearEvalAutomorphismKeys()
    for tag, key_map in survivors:
        cc.InsertEvalAutomorphismKey(key_map, tag)


def drop(cc: openfhe.CryptoContext, tag: str) -> None:
    """Removes ``tag``'s keys (and any keys not filed here, e.g. freshly generated ones)."""
    with EVAL_KEY_LOCK.write():
        with _FILED_GUARD:
            _FILED.pop(tag, None)
        _rebuild(cc)


def drop_unfiled(cc: openfhe.CryptoContext) -> None:
    """Removes keys that ``EvalRotateKeyGen`` put in the map but nobody filed here."""
    drop(cc, "")


def filed_tags() -> list[str]:
    with _FILED_GUARD:
        return list(_FILED)


def generate_serialized(
    cc: openfhe.CryptoContext, secret_key: openfhe.PrivateKey, indices: list[int], tag: str
) -> bytes:
    """Generates rotation keys and the conjugation key (the mesh's key set), returns them
    serialized as one map, and leaves nothing in the map, all under the write lock
    (``EvalRotateKeyGen`` writes to the same unlocked map evaluations read)."""
    with EVAL_KEY_LOCK.write():
        cc.EvalRotateKeyGen(secret_key, indices)
        try:
            # InsertEvalAutomorphismKey merges into the tag's map: one map holds both kinds.
            cc.InsertEvalAutomorphismKey(cc.EvalAutomorphismKeyGen(secret_key, [conjugation_index(cc)]), tag)
            return openfhe.Serialize(cc.GetEvalAutomorphismKeyMap(tag), openfhe.BINARY)
        finally:
            _rebuild(cc)


def conjugation_index(cc: openfhe.CryptoContext) -> int:
    """The automorphism X -> X^(2N-1): complex conjugation of every slot."""
    return 2 * cc.GetRingDimension() - 1
