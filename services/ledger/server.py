"""Runs the ledger: ``python -m services.ledger.server``."""

from __future__ import annotations

import json
import logging
import sys

from cipherfeed.config import ConfigError, LedgerConfig
from cipherfeed.grpcutil import RunningServer, channel, run_service, start_server
from cipherfeed.v1 import keyservice_pb2_grpc, ledger_pb2, ledger_pb2_grpc
from services.ledger.anchor import Anchorer, ChainConfig, deploy_contract
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


def chain_config(config: LedgerConfig) -> ChainConfig:
    return ChainConfig(rpc_url=config.chain_rpc_url, key_file=config.chain_key_file, contract=config.anchor_contract)


def build_core(
    config: LedgerConfig, signer: NoteSigner | None = None, anchoring: bool = True, background_anchoring: bool = True
) -> LedgerCore:
    store = LedgerStore(config.database_dsn)
    chain = chain_config(config)
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


def deploy_anchor_contract() -> int:
    """``cipherfeed ledger deploy-contract`` (the anchor-contract Job): deploys CheckpointAnchor from
    the ledger's chain account unless CIPHERFEED_ANCHOR_CONTRACT already names one it owns, and
    prints the address as JSON. 0 done, 2 configuration, 1 the chain failed (a Job retries)."""
    config = LedgerConfig.from_env()
    if config.chain_rpc_url is None:
        print("deploy-contract: set CIPHERFEED_CHAIN_RPC_URL (an in-process chain ends with it)", file=sys.stderr)
        return 2
    try:
        address, deployed = deploy_contract(chain_config(config))
    except Exception as exc:  # unreachable node, reverted deployment, a contract someone else owns
        print(f"deploy-contract: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
        return 1
    print(json.dumps({"contract": address, "deployed": deployed, "rpc_url": config.chain_rpc_url}), flush=True)
    if config.anchor_contract is None or address.lower() != config.anchor_contract.lower():
        print(
            f"deploy-contract: the ledger anchors only into CIPHERFEED_ANCHOR_CONTRACT: set it to {address} "
            "and publish that address in the trust file",
            file=sys.stderr,
        )
    return 0


def main() -> int:
    return run_service("ledger", lambda: serve(LedgerConfig.from_env()))


if __name__ == "__main__":
    raise SystemExit(main())
