"""The real mesh for the quality harness: Redis, key service and recommender on loopback over
mutual TLS with real OpenFHE, and the device side of the private-history path per test user."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import log, mesh_identities, serve_bench_keyservice
from bench.quality_metrics import Split, top_k, user_items, user_metrics
from cipherfeed.client.sdk import RecommenderClient
from cipherfeed.config import ClientConfig, GrpcLimits, MiB, RecommenderConfig, RedisConfig, ScoreRateLimit
from cipherfeed.devredis import LocalRedis
from services.recommender.artifact import ModelArtifact
from services.recommender.server import serve as serve_recommender

LIMITS = GrpcLimits(max_message_bytes=64 * MiB, max_query_bytes=2 * MiB)


@dataclass
class Mesh:
    work: Path
    redis: RedisConfig
    keyservice_port: int
    identity: Any

    @contextmanager
    def serving(self, model: ModelArtifact) -> Iterator[RecommenderClient]:
        """A recommender serving ``model`` and a device client registered with the key service
        (one key pair per run, kept under the work directory)."""
        state = self.work / f"rec-{model.version[:12]}"
        config = RecommenderConfig(
            listen="127.0.0.1:0",
            scoring_threads=2,
            keyservice_target=f"127.0.0.1:{self.keyservice_port}",
            state_dir=state,
            limits=LIMITS,
            redis=self.redis,
            tls=self.identity("recommender"),
            # One owner key plays every test user here, back to back: the per-owner Score limit
            # that protects a real mesh from one device would throttle the whole evaluation.
            score_rate=ScoreRateLimit(per_second=10_000.0, burst=10_000),
        )
        running, core = serve_recommender(config, model)
        client = RecommenderClient(
            ClientConfig(
                target=f"127.0.0.1:{running.port}",
                keyservice_target=f"127.0.0.1:{self.keyservice_port}",
                deadline_seconds=120,
                home=self.work / "device",
                limits=LIMITS,
                tls=self.identity("device"),
            )
        )
        try:
            client.wait_ready(timeout=30)
            client.use_keys(self.work / "device-keys")
            client.register()
            yield client
        finally:
            client.close()
            running.stop(grace=1)
            core.close()


@contextmanager
def running_mesh(work: Path) -> Iterator[Mesh]:
    redis_server = LocalRedis.start()
    redis = redis_server.config_for("recommender")
    identity = mesh_identities(work)
    ks_running, ks_core = serve_bench_keyservice(work, redis_server, identity, LIMITS)
    try:
        yield Mesh(work, redis, ks_running.port, identity)
    finally:
        ks_running.stop(grace=1)
        ks_core.close()
        redis_server.stop()


def score_users(
    mesh: Mesh,
    cat: Any,
    split: Split,
    embeddings: np.ndarray,
    weight: float,
    users: np.ndarray,
) -> dict[str, np.ndarray]:
    """For each user: upload the encrypted history, score by profile (the server adds the
    model's prior, ``popularity_weight * popularity``, to ``X u``), decrypt, rank without the
    training items; metrics, whether the top 10 equals the plaintext twin's, the
    largest score error against the plaintext scores, and the wall time per user."""
    from services.recommender.catalogues.movielens_model import artifact

    model = artifact(cat.data.items, embeddings, split.train, created_by="bench.quality", popularity_weight=weight)
    x = model.embeddings.astype(np.float64)
    train = user_items(split.train)
    test = user_items(split.test)
    out = np.zeros((len(users), 3))
    identical = np.zeros(len(users), dtype=bool)
    seconds = np.zeros(len(users))
    max_error = 0.0
    with mesh.serving(model) as client:
        for row, u in enumerate(users):
            weights = np.zeros(model.item_count)
            weights[train[int(u)]] = 1.0 / len(train[int(u)])
            t0 = time.perf_counter()
            ref = client.upload_history(weights)
            scores = client.score_profile(ref).scores
            seconds[row] = time.perf_counter() - t0
            plain = x @ (weights @ x) + weight * model.popularity
            max_error = max(max_error, float(np.max(np.abs(scores - plain))))
            enc_top = top_k(scores, train[int(u)])
            plain_top = top_k(plain, train[int(u)])
            identical[row] = bool(np.array_equal(enc_top, plain_top))
            out[row] = user_metrics(enc_top, test[int(u)])
            if (row + 1) % 50 == 0 or row + 1 == len(users):
                log(f"    encrypted {row + 1}/{len(users)} users, {np.mean(seconds[: row + 1]):.2f} s/user")
    return {
        "users": users,
        "hr": out[:, 0],
        "recall": out[:, 1],
        "ndcg": out[:, 2],
        "identical": identical,
        "seconds": seconds,
        "max_error": np.array(max_error),
    }
