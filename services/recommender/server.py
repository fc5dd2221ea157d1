"""Runs the recommender: ``python -m services.recommender.server``."""

from __future__ import annotations

import logging

import grpc

from cipherfeed.config import RecommenderConfig
from cipherfeed.grpcutil import RunningServer, channel, run_service, start_server
from cipherfeed.he.params import MESH_PARAMS, HEParams
from cipherfeed.v1 import keyservice_pb2_grpc, ledger_pb2_grpc, recommender_pb2, recommender_pb2_grpc, shard_pb2_grpc
from services.recommender import artifact
from services.recommender.artifact import ModelArtifact
from services.recommender.catalogues import build_catalogue
from services.recommender.coordinator import CoordinatorCore, ShardFanOut
from services.recommender.core import KeyLimits, RecommenderCore
from services.recommender.receipts import ReceiptSpool
from services.recommender.servicer import RecommenderServicer
from services.recommender.shard_servicer import SERVICE as SHARD_SERVICE_NAME
from services.recommender.shard_servicer import RecommenderShardServicer

log = logging.getLogger("cipherfeed.recommender")
SERVICE_NAME = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name


def load_or_train(config: RecommenderConfig) -> ModelArtifact:
    """The configured artifact, or a model trained from the dataset and saved under state_dir."""
    if config.model_path is not None:
        model = artifact.load(config.model_path)
        log.info("loaded model %s from %s", model.version[:16], config.model_path)
        return model
    log.info("training the %s catalogue's content model", config.catalogue)
    model = build_catalogue(config.catalogue, config.dataset, config.movielens_wheel)
    path = config.state_dir / "models" / f"{model.version}.cfmodel"
    if not path.exists():
        model.save(path)
    log.info("model %s: %d items, saved to %s", model.version[:16], model.item_count, path)
    return model


def build_core(config: RecommenderConfig, model: ModelArtifact, params: HEParams = MESH_PARAMS) -> RecommenderCore:
    keyservice_channel = channel(config.keyservice_target, config.limits, config.tls, "keyservice")
    keyservice = keyservice_pb2_grpc.KeyServiceStub(keyservice_channel)
    receipts = None
    if config.ledger_target and not config.shard.is_shard:  # receipts are the coordinator's
        ledger = ledger_pb2_grpc.LedgerStub(channel(config.ledger_target, config.limits, config.tls, "ledger"))
        receipts = ReceiptSpool(config.state_dir / "receipt-spool.db", ledger, config.receipt_spool_max)
    args = (
        model,
        params,
        config.scoring_threads,
        config.limits,
        keyservice,
        KeyLimits(max_count=config.max_registered_keys, max_bytes=config.max_registered_key_bytes),
    )
    kwargs = {
        "redis_config": config.redis,
        "keyservice_deadline": config.keyservice_deadline_seconds,
        "receipts": receipts,
        "owner_auth": config.owner_auth,
        "score_rate": config.score_rate,
    }
    shard = config.shard
    if shard.is_coordinator:
        fan_out = ShardFanOut(shard.targets, config.limits, config.tls, shard.deadline_seconds)
        return CoordinatorCore(*args, shards=fan_out, **kwargs)  # type: ignore[arg-type]
    if shard.index is not None and shard.count is not None:
        return RecommenderCore(*args, shard=(shard.index, shard.count), **kwargs)  # type: ignore[arg-type]
    return RecommenderCore(*args, **kwargs)  # type: ignore[arg-type]


def serve(
    config: RecommenderConfig, model: ModelArtifact, params: HEParams = MESH_PARAMS
) -> tuple[RunningServer, RecommenderCore]:
    core = build_core(config, model, params)
    names: list[str] = []
    if not config.shard.is_shard:  # a shard's answer is a part of the catalogue's: never a client's
        names.append(SERVICE_NAME)
    if not config.shard.is_coordinator:  # a coordinator holds no blocks of its own
        names.append(SHARD_SERVICE_NAME)

    def register(server: grpc.Server) -> None:
        if SERVICE_NAME in names:
            recommender_pb2_grpc.add_RecommenderServicer_to_server(RecommenderServicer(core), server)
        if SHARD_SERVICE_NAME in names:
            shard_pb2_grpc.add_RecommenderShardServicer_to_server(RecommenderShardServicer(core), server)

    running = start_server(
        register,
        names,
        config.listen,
        config.limits,
        config.grpc_workers,
        config.tls,
        health_port=config.health_port,
    )
    b = core.blocks
    role = (
        f"coordinator of {len(config.shard.targets)} shards"
        if config.shard.is_coordinator
        else f"shard {b.index} of {b.count}, blocks {b.first}..{b.stop - 1} of {b.catalogue_blocks}"
    )
    log.info(
        "recommender (%s) serving model %s on port %d (key service %s, cache %s)",
        role,
        core.model_version[:16],
        running.port,
        config.keyservice_target,
        "redis" if core.cache.enabled else "none",
    )
    return running, core


def main() -> int:
    def start() -> tuple[RunningServer, RecommenderCore]:
        config = RecommenderConfig.from_env()
        return serve(config, load_or_train(config))

    return run_service("recommender", start)


if __name__ == "__main__":
    raise SystemExit(main())
