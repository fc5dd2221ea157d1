"""The field's baselines for the quality harness: popularity, ItemKNN, implicit ALS and BPR.

Each ``fit_*`` takes the binary users x items training matrix and hyper-parameters and returns a
scorer (user ids -> full score rows). ALS and BPR are the ``implicit`` package's CPU models.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from bench.quality_metrics import Scorer
from services.recommender.catalogues.movielens_model import train_ials


def fit_popularity(r: sp.csr_matrix) -> Scorer:
    counts = np.asarray(r.sum(axis=0)).ravel()
    return lambda users: np.broadcast_to(counts, (len(users), counts.shape[0]))


def fit_itemknn(r: sp.csr_matrix, neighbours: int = 100, shrink: float = 0.0) -> Scorer:
    """Item-based kNN: cosine similarity of item columns (optionally shrunk), each item keeping its
    ``neighbours`` most similar items; a user's score is the sum of similarities to their items."""
    rc = sp.csc_matrix(r, dtype=np.float64)
    norms = np.sqrt(np.asarray(rc.multiply(rc).sum(axis=0)).ravel())
    co = (rc.T @ rc).toarray()
    sim = co / (np.outer(norms, norms) + shrink + 1e-12)
    np.fill_diagonal(sim, 0.0)
    if neighbours < sim.shape[0]:
        cut = np.argpartition(-sim, neighbours, axis=0)[neighbours:, :]
        np.put_along_axis(sim, cut, 0.0, axis=0)
    rows = sp.csr_matrix(r, dtype=np.float64)
    return lambda users: np.asarray(rows[users] @ sim)


def _factor_scorer(user_factors: np.ndarray, item_factors: np.ndarray) -> Scorer:
    uf, itf = np.asarray(user_factors), np.asarray(item_factors)
    return lambda users: uf[users] @ itf.T


def fit_als(
    r: sp.csr_matrix,
    factors: int = 64,
    regularization: float = 0.05,
    alpha: float = 1.0,
    iterations: int = 15,
    seed: int = 0,
) -> Scorer:
    return _factor_scorer(*train_ials(r, factors, regularization, alpha, iterations, seed))


def fit_bpr(
    r: sp.csr_matrix,
    factors: int = 64,
    learning_rate: float = 0.01,
    regularization: float = 0.01,
    iterations: int = 100,
    seed: int = 0,
) -> Scorer:
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    model = BayesianPersonalizedRanking(
        factors=factors,
        learning_rate=learning_rate,
        regularization=regularization,
        iterations=iterations,
        random_state=seed,
        num_threads=1,
    )
    model.fit(sp.csr_matrix(r, dtype=np.float32), show_progress=False)
    return _factor_scorer(model.user_factors, model.item_factors)
