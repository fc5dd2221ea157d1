"""Synthetic catalogues with the real model's shapes, for scale tests and benchmarks."""

from __future__ import annotations

import numpy as np

from services.recommender.artifact import ModelArtifact
from services.recommender.model import DEFAULT_POPULARITY_WEIGHT, EMBEDDING_DIM

VIDEOS_PER_CREATOR = 27  # the dataset's mean number of listed videos per creator


def synthetic_catalogue(item_count: int, dim: int = EMBEDDING_DIM, seed: int = 0) -> ModelArtifact:
    """``item_count`` unit embeddings clustered around one centre per creator, with a
    heavy-tailed popularity prior; deterministic for a given seed."""
    if item_count < 1:
        raise ValueError("item_count must be positive")
    rng = np.random.default_rng(seed)
    creators = max(1, item_count // VIDEOS_PER_CREATOR)
    centres = rng.standard_normal((creators, dim))
    creator_index = rng.integers(0, creators, size=item_count).astype(np.int32)
    x = centres[creator_index] + 0.6 * rng.standard_normal((item_count, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    likes = rng.lognormal(mean=8.0, sigma=2.5, size=creators)
    ranks = np.argsort(np.argsort(likes)) / max(creators - 1, 1)
    return ModelArtifact(
        embeddings=x.astype(np.float32),
        popularity=ranks[creator_index].astype(np.float64),
        posted_unix=(1_600_000_000 + rng.integers(0, 10**8, size=item_count)).astype(np.int64),
        item_ids=[f"syn{seed}-{i}" for i in range(item_count)],
        creator_index=creator_index,
        creator_ids=[f"syn-creator-{c}" for c in range(creators)],
        creator_nicknames=[f"creator {c}" for c in range(creators)],
        popularity_weight=DEFAULT_POPULARITY_WEIGHT,
        created_by=f"synthetic:items={item_count}:dim={dim}:seed={seed}",
    )
