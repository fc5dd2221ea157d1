"""Runs the recommender: ``python -m services.recommender.server``."""

from __future__ import annotations

import logging

from cipherfeed.config import RecommenderConfig
from cipherfeed.grpcutil import RunningServer, channel, run_service, start_server
from cipherfeed.he.params import MESH_PARAMS, HEParams
from cipherfeed.v1 import keyservice_pb2_grpc, ledger_pb2_grpc, recommender_pb2, recommender_pb2_grpc
from services.recommender import artifact
from services.recommender.artifact import ModelArtifact
from services.recommender.catalogues import build_catalogue
from services.recommender.core import KeyLimits, RecommenderCore
from services.recommender.receipts import ReceiptSpool
from services.recommender.servicer import RecommenderServicer

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
    if config.ledger_target:
        ledger = ledger_pb2_grpc.LedgerStub(channel(config.ledger_target, config.limits, config.tls, "ledger"))
        receipts = ReceiptSpool(config.state_dir / "receipt-spool.db", ledger, config.receipt_spool_max)
    return RecommenderCore(
        model,
        params,
        config.scoring_threads,
        config.limits,
        keyservice,
        KeyLimits(max_count=config.max_registered_keys, max_bytes=config.max_registered_key_bytes),
        redis_config=config.redis,
        keyservice_deadline=config.keyservice_deadline_seconds,
        receipts=receipts,
        owner_auth=config.owner_auth,
        score_rate=config.score_rate,
    )


def serve(
    config: RecommenderConfig, model: ModelArtifact, params: HEParams = MESH_PARAMS
) -> tuple[RunningServer, RecommenderCore]:
    core = build_core(config, model, params)
    servicer = RecommenderServicer(core)
    running = start_server(
        lambda server: recommender_pb2_grpc.add_RecommenderServicer_to_server(servicer, server),
        [SERVICE_NAME],
        config.listen,
        config.limits,
        config.grpc_workers,
        config.tls,
    )
    log.info(
        "recommender serving model %s on port %d (key service %s, cache %s)",
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
