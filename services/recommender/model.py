"""The content model: TikTok creators' public profile and video signals -> 64-d unit embeddings.

Pipeline (scikit-learn), and why:

* Text: nickname + biography through ``TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4))``
  with sublinear tf. Biographies are short (median ~37 characters) and multilingual with emoji;
  character n-grams need no tokenizer or language detection, treat an emoji as a token of its
  own and match across scripts. ``TruncatedSVD`` (LSA) reduces them to 48 dense dimensions.
* Numbers: followers, following, likes and video counts and the three engagement rates are
  heavy-tailed (followers up to 1.45e7, median in the thousands): ``log1p`` then
  ``StandardScaler``; plus verified and has-link flags.
* Per video: age at snapshot time (from the TikTok snowflake id), position in the creator's top
  list, and posting hour on the circle, so that a creator's videos are near, not identical. The 33
  ids that are not snowflakes get the median age.

Blocks are scaled to unit norm, weighted (text 0.80, numbers 0.45, video 0.35) and the
concatenation L2-normalised, so a score is a cosine similarity in [-1, 1]. The popularity prior is
the percentile of the creator's likes per video, blended with weight ``popularity_weight``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.preprocessing import StandardScaler

from services.recommender.artifact import ModelArtifact
from services.recommender.dataset import UNKNOWN_TIME, explode_videos

EMBEDDING_DIM = 64
TEXT_DIMS = 48
NUMERIC_COLUMNS = (
    "followers",
    "following",
    "likes",
    "videos_count",
    "awg_engagement_rate",
    "comment_engagement_rate",
    "like_engagement_rate",
)
BLOCK_WEIGHTS = {"text": 0.80, "numeric": 0.45, "video": 0.35}
DEFAULT_POPULARITY_WEIGHT = 0.05


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def _text_block(profiles: pd.DataFrame, seed: int) -> np.ndarray:
    text = (profiles["nickname"] + " " + profiles["biography"]).str.lower()
    tfidf = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2, sublinear_tf=True, dtype=np.float64)
    matrix = tfidf.fit_transform(text)
    svd = TruncatedSVD(n_components=TEXT_DIMS, random_state=seed, algorithm="randomized", n_iter=7)
    return _unit_rows(svd.fit_transform(matrix))


def _numeric_block(profiles: pd.DataFrame) -> np.ndarray:
    logs = np.log1p(profiles[list(NUMERIC_COLUMNS)].astype(float).clip(lower=0).fillna(0).to_numpy())
    flags = np.column_stack([profiles["is_verified"].astype(float), profiles["bio_link"].notna().astype(float)])
    scaled = StandardScaler().fit_transform(np.hstack([logs, flags]))
    return _unit_rows(scaled)


def _video_block(items: pd.DataFrame, profiles: pd.DataFrame) -> np.ndarray:
    snapshot = profiles["snapshot_unix"].to_numpy()[items["creator_row"].to_numpy()]
    posted = items["posted_unix"].to_numpy()
    known = posted != UNKNOWN_TIME
    age_days = np.clip(snapshot - posted, 0, None) / 86400.0
    age_days[~known] = np.median(age_days[known]) if known.any() else 0.0
    hour = (posted % 86400) / 86400.0 * 2 * np.pi
    hour[~known] = 0.0
    rel_position = items["position"].to_numpy() / np.maximum(items["listed"].to_numpy() - 1, 1)
    features = np.column_stack([np.log1p(age_days), rel_position, np.sin(hour), np.cos(hour)])
    scaled = StandardScaler().fit_transform(features)
    width = EMBEDDING_DIM - TEXT_DIMS - len(NUMERIC_COLUMNS) - 2
    padded = np.zeros((len(items), width))
    padded[:, : scaled.shape[1]] = scaled
    return _unit_rows(padded)


def popularity_prior(items: pd.DataFrame, profiles: pd.DataFrame) -> np.ndarray:
    """Percentile in [0, 1] of the creator's likes per published video."""
    per_video = profiles["likes"].astype(float) / profiles["videos_count"].clip(lower=1).astype(float)
    ranks = per_video.rank(pct=True, method="average").to_numpy()
    return ranks[items["creator_row"].to_numpy()].astype(np.float64)


def train(
    profiles: pd.DataFrame,
    created_by: str,
    seed: int = 0,
    popularity_weight: float = DEFAULT_POPULARITY_WEIGHT,
) -> ModelArtifact:
    """Fits the content model on ``profiles`` and embeds every listed video."""
    items = explode_videos(profiles)
    creator_rows = items["creator_row"].to_numpy()
    text = _text_block(profiles, seed)[creator_rows]
    numeric = _numeric_block(profiles)[creator_rows]
    video = _video_block(items, profiles)
    blocks = np.hstack(
        [
            BLOCK_WEIGHTS["text"] * text,
            BLOCK_WEIGHTS["numeric"] * numeric,
            BLOCK_WEIGHTS["video"] * video,
        ]
    )
    assert blocks.shape[1] == EMBEDDING_DIM
    embeddings = _unit_rows(blocks).astype(np.float32)
    return ModelArtifact(
        embeddings=embeddings,
        popularity=popularity_prior(items, profiles),
        posted_unix=items["posted_unix"].to_numpy(dtype=np.int64),
        item_ids=items["item_id"].tolist(),
        creator_index=creator_rows.astype(np.int32),
        creator_ids=profiles["account_id"].tolist(),
        creator_nicknames=profiles["nickname"].tolist(),
        popularity_weight=popularity_weight,
        created_by=created_by,
    )
