"""Recommendation quality on MovieLens-100k: ``python -m bench.quality`` (``make quality``).

Two protocols, full ranking over every item the user has not rated in training: a random 80/20
split per user, and leave-latest-out (each user's latest rating is the test item). Every rating
counts as an implicit interaction. HR@10, Recall@10, NDCG@10 with 95% bootstrap intervals over
users (fixed seeds). Every method's hyper-parameters are chosen on a validation split carved from
the training split the same way (80/20 of each user's training items, or their latest training
item), refitted on the whole training split, and only then scored on test.

Methods: popularity, ItemKNN, implicit ALS and BPR (the ``implicit`` package), and cipherfeed's
content model and learned model, scored as the mesh scores them: ``s = X (X^T w) + p * prior`` with
``w`` the device's history weights (uniform over its training items, summing to one). With
``--encrypted-users`` (default: all) the cipherfeed models also run through the real mesh on
loopback (key service + recommender over mutual TLS, real OpenFHE): the device uploads its
encrypted history, scores by profile, decrypts, adds the prior and ranks; the per-user ranking and
NDCG@10 are compared with the plaintext twin. Results: bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from bench.common import RESULTS, log, machine, write_json
from bench.quality_baselines import fit_als, fit_bpr, fit_itemknn, fit_popularity
from bench.quality_metrics import (
    K,
    Scorer,
    Split,
    evaluate,
    leave_latest_out,
    random_split,
    random_split_global,
    summarise,
)
from services.recommender.catalogues import movielens
from services.recommender.catalogues.movielens_model import (
    LearnedParams,
    content_embeddings,
    interaction_matrix,
    item_features,
    learned_embeddings,
    popularity_prior,
)

SEED = 0
PROTOCOLS: dict[str, Callable[[pd.DataFrame, int], Split]] = {
    # The published table's protocol (Recommenders.jl): 80/20 of all ratings, not of each user's.
    "random_80_20_global": lambda frame, seed: random_split_global(frame, 0.2, seed),
    "random_80_20": lambda frame, seed: random_split(frame, 0.2, seed),
    "leave_latest_out": lambda frame, seed: leave_latest_out(frame),
}
PRIOR_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5)
GRIDS: dict[str, list[dict[str, Any]]] = {
    "popularity": [{}],
    "itemknn": [{"neighbours": k, "shrink": s} for k in (20, 50, 100, 200, 400) for s in (0.0, 10.0)],
    # implicit's regularization is not scaled by the number of interactions: on MovieLens-100k the
    # best values are in the tens, so the grid reaches 100.
    "als": [
        {"factors": f, "regularization": r, "alpha": a, "iterations": 20}
        for f in (32, 64, 128)
        for r in (0.1, 1.0, 3.0, 10.0, 30.0, 100.0)
        for a in (1.0, 3.0, 5.0, 20.0)
    ],
    "bpr": [
        {"factors": f, "learning_rate": lr, "regularization": r}
        for f in (32, 64, 128)
        for lr in (0.01, 0.05)
        for r in (0.001, 0.01)
    ],
    "cipherfeed_content": [{"prior": p} for p in PRIOR_WEIGHTS],
    "cipherfeed_learned": [
        {"objective": "pure_svd", "gamma": g, "beta": b, "prior": p}
        for g in (0.0, 0.25, 0.5)
        for b in (0.0, 0.25, 0.5)
        for p in (0.0, 0.05, 0.2)
    ]
    + [
        {"objective": "ials", "als_regularization": r, "als_alpha": a, "fold": f, "prior": p}
        for r in (10.0, 30.0)
        for a in (1.0, 3.0)
        for f in (10.0, 30.0)
        for p in (0.0, 0.05)
    ],
}
BASELINES = ("popularity", "itemknn", "als", "bpr")
# The published MovieLens-100k NDCG@10 (Recommenders.jl README, "Random 80/20 split, treated as
# implicit feedback"; its matrix-factorisation row, 0.4402, is the one the issue calls ALS ≈ 0.43).
PUBLISHED_PROTOCOL = "random_80_20_global"
TARGETS: dict[str, Any] = {
    "published_random_80_20_ndcg10": {"popularity": 0.2197, "itemknn": 0.3986, "als": 0.4402},
    "published_source": "github.com/yng87/Recommenders.jl README, MovieLens 100k table",
    "published_tolerance": 0.01,
    "learned_within_relative_of_als": 0.10,
    "encrypted_ndcg_abs_diff": 1e-3,
}


class Catalogue:
    """The public item features, computed once per run."""

    def __init__(self, data: movielens.MovieLens) -> None:
        self.data = data
        self.items = len(data.items)
        self.users = data.user_count
        self.content = content_embeddings(data.items, SEED)
        self.features = item_features(data.items, SEED)

    def matrix(self, frame: pd.DataFrame) -> sp.csr_matrix:
        return interaction_matrix(frame, self.users, self.items)


def history_weights(r: sp.csr_matrix) -> sp.csr_matrix:
    """Each user's training items, weight 1/n each: the device's history ``w``."""
    counts = np.asarray(r.sum(axis=1)).ravel()
    return sp.csr_matrix(sp.diags(1.0 / np.maximum(counts, 1.0)) @ r)


def mesh_scorer(embeddings: np.ndarray, r: sp.csr_matrix, prior: np.ndarray, weight: float) -> Scorer:
    """The plaintext twin of what the mesh computes: ``X (X^T w) + weight * prior``."""
    x = np.asarray(embeddings, dtype=np.float32).astype(np.float64)
    w = history_weights(r)
    return lambda users: np.asarray((w[users] @ x) @ x.T) + weight * prior[None, :]


def fit(method: str, cat: Catalogue, train: pd.DataFrame, params: dict[str, Any]) -> tuple[Scorer, np.ndarray | None]:
    """A scorer for ``method`` fitted on ``train``; for cipherfeed's models also the embeddings."""
    r = cat.matrix(train)
    if method == "popularity":
        return fit_popularity(r), None
    if method == "itemknn":
        return fit_itemknn(r, **params), None
    if method == "als":
        return fit_als(r, seed=SEED, **params), None
    if method == "bpr":
        return fit_bpr(r, seed=SEED, **params), None
    prior = popularity_prior(train, cat.items)
    if method == "cipherfeed_content":
        x = cat.content
    elif method == "cipherfeed_learned":
        x = learned_embeddings(cat.features, r, learned_params(params), SEED)
    else:
        raise ValueError(f"unknown method {method}")
    return mesh_scorer(x, r, prior, params["prior"]), x


