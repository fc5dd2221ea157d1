"""The prefilter of idempotent appends: never a false "new" (every stored hash is a candidate),
across the merge of recent prefixes into the sorted array."""

import hashlib

from services.ledger import known
from services.ledger.known import KnownLeaves


def h(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest()


def test_every_known_hash_is_a_candidate_and_new_ones_mostly_are_not(monkeypatch):
    monkeypatch.setattr(known, "MERGE_AT", 64)  # exercise merges at a small size
    leaves = KnownLeaves([h(i) for i in range(100)])
    assert leaves.candidates([h(i) for i in range(100)]) == [h(i) for i in range(100)]
    for start in range(100, 1000, 50):  # recent adds, merged every 64
        leaves.add(h(i) for i in range(start, start + 50))
        assert leaves.candidates([h(i) for i in range(start + 50)]) == [h(i) for i in range(start + 50)]
    assert len(leaves) == 1000
    fresh = [h(i) for i in range(10_000, 11_000)]
    assert leaves.candidates(fresh) == []  # a 64-bit prefix collision among these is ~2**-44
    same_prefix = h(5)[:8] + bytes(24)  # a candidate only: the store decides
    assert leaves.candidates([same_prefix]) == [same_prefix]


def test_an_empty_log_has_no_candidates():
    assert KnownLeaves().candidates([h(1), h(2)]) == []
    assert KnownLeaves().candidates([]) == []
