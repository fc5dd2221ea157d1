"""The on-device interest vector: a weighted mean of the embeddings of engaged items."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

WATCH_WEIGHT = 1.0
LIKE_WEIGHT = 2.0
COMMENT_WEIGHT = 3.0


@dataclass(frozen=True)
class Engagement:
    item_id: str
    watched: float = 1.0  # fraction of the video watched, 0..1
    liked: bool = False
    commented: bool = False
    recency_rank: int = 0  # 0 = most recent; older engagements count less

    @property
    def weight(self) -> float:
        strength = WATCH_WEIGHT * min(max(self.watched, 0.0), 1.0)
        strength += LIKE_WEIGHT * self.liked + COMMENT_WEIGHT * self.commented
        return strength / (1.0 + 0.1 * max(self.recency_rank, 0))


def interest_vector(embeddings: np.ndarray, engagements: list[Engagement]) -> np.ndarray:
    """Unit-norm weighted mean of ``embeddings`` (one row per engagement, same order)."""
    if len(engagements) == 0:
        raise ValueError("an interest vector needs at least one engagement")
    if embeddings.shape[0] != len(engagements):
        raise ValueError("one embedding per engagement is required")
    weights = np.array([e.weight for e in engagements])
    if not np.any(weights > 0):
        raise ValueError("every engagement has zero weight")
    u = weights @ np.asarray(embeddings, dtype=np.float64)
    norm = np.linalg.norm(u)
    if norm == 0:
        raise ValueError("engaged items' embeddings cancel out")
    return u / norm


def history_weights(engagements: list[Engagement], index_of: Mapping[str, int], item_count: int) -> np.ndarray:
    """The device's history as weights over catalogue indices (from the public manifest), summing
    to 1: what it encrypts and uploads (``RecommenderClient.upload_history``). Engagements with
    items the catalogue no longer lists are skipped."""
    w = np.zeros(item_count)
    for e in engagements:
        i = index_of.get(e.item_id)
        if i is not None and 0 <= i < item_count:
            w[i] += max(e.weight, 0.0)
    total = float(w.sum())
    if not total > 0:
        raise ValueError("no engagement with a catalogue item has a positive weight")
    return w / total


def history_interest(embeddings: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The plaintext twin of the encrypted history profile: ``u = X^T w``, the weighted *mean*
    embedding (not unit: the server cannot normalise under encryption; weights sum to 1, so
    ``|u| <= 1`` and the prior keeps its scale). Scores are ``X u + weight * popularity``."""
    return np.asarray(weights, dtype=np.float64) @ np.asarray(embeddings, dtype=np.float64)
