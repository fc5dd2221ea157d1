"""The dataset loader, the content model and the artifact format."""

import numpy as np
import pytest

from services.recommender import artifact
from services.recommender.artifact import ArtifactError
from services.recommender.dataset import (
    TIKTOK_LAUNCH_UNIX,
    UNKNOWN_TIME,
    DatasetError,
    explode_videos,
    load_profiles,
    tiktok_id_unix_seconds,
)
from services.recommender.model import EMBEDDING_DIM, train
from services.recommender.synthetic import synthetic_catalogue


def test_loader_reads_null_as_missing_and_keeps_counts(dataset_path):
    df = load_profiles(dataset_path)
    assert len(df) == 1000
    assert df["create_time"].isna().all()  # the column is "null" throughout
    assert df["bio_link"].isna().sum() > 0 and (df["bio_link"] == "null").sum() == 0
    assert df["followers"].dtype.kind == "i" and df["followers"].max() > 10**7
    assert df["is_verified"].dtype == bool


def test_every_listed_video_becomes_one_item(dataset_path):
    df = load_profiles(dataset_path)
    items = explode_videos(df)
    assert len(items) == sum(len(v.split(",")) for v in df["top_videos"])
    assert items["item_id"].is_unique
    # Snowflake ids decode to 2016..2023; the few that are not snowflakes are marked unknown.
    known = items["posted_unix"] != UNKNOWN_TIME
    assert items.loc[known, "posted_unix"].between(TIKTOK_LAUNCH_UNIX, 1_700_000_000).all()
    assert 0 < (~known).sum() < 100


def test_snowflake_time():
    assert tiktok_id_unix_seconds("6823641608697761030") == 1588752867  # 2020-05-06
    assert tiktok_id_unix_seconds("50561269711282178") == UNKNOWN_TIME


def test_missing_dataset_has_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="CIPHERFEED_DATASET"):
        load_profiles(tmp_path / "nope.csv")


def test_embeddings_are_unit_64d_and_training_is_deterministic(tiktok_model, dataset_path):
    e = tiktok_model.embeddings
    assert e.shape == (tiktok_model.item_count, EMBEDDING_DIM) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert ((tiktok_model.popularity >= 0) & (tiktok_model.popularity <= 1)).all()
    assert train(load_profiles(dataset_path), created_by="tests").version == tiktok_model.version


def test_a_creators_videos_are_near_but_not_identical(tiktok_model):
    own = np.flatnonzero(tiktok_model.creator_index == tiktok_model.creator_index[0])
    sims = tiktok_model.embeddings[own] @ tiktok_model.embeddings[own[0]]
    assert sims.min() > 0.8 and len(set(np.round(sims, 6))) > 1


def test_artifact_round_trip_is_bit_identical(tiktok_model, tmp_path):
    path = tmp_path / "m.cfmodel"
    version = tiktok_model.save(path)
    assert version == tiktok_model.version
    loaded = artifact.load(path)
    assert loaded.version == version
    assert loaded.to_bytes() == path.read_bytes()
    np.testing.assert_array_equal(loaded.embeddings, tiktok_model.embeddings)
    np.testing.assert_array_equal(loaded.popularity, tiktok_model.popularity)
    assert loaded.item_ids == tiktok_model.item_ids and loaded.creator_ids == tiktok_model.creator_ids
    # A fresh encode of the loaded model gives the same bytes again.
    loaded._bytes = None
    assert loaded.to_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b"XX" + b[2:], "magic"),
        (lambda b: b[:-10], "truncated"),
        (lambda b: b + b"\x00", "trailing"),
    ],
)
def test_damaged_artifacts_are_refused(tiktok_model, mangle, message):
    with pytest.raises(ArtifactError, match=message):
        artifact.from_bytes(mangle(tiktok_model.to_bytes()))


def test_synthetic_catalogue_shapes():
    m = synthetic_catalogue(10_000, seed=3)
    assert m.embeddings.shape == (10_000, 64)
    assert m.version == synthetic_catalogue(10_000, seed=3).version
    assert m.version != synthetic_catalogue(10_000, seed=4).version
