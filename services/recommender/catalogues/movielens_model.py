"""Models for the MovieLens catalogue: a content model from public item features, and a learned one.

Content model (scikit-learn, like the TikTok one): titles through a word TF-IDF (sublinear tf,
unigrams and bigrams) reduced by ``TruncatedSVD`` to 40 dimensions; the 19 genres one-hot; the
release year standardised plus a coarse era one-hot. Each block is scaled to unit norm and
weighted, and the concatenation L2-normalised: 64-d unit rows, so a score is a cosine.

Learned model: the mesh scores ``s = X u + prior`` with ``u = X^T w`` (w: the device's history
weights), i.e. ``s = w X X^T``, a rank-64 item-item model. The least-squares optimum of
``|R - R X X^T|`` over orthonormal ``X`` is the top-64 right singular subspace of the training
interaction matrix ``R`` (PureSVD's folding-in), and that is what is fitted: ``X = F W`` with ``F``
the public item features (the content blocks, the genre and title terms, and the item's public
catalogue index as a one-hot, so an item with no interactions still gets the feature part) and
``W`` the ridge solution ``F W ~= D^beta V``, ``V`` from the SVD of ``R D^-gamma``. Both steps are
sums over users of per-user terms (``R^T R`` for the subspace, ``F^T`` times it for ``W``), which is
what a later issue needs to fit the same model federated (secure aggregation of those sums).
Rows are scaled so the largest has norm 1 (not unit: an item's norm carries how strongly the
interactions support it, which is most of the signal on MovieLens).

A second objective, ``"ials"``, takes the subspace from implicit-feedback ALS (Hu, Koren and
Volinsky's weighted loss, the ``implicit`` package) instead of the SVD. The mesh's form is exact for
it too: a device folding itself in with ridge ``lambda`` gets ``u = (V^T V + lambda I)^-1 V^T w`` and
scores ``V u = X X^T w`` with ``X = V (V^T V + lambda I)^-1/2``, so the target is that ``X``. iALS
is also a sum of per-user terms (federated iALS exists), and it is the stronger model on MovieLens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.linalg import svds
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.preprocessing import MultiLabelBinarizer

from services.recommender.artifact import ModelArtifact
from services.recommender.model import EMBEDDING_DIM

TITLE_DIMS = 40
GENRE_DIMS = 19
ERA_EDGES = (1960, 1980, 1990)  # era one-hot: <1960, 1960s-70s, 1980s, 1990s
YEAR_DIMS = EMBEDDING_DIM - TITLE_DIMS - GENRE_DIMS
BLOCK_WEIGHTS = {"genre": 0.80, "title": 0.45, "year": 0.35}
DEFAULT_POPULARITY_WEIGHT = 0.05


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def _title_terms(items: pd.DataFrame) -> sp.csr_matrix:
    tfidf = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), min_df=2, sublinear_tf=True, dtype=np.float64)
    return sp.csr_matrix(tfidf.fit_transform(items["title"].str.lower()))


def _genres(items: pd.DataFrame) -> np.ndarray:
    return MultiLabelBinarizer().fit_transform(items["genres"]).astype(np.float64)


def _year_block(items: pd.DataFrame) -> np.ndarray:
    year = items["year"].to_numpy(dtype=np.float64)
    known = year > 0
    year = np.where(known, year, np.median(year[known]) if known.any() else 0.0)
    z = (year - year.mean()) / (year.std() or 1.0)
    era = np.digitize(year, ERA_EDGES)
    block = np.zeros((len(items), YEAR_DIMS))
    block[:, 0] = z
    block[np.arange(len(items)), 1 + era] = 1.0
    return block


def content_embeddings(items: pd.DataFrame, seed: int = 0) -> np.ndarray:
    """(items, 64) unit rows from titles, genres and release year only."""
    terms = _title_terms(items)
    title = _unit_rows(TruncatedSVD(n_components=TITLE_DIMS, random_state=seed, n_iter=7).fit_transform(terms))
    genres = _genres(items)
    if genres.shape[1] != GENRE_DIMS:
        raise ValueError(f"expected {GENRE_DIMS} genres, found {genres.shape[1]}")
    blocks = np.hstack(
        [
            BLOCK_WEIGHTS["genre"] * _unit_rows(genres),
            BLOCK_WEIGHTS["title"] * title,
            BLOCK_WEIGHTS["year"] * _unit_rows(_year_block(items)),
        ]
    )
    return _unit_rows(blocks)


def interaction_matrix(interactions: pd.DataFrame, users: int, items: int) -> sp.csr_matrix:
    """Binary users x items matrix of (implicit) interactions."""
    r = sp.csr_matrix(
        (np.ones(len(interactions)), (interactions["user"].to_numpy(), interactions["item"].to_numpy())),
        shape=(users, items),
    )
    r.data[:] = 1.0
    return r


def popularity_prior(interactions: pd.DataFrame, items: int) -> np.ndarray:
    """Percentile in [0, 1] of each item's interaction count (ties share the average rank)."""
    counts = np.bincount(interactions["item"].to_numpy(), minlength=items).astype(np.float64)
    return pd.Series(counts).rank(pct=True, method="average").to_numpy(dtype=np.float64)


