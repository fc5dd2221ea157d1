"""The one owner of OpenFHE's process-wide rotation-key map.

OpenFHE keeps rotation keys in a static map keyed by tag, with no lock, and its Python binding can
only clear the whole map: ``InsertEvalAutomorphismKey(empty_map, tag)`` does *not* remove a tag's
keys (measured with openfhe 1.6.1: every "removed" 9-key set stayed, ~13.5 MB each). So this module
holds the Python ``EvalKeyMap`` of every tag it filed; removing a tag clears the whole map and
files the survivors again (pointer copies, ~0.15 ms), under the write lock.

Every filing gets a generation number, and a removal names the generation it means: a removal
decided earlier (e.g. an eviction waiting for the write lock while scorings hold the read lock)
never deletes a newer filing of the same tag.

Evaluations hold the read lock; filing and removal take the write lock.
"""

from __future__ import annotations

import itertools
import threading

import openfhe

from cipherfeed.he.rwlock import ReadWriteLock

EVAL_KEY_LOCK = ReadWriteLock()
_FILED: dict[str, tuple[int, openfhe.EvalKeyMap]] = {}
_FILED_GUARD = threading.Lock()
_GENERATIONS = itertools.count(1)


def file(cc: openfhe.CryptoContext, key_map: openfhe.EvalKeyMap, tag: str) -> int:
    """Files ``key_map`` under ``tag`` (replacing any earlier filing of it); returns this filing's
    generation, for ``drop``."""
    with EVAL_KEY_LOCK.write():
        with _FILED_GUARD:
            generation = next(_GENERATIONS)
            replaced = tag in _FILED
            _FILED[tag] = (generation, key_map)
        if replaced:  # OpenFHE's insert keeps existing keys of a tag: file everything again
            _rebuild(cc)
        else:
            cc.InsertEvalAutomorphismKey(key_map, tag)
    return generation


def _rebuild(cc: openfhe.CryptoContext) -> None:
    """Clears the whole map and files every tag held here again (caller holds the write lock)."""
    with _FILED_GUARD:
        survivors = [(tag, key_map) for tag, (_, key_map) in _FILED.items()]
    cc.ClearEvalAutomorphismKeys()
    for tag, key_map in survivors:
        cc.InsertEvalAutomorphismKey(key_map, tag)


def drop(cc: openfhe.CryptoContext, tag: str, generation: int | None = None) -> bool:
    """Removes ``tag``'s keys (and any keys not filed here, e.g. freshly generated ones), unless
    ``generation`` is given and ``tag`` has been filed again since: then nothing changes. Returns
    whether the tag's keys were removed."""
    with EVAL_KEY_LOCK.write():
        with _FILED_GUARD:
            current = _FILED.get(tag)
            if current is not None and generation is not None and current[0] != generation:
                return False
            _FILED.pop(tag, None)
        _rebuild(cc)
    return current is not None


def drop_unfiled(cc: openfhe.CryptoContext) -> None:
    """Removes keys that ``EvalRotateKeyGen`` put in the map but nobody filed here."""
    drop(cc, "")


def filed_tags() -> list[str]:
    with _FILED_GUARD:
        return list(_FILED)


def generation_of(tag: str) -> int | None:
    with _FILED_GUARD:
        current = _FILED.get(tag)
        return None if current is None else current[0]


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