def learned_params(params: dict[str, Any]) -> LearnedParams:
    """The learned model's fit parameters (everything of a grid point but the prior weight)."""
    return LearnedParams(**{k: v for k, v in params.items() if k != "prior"})


def tune(method: str, cat: Catalogue, validation: Split) -> tuple[dict[str, Any], float, list[dict[str, Any]]]:
    """The grid point with the best validation NDCG@10 (first one on ties)."""
    trials: list[dict[str, Any]] = []
    cache: dict[LearnedParams, np.ndarray] = {}
    for params in GRIDS[method]:
        if method == "cipherfeed_learned":  # the prior weight does not change the fit
            key = learned_params(params)
            if key not in cache:
                r = cat.matrix(validation.train)
                cache[key] = learned_embeddings(cat.features, r, key, SEED)
            prior = popularity_prior(validation.train, cat.items)
            scorer = mesh_scorer(cache[key], cat.matrix(validation.train), prior, params["prior"])
        else:
            scorer, _ = fit(method, cat, validation.train, params)
        ndcg = float(evaluate(scorer, validation)["ndcg"].mean())
        trials.append({"params": params, "val_ndcg10": ndcg})
    best = max(trials, key=lambda t: t["val_ndcg10"])  # max keeps the first of equals
    return best["params"], best["val_ndcg10"], trials