@dataclass(frozen=True)
class LearnedParams:
    gamma: float = 0.0  # column (popularity) weighting of R before the SVD
    beta: float = 0.0  # row scaling of the embeddings by item interaction count
    ridge: float = 1e-3
    objective: str = "pure_svd"  # or "ials" (see the module docstring)
    als_regularization: float = 30.0  # iALS only: implicit's (unscaled) L2 weight
    als_alpha: float = 3.0  # iALS only: confidence 1 + alpha for an interaction
    fold: float = 10.0  # iALS only: the device's folding-in ridge lambda
    als_iterations: int = 20


def train_ials(
    r: sp.csr_matrix, factors: int, regularization: float, alpha: float, iterations: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Implicit-feedback ALS (the ``implicit`` package, one thread) on the users x items matrix
    ``r``: (user factors, item factors). The quality harness's ALS baseline trains through it too,
    so baseline and learned model differ only in what they do with the factors."""
    from implicit.cpu.als import AlternatingLeastSquares  # training only: the dev/quality extra

    model = AlternatingLeastSquares(
        factors=factors,
        regularization=regularization,
        alpha=alpha,
        iterations=iterations,
        random_state=seed,
        num_threads=1,
    )
    model.fit(sp.csr_matrix(r, dtype=np.float32), show_progress=False)
    return np.asarray(model.user_factors), np.asarray(model.item_factors)


def ials_item_factors(r: sp.csr_matrix, params: LearnedParams, seed: int = 0) -> np.ndarray:
    """The iALS item factors ``V`` of the users x items matrix ``r``: (items, 64)."""
    _, items = train_ials(r, EMBEDDING_DIM, params.als_regularization, params.als_alpha, params.als_iterations, seed)
    return np.asarray(items, dtype=np.float64)[:, :EMBEDDING_DIM]


def folding_in_embeddings(v: np.ndarray, fold: float) -> np.ndarray:
    """``X = V (V^T V + fold I)^-1/2``: then ``X X^T w = V (V^T V + fold I)^-1 V^T w``, the scores of
    the ridge folding-in of ``w``."""
    values, vectors = np.linalg.eigh(v.T @ v)
    return v @ (vectors @ np.diag((values + fold) ** -0.5) @ vectors.T)


def item_features(items: pd.DataFrame, seed: int = 0) -> sp.csr_matrix:
    """The public features the learned map reads: content blocks, genres, title terms, index."""
    dense = np.hstack([content_embeddings(items, seed), _genres(items)])
    identity = sp.identity(len(items), format="csr")
    return sp.hstack([sp.csr_matrix(dense), _title_terms(items), identity], format="csr")


def learned_embeddings(
    features: sp.csr_matrix, r: sp.csr_matrix, params: LearnedParams = LearnedParams(), seed: int = 0
) -> np.ndarray:
    """``X = F W`` (see the module docstring); (items, 64), largest row norm 1."""
    if params.objective == "ials":
        target = folding_in_embeddings(ials_item_factors(r, params, seed), params.fold)
        return _fit_features(features, target, params.ridge)
    if params.objective != "pure_svd":
        raise ValueError(f"unknown objective {params.objective!r}")
    counts = np.asarray(r.sum(axis=0)).ravel()
    scale = np.power(np.maximum(counts, 1.0), -params.gamma)
    rng = np.random.default_rng(seed)
    v0 = rng.standard_normal(min(r.shape))
    rank = min(EMBEDDING_DIM, min(r.shape) - 1)  # fewer users than dimensions: the rest stays zero
    _, _, vt = svds(sp.csr_matrix(r.multiply(scale[None, :])), k=rank, v0=v0, random_state=seed)
    target = np.zeros((r.shape[1], EMBEDDING_DIM))
    target[:, :rank] = vt.T * np.power(np.maximum(counts, 1.0), params.beta)[:, None]
    return _fit_features(features, target, params.ridge)


def _fit_features(features: sp.csr_matrix, target: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge in the dual (items < features): W = F^T (F F^T + lambda I)^-1 target; X = F W."""
    gram = (features @ features.T).toarray()
    x = gram @ np.linalg.solve(gram + ridge * np.eye(gram.shape[0]), target)
    return x / np.max(np.linalg.norm(x, axis=1))


def artifact(
    items: pd.DataFrame,
    embeddings: np.ndarray,
    interactions: pd.DataFrame,
    created_by: str,
    popularity_weight: float = DEFAULT_POPULARITY_WEIGHT,
) -> ModelArtifact:
    """A serving artifact: one "creator" per film's first genre (the feed's diversity cap), the
    release year as the posting time, the popularity prior from ``interactions``."""
    first_genre = [g[0] if g else "unknown" for g in items["genres"]]
    creators = sorted(set(first_genre))
    creator_index = np.array([creators.index(g) for g in first_genre], dtype=np.int32)
    posted = pd.to_datetime(items["year"].clip(lower=1970).astype(str) + "-01-01", utc=True)
    return ModelArtifact(
        embeddings=np.ascontiguousarray(embeddings, dtype=np.float32),
        popularity=popularity_prior(interactions, len(items)),
        posted_unix=(posted.astype("int64") // 10**9).to_numpy(dtype=np.int64),
        item_ids=[f"ml100k-{i}" for i in items["item_id"]],
        creator_index=creator_index,
        creator_ids=[f"genre:{g}" for g in creators],
        creator_nicknames=creators,
        popularity_weight=popularity_weight,
        created_by=created_by,
    )


def content_artifact(items: pd.DataFrame, interactions: pd.DataFrame, seed: int = 0) -> ModelArtifact:
    return artifact(items, content_embeddings(items, seed), interactions, created_by=f"movielens-100k:content:{seed}")
