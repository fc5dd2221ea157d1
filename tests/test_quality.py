"""The quality harness: metrics against hand-computed values, splits, the harness end to end on a
tiny slice, and encrypted-equals-plaintext for a few users through the real mesh."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import quality
from bench.quality_metrics import (
    Split,
    bootstrap_interval,
    evaluate,
    leave_latest_out,
    random_split,
    random_split_global,
    top_k,
    user_metrics,
)
from services.recommender.catalogues import movielens


@pytest.fixture(scope="module")
def data() -> movielens.MovieLens:
    try:
        return movielens.load()
    except movielens.MovieLensError as exc:
        pytest.skip(f"{exc}")


def test_metrics_match_hand_computed_values() -> None:
    # Relevant {1, 9}; the list hits item 1 at rank 2 only.
    hr, recall, ndcg = user_metrics(np.array([3, 1, 7, 4, 5, 6, 0, 8, 2, 11]), np.array([1, 9]))
    assert (hr, recall) == (1.0, 0.5)
    assert ndcg == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert user_metrics(np.arange(10), np.array([20])) == (0.0, 0.0, 0.0)
    # 12 relevant items, all ten ranked ones hit: NDCG is 1 (ideal is min(k, relevant) hits).
    assert user_metrics(np.arange(10), np.arange(12)) == (1.0, 10 / 12, pytest.approx(1.0))


def test_top_k_skips_seen_and_breaks_ties_by_index() -> None:
    scores = np.array([0.5, 0.9, 0.5, 0.9, 0.1])
    assert list(top_k(scores, np.array([1]), k=3)) == [3, 0, 2]


def frame(rows: list[tuple[int, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"]).assign(rating=1.0)


def test_splits_are_per_user() -> None:
    interactions = frame([(u, i, 100 + i) for u in range(3) for i in range(10)] + [(3, 0, 5)])
    split = random_split(interactions, 0.2, seed=0)
    assert split.test.groupby("user").size().to_dict() == {0: 2, 1: 2, 2: 2}  # user 3 has one item
    assert len(split.train) + len(split.test) == len(interactions)
    assert split.train.merge(split.test, on=["user", "item"]).empty
    latest = leave_latest_out(interactions)
    assert latest.test[["user", "item"]].values.tolist() == [[0, 9], [1, 9], [2, 9]]


def test_global_split_takes_a_fraction_of_all_interactions() -> None:
    # One heavy user and nine users with a single rating: a per-user split could never put those
    # single ratings in test; the published protocol's global split can.
    interactions = frame([(0, i, i) for i in range(90)] + [(u, 0, 1) for u in range(1, 11)])
    split = random_split_global(interactions, 0.2, seed=4)
    assert (len(split.train), len(split.test)) == (80, 20)
    rows = lambda f: set(map(tuple, f[["user", "item"]].values.tolist()))  # noqa: E731
    assert rows(split.train) | rows(split.test) == rows(interactions)
    assert not rows(split.train) & rows(split.test)
    assert rows(random_split_global(interactions, 0.2, seed=4).test) == rows(split.test)
    assert rows(random_split_global(interactions, 0.2, seed=5).test) != rows(split.test)
    many = [random_split_global(interactions, 0.2, seed=s).test for s in range(20)]
    assert any((t["user"] > 0).any() for t in many)


def test_bootstrap_interval_is_seeded_and_brackets_the_mean() -> None:
    values = np.random.default_rng(1).random(500)
    low, high = bootstrap_interval(values, seed=3)
    assert low < values.mean() < high
    assert (low, high) == bootstrap_interval(values, seed=3)


def test_evaluate_scores_every_test_user() -> None:
    split = Split(train=frame([(0, 0, 1), (1, 1, 1)]), test=frame([(0, 2, 2), (1, 0, 2)]))
    per_user = evaluate(lambda users: np.tile(np.array([3.0, 2.0, 1.0]), (len(users), 1)), split, k=1)
    # user 0 sees item 0 in training: its top-1 is item 1 (miss); user 1's top-1 is item 0 (hit)
    assert per_user["hr"].tolist() == [0.0, 1.0]


def test_harness_end_to_end_on_a_tiny_slice(
    data: movielens.MovieLens, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = data.interactions[data.interactions["user"] < 60]
    monkeypatch.setattr(movielens, "load", lambda wheel=None: movielens.MovieLens(data.items, small))
    monkeypatch.setattr(quality, "write_json", lambda name, payload: _write(tmp_path, name, payload))
    grids = {
        "popularity": [{}],
        "itemknn": [{"neighbours": 20, "shrink": 0.0}, {"neighbours": 50, "shrink": 0.0}],
        "als": [{"factors": 8, "regularization": 0.1, "alpha": 1.0, "iterations": 5}],
        "bpr": [{"factors": 8, "learning_rate": 0.05, "regularization": 0.01}],
        "cipherfeed_content": [{"prior": 0.0}, {"prior": 0.1}],
        "cipherfeed_learned": [
            {"gamma": 0.0, "beta": 0.25, "prior": 0.05},
            {"objective": "ials", "als_iterations": 3, "prior": 0.0},
        ],
    }
    monkeypatch.setattr(quality, "GRIDS", grids)
    assert quality.main(["--encrypted-users", "0", "--output", "tiny"]) == 0
    results = json.loads((tmp_path / "tiny.json").read_text())
    assert set(results["protocols"]) == set(quality.PROTOCOLS)
    for protocol, block in results["protocols"].items():
        rows = block["rows"]
        assert set(rows) == set(grids)
        for row in rows.values():
            ndcg = row["test"]["ndcg"]
            assert 0.0 <= ndcg["ci95"][0] <= ndcg["mean"] <= ndcg["ci95"][1] <= 1.0
            # per-user splits give every user test items; the global one may leave a few without
            assert row["test"]["users"] == 60 if protocol != "random_80_20_global" else row["test"]["users"] <= 60
    checks = results["target_checks"]
    assert set(checks["published_popularity"]) == {"published", "measured", "abs_diff", "met"}
    assert checks["random_80_20_learned_vs_als"]["met"] in (True, False)
    itemknn = results["protocols"]["random_80_20"]["rows"]["itemknn"]
    assert itemknn["tuning_trials"] == 2 and itemknn["params"] in grids["itemknn"]
    # --resume keeps what the output already holds and runs nothing again
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    monkeypatch.setattr(quality, "run_protocol", _must_not_run)
    assert quality.main(["--encrypted-users", "0", "--output", "tiny", "--resume"]) == 0
    assert json.loads((tmp_path / "tiny.json").read_text())["protocols"] == results["protocols"]


def _must_not_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("a resumed protocol ran again")


def _write(directory: Path, name: str, payload: dict[str, object]) -> Path:
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload))
    return path


def test_encrypted_ranking_equals_plaintext_through_the_mesh(data: movielens.MovieLens, tmp_path: Path) -> None:
    from bench.quality_mesh import running_mesh, score_users

    cat = quality.Catalogue(data)
    split = random_split(data.interactions, 0.2, seed=0)
    params = {"gamma": 0.25, "beta": 0.25, "prior": 0.05}
    scorer, embeddings = quality.fit("cipherfeed_learned", cat, split.train, params)
    assert embeddings is not None
    plain = evaluate(scorer, split)
    users = plain["users"][:3]
    with running_mesh(tmp_path) as mesh:
        result = score_users(mesh, cat, split, embeddings, params["prior"], users)
    assert result["identical"].all()
    assert float(result["max_error"]) < 1e-4
    np.testing.assert_allclose(result["ndcg"], plain["ndcg"][:3], atol=1e-3)
