"""Turning decrypted scores into a feed: drop seen items, cap items per creator, take the top k."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def rank_feed(
    scores: np.ndarray,
    k: int,
    creator_of: np.ndarray,
    seen: Iterable[int] = (),
    per_creator_cap: int = 2,
) -> list[int]:
    """Indices of the best ``k`` items by score, skipping ``seen`` and keeping at most
    ``per_creator_cap`` items of any creator. Ties break by lower index (stable)."""
    if k < 0 or per_creator_cap < 1:
        raise ValueError("k must be >= 0 and per_creator_cap >= 1")
    if creator_of.shape[0] != scores.shape[0]:
        raise ValueError("one creator per score is required")
    order = np.argsort(-scores, kind="stable")
    excluded = set(seen)
    taken: dict[int, int] = {}
    feed: list[int] = []
    for i in order:
        if len(feed) == k:
            break
        index = int(i)
        if index in excluded:
            continue
        creator = int(creator_of[index])
        if taken.get(creator, 0) >= per_creator_cap:
            continue
        taken[creator] = taken.get(creator, 0) + 1
        feed.append(index)
    return feed
