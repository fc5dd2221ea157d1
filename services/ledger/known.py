"""Which leaf hashes the log may already hold, in 8 bytes a leaf: the sorted 64-bit prefixes of
every stored hash (numpy) plus a small set of recent ones, merged in now and then. A miss is
certain (the log has no such leaf); a hit is only a candidate that the store then confirms, so
idempotent appends cost no database lookup for leaves that are new."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

MERGE_AT = 1 << 16  # recent prefixes kept in a set before they are merged into the sorted array


def _prefix(h: bytes) -> int:
    return int.from_bytes(h[:8], "big")


class KnownLeaves:
    def __init__(self, hashes: Iterable[bytes] = ()) -> None:
        prefixes = np.fromiter((_prefix(h) for h in hashes), dtype=np.uint64)
        self._sorted = np.sort(prefixes)
        self._recent: set[int] = set()

    def __len__(self) -> int:
        return int(self._sorted.size) + len(self._recent)

    def add(self, hashes: Iterable[bytes]) -> None:
        self._recent.update(_prefix(h) for h in hashes)
        if len(self._recent) >= MERGE_AT:
            merged = np.concatenate([self._sorted, np.fromiter(self._recent, dtype=np.uint64)])
            self._sorted = np.sort(merged)
            self._recent.clear()

    def candidates(self, hashes: list[bytes]) -> list[bytes]:
        """The hashes among ``hashes`` that may already be in the log (every one that is)."""
        if not hashes:
            return []
        prefixes = np.fromiter((_prefix(h) for h in hashes), dtype=np.uint64, count=len(hashes))
        if self._sorted.size:
            at = np.minimum(np.searchsorted(self._sorted, prefixes), self._sorted.size - 1)
            hit = self._sorted[at] == prefixes
        else:
            hit = np.zeros(len(hashes), dtype=bool)
        recent = self._recent
        return [h for h, p, found in zip(hashes, prefixes.tolist(), hit.tolist(), strict=True) if found or p in recent]
