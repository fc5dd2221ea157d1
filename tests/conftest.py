"""Shared fixtures: the real dataset, a real recommender on loopback, a registered client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cipherfeed.client.sdk import RecommenderClient
from cipherfeed.config import ClientConfig, GrpcLimits, RecommenderConfig, default_dataset_path
from services.recommender.artifact import ModelArtifact
from services.recommender.core import RecommenderCore
from services.recommender.dataset import load_profiles
from services.recommender.model import train
from services.recommender.server import serve

TEST_LIMITS = GrpcLimits(max_message_bytes=64 * 1024 * 1024, max_query_bytes=1024 * 1024)


@pytest.fixture(scope="session")
def dataset_path() -> Path:
    path = default_dataset_path()
    if not path.is_file():
        pytest.fail(f"the TikTok profiles dataset is required at {path} (set CIPHERFEED_DATASET)")
    return path


@pytest.fixture(scope="session")
def tiktok_model(dataset_path: Path) -> ModelArtifact:
    return train(load_profiles(dataset_path), created_by="tests")


@pytest.fixture(scope="session")
def recommender(
    tiktok_model: ModelArtifact, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, RecommenderCore]]:
    config = RecommenderConfig(
        listen="127.0.0.1:0",
        grpc_workers=8,
        scoring_threads=2,
        max_registered_keys=8,
        state_dir=tmp_path_factory.mktemp("state"),
        limits=TEST_LIMITS,
    )
    running, core = serve(config, tiktok_model)
    yield running.port, core
    running.stop(grace=1)
    core.close()


def client_for(port: int, home: Path) -> RecommenderClient:
    return RecommenderClient(
        ClientConfig(target=f"127.0.0.1:{port}", deadline_seconds=60, home=home, limits=TEST_LIMITS)
    )


@pytest.fixture(scope="session")
def client(
    recommender: tuple[int, RecommenderCore], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RecommenderClient]:
    port, _ = recommender
    c = client_for(port, tmp_path_factory.mktemp("client"))
    c.wait_ready(timeout=10)
    c.use_keys()
    c.register()
    yield c
    c.close()
