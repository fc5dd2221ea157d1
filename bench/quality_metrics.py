"""Splits and full-ranking top-k metrics for the quality harness (bench/quality.py).

Every item the user did not interact with in training is a candidate (no sampled metrics); the
training items are excluded from the ranking. HR@k: 1 if any test item is in the top k.
Recall@k: hits / number of test items. NDCG@k: DCG of the top k with binary gains over the
ideal DCG of min(k, test items) hits. Intervals: percentile bootstrap over users.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

K = 10


@dataclass(frozen=True)
class Split:
    train: pd.DataFrame
    test: pd.DataFrame


def random_split(interactions: pd.DataFrame, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """Per user, a random ``test_fraction`` of the interactions (rounded, at least one when the user
    has two or more) is test; the rest train."""
    rng = np.random.default_rng(seed)
    key = rng.random(len(interactions))
    frame = interactions.assign(_key=key).sort_values(["user", "_key"], kind="stable")
    position = frame.groupby("user").cumcount().to_numpy()
    size = frame.groupby("user")["item"].transform("size").to_numpy()
    n_test = np.where(size >= 2, np.maximum(1, np.round(size * test_fraction)), 0)
    is_test = position < n_test
    frame = frame.drop(columns="_key")
    return Split(train=frame[~is_test].reset_index(drop=True), test=frame[is_test].reset_index(drop=True))


def random_split_global(interactions: pd.DataFrame, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """A random ``test_fraction`` of all interactions (rounded) is test, regardless of user: the
    protocol of the published MovieLens-100k table (Recommenders.jl's ``ratio_split``). Users with
    no test interaction are not scored; users with no training interaction rank from nothing."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(interactions))
    n_train = round(len(interactions) * (1.0 - test_fraction))
    frame = interactions.reset_index(drop=True)
    train = frame.iloc[np.sort(order[:n_train])].reset_index(drop=True)
    test = frame.iloc[np.sort(order[n_train:])].reset_index(drop=True)
    return Split(train=train, test=test)


def leave_latest_out(interactions: pd.DataFrame) -> Split:
    """Per user (with two or more interactions), the latest interaction is test (ties: the larger
    item index, so the split is deterministic)."""
    frame = interactions.sort_values(["user", "timestamp", "item"], kind="stable")
    last = frame.groupby("user").cumcount(ascending=False).to_numpy() == 0
    size = frame.groupby("user")["item"].transform("size").to_numpy()
    is_test = last & (size >= 2)
    return Split(train=frame[~is_test].reset_index(drop=True), test=frame[is_test].reset_index(drop=True))


def user_items(frame: pd.DataFrame) -> dict[int, np.ndarray]:
    return {int(u): g.to_numpy() for u, g in frame.groupby("user")["item"]}


def top_k(scores: np.ndarray, seen: np.ndarray, k: int = K) -> np.ndarray:
    """The k best item indices, best first, skipping ``seen``; ties break by lower index."""
    s = np.array(scores, dtype=np.float64)
    s[seen] = -np.inf
    order = np.lexsort((np.arange(s.shape[0]), -s))
    return order[:k]


def user_metrics(ranked: np.ndarray, relevant: np.ndarray, k: int = K) -> tuple[float, float, float]:
    """(HR@k, Recall@k, NDCG@k) of one user's ranked list against the user's test items."""
    rel = set(int(i) for i in relevant)
    if not rel:
        raise ValueError("a user with no test items cannot be scored")
    gains = np.array([1.0 if int(i) in rel else 0.0 for i in ranked[:k]])
    discounts = 1.0 / np.log2(np.arange(2, len(gains) + 2))
    dcg = float(gains @ discounts)
    ideal = float(np.sum(1.0 / np.log2(np.arange(2, min(k, len(rel)) + 2))))
    hits = float(gains.sum())
    return float(hits > 0), hits / len(rel), dcg / ideal


Scorer = Callable[[np.ndarray], np.ndarray]  # user ids -> (len(users), items) scores


def evaluate(score: Scorer, split: Split, k: int = K, batch: int = 256) -> dict[str, np.ndarray]:
    """Per-user HR, Recall, NDCG (arrays aligned with ``users``) for every user with test items."""
    train = user_items(split.train)
    test = user_items(split.test)
    users = np.array(sorted(test))
    out = np.zeros((len(users), 3))
    for start in range(0, len(users), batch):
        chunk = users[start : start + batch]
        scores = score(chunk)
        for row, u in enumerate(chunk):
            seen = train.get(int(u), np.zeros(0, dtype=np.int64))
            out[start + row] = user_metrics(top_k(scores[row], seen, k), test[int(u)], k)
    return {"users": users, "hr": out[:, 0], "recall": out[:, 1], "ndcg": out[:, 2]}


def bootstrap_interval(values: np.ndarray, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean over users."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarise(per_user: dict[str, np.ndarray], seed: int = 0) -> dict[str, Any]:
    summary: dict[str, Any] = {"users": len(per_user["users"])}
    for name in ("hr", "recall", "ndcg"):
        values = per_user[name]
        low, high = bootstrap_interval(values, seed=seed)
        summary[name] = {"mean": float(values.mean()), "ci95": [low, high]}
    return summary
