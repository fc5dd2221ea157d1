"""Catalogues the recommender can serve, each built from a dataset adapter into the same artifact.

``tiktok``: the TikTok creators' top videos and the content model (services/recommender/model.py).
``movielens``: the MovieLens-100k films with their public features (title, year, genres); the
ratings stay on the 943 users' devices and only serve to train the learned variant and to measure
quality (bench/quality.py).
"""

from __future__ import annotations

from pathlib import Path

from services.recommender.artifact import ModelArtifact
from services.recommender.catalogues import movielens, movielens_model
from services.recommender.dataset import load_profiles
from services.recommender.model import train

CATALOGUES = ("tiktok", "movielens")


class CatalogueError(ValueError):
    """An unknown catalogue name, or a catalogue whose data cannot be loaded."""


def build_catalogue(name: str, dataset: Path, movielens_wheel: Path | None = None) -> ModelArtifact:
    """The serving artifact of catalogue ``name`` (deterministic: same inputs, same version)."""
    if name == "tiktok":
        return train(load_profiles(dataset), created_by=f"tiktok-profiles:{Path(dataset).name}")
    if name == "movielens":
        data = movielens.load(movielens_wheel)
        return movielens_model.content_artifact(data.items, data.interactions)
    raise CatalogueError(f"unknown catalogue {name!r}: expected one of {', '.join(CATALOGUES)}")
