"""Shared fixtures: the real dataset, a real Redis, a real key service and recommender on loopback."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from cipherfeed.client.sdk import RecommenderClient
from cipherfeed.config import (
    ClientConfig,
    GrpcLimits,
    KeyServiceConfig,
    RecommenderConfig,
    RedisConfig,
    ScoreRateLimit,
    TlsConfig,
    default_dataset_path,
)
from cipherfeed.devredis import LocalRedis
from cipherfeed.grpcutil import channel
from cipherfeed.tls import DevCertificateAuthority
from services.keyservice.core import KeyServiceCore
from services.keyservice.server import serve as serve_keyservice
from services.recommender.artifact import ModelArtifact
from services.recommender.core import RecommenderCore
from services.recommender.dataset import load_profiles
from services.recommender.model import train
from services.recommender.server import serve as serve_recommender

TEST_LIMITS = GrpcLimits(max_message_bytes=64 * 1024 * 1024, max_query_bytes=1024 * 1024)


class MeshPki:
    """The test session's development CA and one certificate per identity, issued on first use."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = DevCertificateAuthority("cipherfeed.test")
        self._issued: dict[str, TlsConfig] = {}

    def tls(self, name: str) -> TlsConfig:
        if name not in self._issued:
            self._issued[name] = self.ca.write(self.directory, name)
        return self._issued[name]

    def env(self, name: str) -> dict[str, str]:
        """Environment for a child process that runs as ``name``."""
        return self.tls(name).to_env()

    def channel(self, port: int, server: str, identity: str, limits: GrpcLimits = TEST_LIMITS) -> grpc.Channel:
        """A mutual-TLS channel to ``server`` on a loopback port, presenting ``identity``."""
        return channel(f"127.0.0.1:{port}", limits, self.tls(identity), server)


@functools.cache
def mesh_pki() -> MeshPki:
    directory = Path(tempfile.mkdtemp(prefix="cipherfeed-pki-"))
    atexit.register(shutil.rmtree, directory, True)
    return MeshPki(directory)


@pytest.fixture(scope="session")
def pki() -> MeshPki:
    return mesh_pki()


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
def redis_server() -> Iterator[LocalRedis]:
    server = LocalRedis.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def master_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "master.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


def keyservice_config(state_dir: Path, master_key_file: Path, redis: RedisConfig | None) -> KeyServiceConfig:
    return KeyServiceConfig(
        listen="127.0.0.1:0",
        dsn=f"sqlite:///{state_dir / 'keyservice.db'}",
        master_key_file=master_key_file,
        state_dir=state_dir,
        limits=TEST_LIMITS,
        redis=redis or RedisConfig(),
        tls=mesh_pki().tls("keyservice"),
    )


@pytest.fixture(scope="session")
def keyservice(
    redis_server: LocalRedis, master_key_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, KeyServiceCore]]:
    config = keyservice_config(
        tmp_path_factory.mktemp("keyservice"), master_key_file, redis_server.config_for("keyservice")
    )
    running, core = serve_keyservice(config)
    yield running.port, core
    running.stop(grace=1)
    core.close()


def recommender_config(
    state_dir: Path, keyservice_port: int, redis: RedisConfig | None, max_keys: int = 8
) -> RecommenderConfig:
    """``redis``: e.g. ``redis_server.config_for("recommender")``, or None for no cache."""
    return RecommenderConfig(
        listen="127.0.0.1:0",
        grpc_workers=8,
        scoring_threads=2,
        max_registered_keys=max_keys,
        keyservice_target=f"127.0.0.1:{keyservice_port}",
        state_dir=state_dir,
        limits=TEST_LIMITS,
        redis=redis or RedisConfig(),
        tls=mesh_pki().tls("recommender"),
        score_rate=ScoreRateLimit(per_second=100, burst=1000),  # tests of the limit set their own
    )


@pytest.fixture(scope="session")
def recommender(
    tiktok_model: ModelArtifact,
    keyservice: tuple[int, KeyServiceCore],
    redis_server: LocalRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[int, RecommenderCore]]:
    config = recommender_config(tmp_path_factory.mktemp("state"), keyservice[0], redis_server.config_for("recommender"))
    running, core = serve_recommender(config, tiktok_model)
    yield running.port, core
    running.stop(grace=1)
    core.close()


def client_for(port: int, keyservice_port: int, home: Path, identity: str = "device") -> RecommenderClient:
    config = ClientConfig(
        target=f"127.0.0.1:{port}",
        keyservice_target=f"127.0.0.1:{keyservice_port}",
        deadline_seconds=60,
        home=home,
        limits=TEST_LIMITS,
        tls=mesh_pki().tls(identity),
    )
    return RecommenderClient(config)


@pytest.fixture(scope="session")
def client(
    recommender: tuple[int, RecommenderCore],
    keyservice: tuple[int, KeyServiceCore],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RecommenderClient]:
    c = client_for(recommender[0], keyservice[0], tmp_path_factory.mktemp("client"))
    c.wait_ready(timeout=10)
    c.use_keys()
    c.register()
    yield c
    c.close()


__all__ = ["MeshPki", "client_for", "keyservice_config", "mesh_pki", "recommender_config", "replace"]


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    """One real PostgreSQL server (the pgserver wheel's binaries) for the whole run."""
    pgserver = pytest.importorskip("pgserver", reason="pgserver is a dev dependency; run scripts/bootstrap.sh")
    datadir = tmp_path_factory.mktemp("pgdata")
    server = pgserver.get_server(str(datadir), cleanup_mode="stop")
    yield server, datadir
    server.cleanup()


@pytest.fixture
def postgres_database(postgres: tuple[Any, Path]) -> Callable[[], str]:
    """Makes a fresh, empty database on the server and returns its URI."""
    server, _ = postgres

    def create() -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        server.psql(f"CREATE DATABASE {name};")
        return str(server.get_uri(name))

    return create


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_dsn(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The ledger's store on each backend: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    create: Callable[[], str] = request.getfixturevalue("postgres_database")
    return create()
