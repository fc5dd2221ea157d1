"""Runs the key service: ``python -m services.keyservice.server``."""

from __future__ import annotations

import logging

from cipherfeed.cache import Cache
from cipherfeed.config import KeyServiceConfig
from cipherfeed.grpcutil import RunningServer, run_service, start_server
from cipherfeed.he.codec import MaterialCodec
from cipherfeed.he.params import MESH_PARAMS, HEParams
from cipherfeed.v1 import keyservice_pb2, keyservice_pb2_grpc
from services.keyservice.core import KeyServiceCore
from services.keyservice.envelope import MasterKey
from services.keyservice.servicer import KeyServiceServicer
from services.keyservice.store import KeyStore

log = logging.getLogger("cipherfeed.keyservice")
SERVICE_NAME = keyservice_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name


def build_core(config: KeyServiceConfig, params: HEParams = MESH_PARAMS) -> KeyServiceCore:
    store = KeyStore(config.database_dsn)
    master = MasterKey.load(config.master_key_file, config.state_dir)
    codec = MaterialCodec(params)
    codec.warm_up()
    core = KeyServiceCore(
        store,
        master,
        codec,
        Cache(config.redis),
        key_state_ttl=config.redis.key_state_ttl,
        max_material_bytes=config.limits.max_eval_key_bytes,
        owner_auth=config.owner_auth,
        quotas=config.owner_quotas,
    )
    for name in config.signing_key_names:
        core.ensure_signing_key(name)
    return core


def serve(config: KeyServiceConfig, params: HEParams = MESH_PARAMS) -> tuple[RunningServer, KeyServiceCore]:
    core = build_core(config, params)
    servicer = KeyServiceServicer(core)
    running = start_server(
        lambda server: keyservice_pb2_grpc.add_KeyServiceServicer_to_server(servicer, server),
        [SERVICE_NAME],
        config.listen,
        config.limits,
        config.grpc_workers,
        config.tls,
        health_port=config.health_port,
    )
    log.info("key service on port %d, store %s", running.port, config.database_dsn.split("@")[-1])
    return running, core


def main() -> int:
    return run_service("keyservice", lambda: serve(KeyServiceConfig.from_env()))


if __name__ == "__main__":
    raise SystemExit(main())
