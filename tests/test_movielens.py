"""The MovieLens-100k adapter and models: parsing small slices, the digest check, the catalogue."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from cipherfeed.config import ConfigError, RecommenderConfig
from services.recommender import artifact
from services.recommender.catalogues import CatalogueError, build_catalogue, movielens
from services.recommender.catalogues.movielens_model import (
    LearnedParams,
    content_artifact,
    content_embeddings,
    folding_in_embeddings,
    interaction_matrix,
    item_features,
    learned_embeddings,
)

ITEMS = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "10\tRichard III\t1995\tDrama War\n"
    "2\tGoldenEye\t1995\tAction Adventure Thriller\n"
    "267\tunknown\t\tunknown\n"
).encode("latin-1")
INTER = b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n7\t2\t3\t100\n3\t10\t5\t90\n7\t267\t1\t80\n"


@pytest.fixture(scope="module")
def data() -> movielens.MovieLens:
    try:
        return movielens.load()
    except movielens.MovieLensError as exc:
        pytest.skip(f"{exc}")


def test_items_parse_sorted_by_id_with_genres_and_missing_year() -> None:
    items = movielens.parse_items(ITEMS)
    assert list(items["item_id"]) == ["2", "10", "267"]
    assert items.loc[1, "genres"] == ("Drama", "War")
    assert list(items["year"]) == [1995, 1995, 0]


def test_interactions_map_to_catalogue_indices_and_dense_users() -> None:
    items = movielens.parse_items(ITEMS)
    inter = movielens.parse_interactions(INTER, items)
    assert list(inter["item"]) == [0, 1, 2]
    assert list(inter["user"]) == [1, 0, 1]  # users 3 and 7 -> 0 and 1
    with pytest.raises(movielens.MovieLensError, match="does not list"):
        movielens.parse_interactions(INTER + b"7\t999\t4\t70\n", items)


def test_altered_wheel_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / movielens.WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{movielens.MEMBER_DIR}/ml-100k.item", ITEMS)
        z.writestr(f"{movielens.MEMBER_DIR}/ml-100k.inter", INTER)
    with pytest.raises(movielens.MovieLensError, match="SHA-256"):
        movielens.read_files(wheel)


def test_real_files_have_the_published_shape(data: movielens.MovieLens) -> None:
    assert len(data.items) == movielens.ITEMS
    assert data.user_count == movielens.USERS
    assert len(data.interactions) == movielens.RATINGS


def test_content_embeddings_are_unit_64d_and_genres_pull_together(data: movielens.MovieLens) -> None:
    x = content_embeddings(data.items)
    assert x.shape == (movielens.ITEMS, 64)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(x, content_embeddings(data.items))
    toy_story, aladdin, godfather = (int(np.flatnonzero(data.items["item_id"] == i)[0]) for i in ("1", "95", "127"))
    assert x[toy_story] @ x[aladdin] > x[toy_story] @ x[godfather]


def test_learned_embeddings_cover_cold_items(data: movielens.MovieLens) -> None:
    some = data.interactions[data.interactions["item"] >= 10]  # items 0..9 have no interactions
    r = interaction_matrix(some, data.user_count, len(data.items))
    x = learned_embeddings(item_features(data.items), r)
    assert x.shape == (movielens.ITEMS, 64)
    assert np.isclose(np.linalg.norm(x, axis=1).max(), 1.0)
    assert np.all(np.linalg.norm(x[:10], axis=1) > 0)


def test_folding_in_embeddings_score_like_the_devices_ridge_folding_in() -> None:
    # The mesh scores X X^T w; with X = V (V^T V + lambda I)^-1/2 that is V times the ridge
    # folding-in of w, the iALS user vector a device would compute: the form is exact.
    rng = np.random.default_rng(3)
    v, w = rng.standard_normal((200, 64)), rng.random(200)
    x = folding_in_embeddings(v, 10.0)
    folded = np.linalg.solve(v.T @ v + 10.0 * np.eye(64), v.T @ w)
    np.testing.assert_allclose(x @ (x.T @ w), v @ folded, rtol=1e-9, atol=1e-12)


def test_ials_learned_embeddings_are_64d_with_largest_norm_one(data: movielens.MovieLens) -> None:
    pytest.importorskip("implicit")
    r = interaction_matrix(data.interactions, data.user_count, len(data.items))
    x = learned_embeddings(item_features(data.items), r, LearnedParams(objective="ials", als_iterations=2))
    assert x.shape == (movielens.ITEMS, 64)
    assert np.isclose(np.linalg.norm(x, axis=1).max(), 1.0)
    with pytest.raises(ValueError, match="objective"):
        learned_embeddings(item_features(data.items), r, LearnedParams(objective="nmf"))


def test_movielens_catalogue_is_a_deterministic_artifact(data: movielens.MovieLens) -> None:
    model = build_catalogue("movielens", Path("unused"))
    assert model.item_count == movielens.ITEMS and model.dim == 64
    assert artifact.from_bytes(model.to_bytes()).version == model.version
    assert content_artifact(data.items, data.interactions).version == model.version
    with pytest.raises(CatalogueError):
        build_catalogue("netflix", Path("unused"))


def test_catalogue_is_chosen_by_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIPHERFEED_CATALOGUE", "movielens")
    assert RecommenderConfig.from_env().catalogue == "movielens"
    monkeypatch.setenv("CIPHERFEED_CATALOGUE", "imdb")
    with pytest.raises(ConfigError, match="CIPHERFEED_CATALOGUE"):
        RecommenderConfig.from_env()
