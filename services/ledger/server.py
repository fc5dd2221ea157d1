"""Runs the ledger: ``python -m services.ledger.server``."""

from __future__ import annotations

import logging

from cipherfeed.config import ConfigError, LedgerConfig
from cipherfeed.grpcutil import RunningServer, channel, run_service, start_server
from cipherfeed.v1 import keyservice_pb2_grpc, ledger_pb2, ledger_pb2_grpc
from services.ledger.anchor import Anchorer, ChainConfig
from services.ledger.core import LedgerCore
from services.ledger.log import NoteSigner, TransparencyLog
from services.ledger.servicer import LedgerServicer
from services.ledger.signers import KeyServiceSigner, LocalSigner
from services.ledger.store import LedgerStore

log = logging.getLogger("cipherfeed.ledger")
SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["Ledger"].full_name


def make_signer(config: LedgerConfig) -> NoteSigner:
    if config.signer == "local":
        log.warning("signing checkpoints with an in-memory key (development only)")
        return LocalSigner(config.origin)
    if config.signer != "keyservice":
        raise ConfigError(f"CIPHERFEED_LEDGER_SIGNER={config.signer!r}: expected keyservice or local")
    keyservice = channel(config.keyservice_target, config.limits, config.tls, "keyservice")
    stub = keyservice_pb2_grpc.KeyServiceStub(keyservice)
    return KeyServiceSigner(config.origin, config.signing_key_name, stub, deadline=10.0)


def build_core(
    config: LedgerConfig, signer: NoteSigner | None = None, anchoring: bool = True, background_anchoring: bool = True
) -> LedgerCore:
    store = LedgerStore(config.database_dsn)
    chain = ChainConfig(rpc_url=config.chain_rpc_url, key_file=config.chain_key_file)
    anchorer = Anchorer(store, chain, background=background_anchoring) if anchoring else None
    transparency_log = TransparencyLog(
        store,
        config.origin,
        signer or make_signer(config),
        checkpoint_every=config.checkpoint_every,
        checkpoint_interval=config.checkpoint_interval,
        on_checkpoint=(lambda _row: anchorer.notify()) if anchorer else None,
    )
    return LedgerCore(transparency_log, anchorer)


def serve(
    config: LedgerConfig, signer: NoteSigner | None = None, background_anchoring: bool = True
) -> tuple[RunningServer, LedgerCore]:
    core = build_core(config, signer, background_anchoring=background_anchoring)
    servicer = LedgerServicer(core)
    running = start_server(
        lambda server: ledger_pb2_grpc.add_LedgerServicer_to_server(servicer, server),
        [SERVICE_NAME],
        config.listen,
        config.limits,
        config.grpc_workers,
        config.tls,
        health_port=config.health_port,
    )
    log.info("ledger %s on port %d, chain %s", config.origin, running.port, config.chain_rpc_url or "in-process py-evm")
    return running, core


def main() -> int:
    return run_service("ledger", lambda: serve(LedgerConfig.from_env()))


if __name__ == "__main__":
    raise SystemExit(main())