def run_protocol(name: str, cat: Catalogue, methods: list[str], encrypted_users: int, mesh: Any) -> dict[str, Any]:
    split = PROTOCOLS[name](cat.data.interactions, SEED)
    validation = PROTOCOLS[name](split.train, SEED + 1)
    log(f"== {name}: {len(split.train):,} train / {len(split.test):,} test interactions")
    rows: dict[str, Any] = {}
    for method in methods:
        t0 = time.perf_counter()
        params, val_ndcg, trials = tune(method, cat, validation)
        tuned_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        scorer, embeddings = fit(method, cat, split.train, params)
        per_user = evaluate(scorer, split)
        row: dict[str, Any] = {
            "params": params,
            "val_ndcg10": val_ndcg,
            "tuning_trials": len(trials),
            "tuning_seconds": tuned_s,
            "fit_and_eval_seconds": time.perf_counter() - t0,
            "test": summarise(per_user, SEED),
        }
        log(
            f"  {method:20s} NDCG@10 {row['test']['ndcg']['mean']:.4f}  (val {val_ndcg:.4f}, {params}, "
            f"{tuned_s:.0f} s tuning)"
        )
        if embeddings is not None and encrypted_users and mesh is not None:
            row["encrypted"] = encrypted_rows(mesh, cat, split, embeddings, params["prior"], per_user, encrypted_users)
        rows[method] = row
    return {"train": len(split.train), "test": len(split.test), "rows": rows}


def encrypted_rows(
    mesh: Any,
    cat: Catalogue,
    split: Split,
    embeddings: np.ndarray,
    weight: float,
    plain: dict[str, np.ndarray],
    limit: int,
) -> dict[str, Any]:
    """Every (or the first ``limit``) test user through the real mesh under encryption."""
    from bench.quality_mesh import score_users

    users = plain["users"][:limit]
    result = score_users(mesh, cat, split, embeddings, weight, users)
    plain_ndcg = plain["ndcg"][: len(users)]
    diff = np.abs(result["ndcg"] - plain_ndcg)
    out: dict[str, Any] = {
        "users": len(users),
        "test": summarise({k: result[k] for k in ("users", "hr", "recall", "ndcg")}, SEED),
        "plaintext_ndcg10_same_users": float(plain_ndcg.mean()),
        "ndcg10_abs_diff_of_means": float(abs(result["ndcg"].mean() - plain_ndcg.mean())),
        "ndcg10_max_abs_diff_per_user": float(diff.max()),
        "top10_identical_users": int(result["identical"].sum()),
        "max_score_error": float(result["max_error"]),
        "seconds_per_user": {
            "mean": float(np.mean(result["seconds"])),
            "p50": float(np.median(result["seconds"])),
            "p95": float(np.percentile(result["seconds"], 95)),
        },
    }
    log(
        f"    encrypted: {len(users)} users, NDCG@10 {out['test']['ndcg']['mean']:.4f} vs plaintext "
        f"{out['plaintext_ndcg10_same_users']:.4f}, top-10 identical for {out['top10_identical_users']}, "
        f"{out['seconds_per_user']['mean']:.2f} s/user"
    )
    return out


@contextmanager
def no_mesh() -> Iterator[None]:
    yield None


def table(results: dict[str, Any]) -> str:
    lines = [
        f"{'protocol':20s} {'method':22s} {'HR@10':>22s} {'Recall@10':>22s} {'NDCG@10':>22s}",
    ]

    def cell(m: dict[str, Any]) -> str:
        return f"{m['mean']:.4f} [{m['ci95'][0]:.3f},{m['ci95'][1]:.3f}]"

    def row_cells(t: dict[str, Any]) -> str:
        return " ".join(f"{cell(t[name]):>22s}" for name in ("hr", "recall", "ndcg"))

    for protocol, block in results["protocols"].items():
        for method, row in block["rows"].items():
            t = row["test"]
            lines.append(
                f"{protocol:20s} {method:22s} {cell(t['hr']):>22s} {cell(t['recall']):>22s} {cell(t['ndcg']):>22s}"
            )
            if "encrypted" in row:
                e = row["encrypted"]["test"]
                label = f"{method} (encrypted, {row['encrypted']['users']} users)"
                lines.append(
                    f"{'':20s} {label:22s} {cell(e['hr']):>22s} {cell(e['recall']):>22s} {cell(e['ndcg']):>22s}"
                )
    return "\n".join(lines)


def target_checks(results: dict[str, Any]) -> dict[str, Any]:
    """Each target of the issue against what this run measured (absent rows are reported absent)."""
    checks: dict[str, Any] = {}
    published = results["protocols"].get(PUBLISHED_PROTOCOL, {}).get("rows", {})
    for method, value in TARGETS["published_random_80_20_ndcg10"].items():
        if method in published:
            measured = published[method]["test"]["ndcg"]["mean"]
            checks[f"published_{method}"] = {
                "published": value,
                "measured": measured,
                "abs_diff": abs(measured - value),
                "met": abs(measured - value) <= TARGETS["published_tolerance"],
            }
    for protocol, block in results["protocols"].items():
        rows = block["rows"]
        if {"cipherfeed_learned", "als", "popularity"} <= set(rows):
            learned = rows["cipherfeed_learned"]["test"]["ndcg"]["mean"]
            als = rows["als"]["test"]["ndcg"]["mean"]
            checks[f"{protocol}_learned_vs_als"] = {
                "learned": learned,
                "als": als,
                "relative_gap": (als - learned) / als,
                "met": learned >= (1.0 - TARGETS["learned_within_relative_of_als"]) * als,
                "beats_popularity_by": learned - rows["popularity"]["test"]["ndcg"]["mean"],
            }
        for method, row in rows.items():
            if "encrypted" in row:
                diff = row["encrypted"]["ndcg10_abs_diff_of_means"]
                checks[f"{protocol}_{method}_encrypted"] = {
                    "users": row["encrypted"]["users"],
                    "ndcg10_abs_diff": diff,
                    "met": diff < TARGETS["encrypted_ndcg_abs_diff"],
                }
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--methods", default=",".join(GRIDS))
    parser.add_argument("--encrypted-users", type=int, default=10_000, help="0: plaintext only")
    parser.add_argument("--wheel", type=Path, default=None, help="the recbole==1.2.1 wheel (default .tools/datasets)")
    parser.add_argument("--output", default="quality")
    parser.add_argument(
        "--resume", action="store_true", help="keep the protocols already in the output JSON; run only the others"
    )
    args = parser.parse_args(argv)
    data = movielens.load(args.wheel)
    log(f"MovieLens-100k: {data.user_count} users, {len(data.items)} items, {len(data.interactions):,} ratings")
    cat = Catalogue(data)
    methods = [m for m in args.methods.split(",") if m]
    results: dict[str, Any] = {
        "dataset": {
            "name": "MovieLens-100k (recbole==1.2.1 wheel)",
            "sha256": movielens.FILE_SHA256,
            "users": data.user_count,
            "items": len(data.items),
            "ratings": len(data.interactions),
            "implicit": "every rating is an interaction",
        },
        "k": K,
        "seed": SEED,
        "targets": TARGETS,
        "machine": machine(),
        "protocols": {},
    }
    previous = RESULTS / f"{args.output}.json"
    if args.resume and previous.exists():
        done = json.loads(previous.read_text()).get("protocols", {})
        results["protocols"] = {p: done[p] for p in args.protocols.split(",") if p in done}
        log(f"resuming: {', '.join(results['protocols']) or 'nothing'} kept from {previous}")
    tmp = Path(tempfile.mkdtemp(prefix="cf-quality-"))
    try:
        if args.encrypted_users:
            from bench.quality_mesh import running_mesh

            context: Any = running_mesh(tmp)
        else:
            context = no_mesh()
        with context as mesh:
            for protocol in args.protocols.split(","):
                if protocol in results["protocols"]:
                    continue
                results["protocols"][protocol] = run_protocol(protocol, cat, methods, args.encrypted_users, mesh)
                results["target_checks"] = target_checks(results)
                write_json(args.output, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["target_checks"] = target_checks(results)
    text = table(results)
    print(text)
    for name, check in results.get("target_checks", {}).items():
        print(f"target {name}: {'met' if check['met'] else 'MISSED'} {check}")
    path = write_json(args.output, results)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
