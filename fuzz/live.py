"""The protocol fuzzer's victims: a key service, a ledger and a recommender, each in a process of its
own on loopback (with a Redis of their own), so that each server's memory is measured apart from
the fuzzer's and a crash shows as a dead process, not as a dead fuzzer.

``LiveMesh.start(directory, model_path)`` starts them over mutual TLS from a development CA of its
own, registers a ``health`` key (never handed to the fuzzer) and a ``victim`` key (the fuzzer may
disable or destroy it), and returns the valid values the fuzzer seeds its strategies with.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from eth_account import Account

from cipherfeed import policy
from cipherfeed.client import keystore
from cipherfeed.client.sdk import RecommenderClient, encrypt_history
from cipherfeed.config import ClientConfig, GrpcLimits, TlsConfig
from cipherfeed.devprocess import start_service
from cipherfeed.devredis import LocalRedis, free_port
from cipherfeed.grpcutil import channel
from cipherfeed.he.params import MESH_PARAMS
from cipherfeed.tls import DevCertificateAuthority
from cipherfeed.v1 import (
    common_pb2,
    keyservice_pb2,
    keyservice_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    recommender_pb2_grpc,
)
from fuzz.protocol import Seeds

LIMITS = GrpcLimits(max_message_bytes=64 * 1024 * 1024, max_query_bytes=1024 * 1024)
ORIGIN = "fuzz.cipherfeed.test/log"
SERVERS = ("keyservice", "ledger", "recommender")
SERVICE_OF = {"KeyService": "keyservice", "Ledger": "ledger", "Recommender": "recommender"}
_STUBS: dict[str, Any] = {
    "keyservice": keyservice_pb2_grpc.KeyServiceStub,
    "ledger": ledger_pb2_grpc.LedgerStub,
    "recommender": recommender_pb2_grpc.RecommenderStub,
}


def identity_for(path: str) -> str:
    """An identity the policy lets call ``path``: a device where it may, else the first allowed."""
    allowed = policy.POLICY[path]
    return policy.DEVICE if policy.DEVICE in allowed else sorted(allowed)[0]


@dataclass
class LiveMesh:
    directory: Path
    redis: LocalRedis
    procs: dict[str, subprocess.Popen[bytes]]
    ports: dict[str, int]
    ca: DevCertificateAuthority
    health: RecommenderClient
    victim: RecommenderClient
    query: bytes  # a valid query under the health key
    item_count: int
    model_version: str
    _tls: dict[str, TlsConfig] = field(default_factory=dict)
    _channels: dict[tuple[str, str], grpc.Channel] = field(default_factory=dict)
    _victims: int = 0

    # --- starting and stopping ----------------------------------------------------------------

    @classmethod
    def start(cls, directory: Path, model_path: Path, item_count: int, model_version: str) -> LiveMesh:
        directory.mkdir(parents=True, exist_ok=True)
        ca = DevCertificateAuthority("cipherfeed.test")
        tls: dict[str, TlsConfig] = {}

        def identity(name: str) -> TlsConfig:
            if name not in tls:
                tls[name] = ca.write(directory / "pki", name)
            return tls[name]

        master = directory / "master.key"
        if not master.exists():
            master.write_bytes(os.urandom(32))
            master.chmod(0o600)
        redis = LocalRedis.start()
        ports = {name: free_port() for name in SERVERS}
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            procs["keyservice"] = start_service(
                "services.keyservice.server",
                {
                    "CIPHERFEED_KEYSERVICE_LISTEN": f"127.0.0.1:{ports['keyservice']}",
                    "CIPHERFEED_KEYSERVICE_DSN": f"sqlite:///{directory / 'keyservice.db'}",
                    "CIPHERFEED_MASTER_KEY_FILE": str(master),
                    "CIPHERFEED_STATE_DIR": str(directory / "keyservice"),
                    **redis.env_for("keyservice"),
                    **identity("keyservice").to_env(),
                },
                log_path=directory / "keyservice.log",
            )
            procs["ledger"] = start_service(
                "services.ledger.server",
                {
                    "CIPHERFEED_LEDGER_LISTEN": f"127.0.0.1:{ports['ledger']}",
                    "CIPHERFEED_LEDGER_DSN": f"sqlite:///{directory / 'ledger.db'}",
                    "CIPHERFEED_LEDGER_SIGNER": "local",
                    "CIPHERFEED_LEDGER_ORIGIN": ORIGIN,
                    "CIPHERFEED_CHECKPOINT_EVERY": "1000",
                    "CIPHERFEED_CHECKPOINT_INTERVAL": "2",
                    "CIPHERFEED_STATE_DIR": str(directory / "ledger"),
                    **identity("ledger").to_env(),
                },
                log_path=directory / "ledger.log",
            )
            procs["recommender"] = start_service(
                "services.recommender.server",
                {
                    "CIPHERFEED_RECOMMENDER_LISTEN": f"127.0.0.1:{ports['recommender']}",
                    "CIPHERFEED_KEYSERVICE_TARGET": f"127.0.0.1:{ports['keyservice']}",
                    "CIPHERFEED_MODEL_PATH": str(model_path),
                    "CIPHERFEED_STATE_DIR": str(directory / "recommender"),
                    "CIPHERFEED_MAX_REGISTERED_KEYS": "8",
                    "CIPHERFEED_MAX_QUERY_BYTES": str(LIMITS.max_query_bytes),
                    "CIPHERFEED_SCORE_RATE_PER_SECOND": "100",
                    "CIPHERFEED_SCORE_BURST": "1000",
                    **redis.env_for("recommender"),
                    **identity("recommender").to_env(),
                },
                log_path=directory / "recommender.log",
            )
        except BaseException:
            for proc in procs.values():
                proc.kill()
                proc.wait()
            redis.stop()
            raise

        mesh = cls(directory, redis, procs, ports, ca, health=None, victim=None, query=b"",  # type: ignore[arg-type]
                   item_count=item_count, model_version=model_version)  # fmt: skip
        mesh._tls = tls
        mesh.health = mesh._client("health")  # its key is never given to the fuzzer
        mesh.health.wait_ready(timeout=30)
        mesh.health.use_keys()
        mesh.health.register()
        mesh.query = mesh.health.encrypt_query(np.eye(64)[0])
        mesh.new_victim()
        mesh._first_leaf()
        return mesh

    def _client(self, name: str) -> RecommenderClient:
        return RecommenderClient(
            ClientConfig(
                target=f"127.0.0.1:{self.ports['recommender']}",
                keyservice_target=f"127.0.0.1:{self.ports['keyservice']}",
                deadline_seconds=60,
                home=self.directory / name,
                limits=LIMITS,
                tls=self.tls("device"),
            )
        )

    def new_victim(self) -> None:
        """A fresh registered key for the fuzzer to name (the last one may be destroyed by now)."""
        if self.victim is not None:
            self.victim.close()
        self._victims += 1
        self.victim = self._client(f"victim-{self._victims}")
        self.victim.keys, self.victim.account = keystore.generate(MESH_PARAMS), Account.create()
        self.victim.register()

    def _first_leaf(self) -> None:
        """One receipt in the log and its checkpoint, so that GetCheckpoint and proofs have a tree."""
        receipt = ledger_pb2.Receipt(
            query_sha256="aa" * 32, response_sha256="bb" * 32, model_version="cc" * 32, key_id="dd" * 32,
            key_version=1, unix_millis=1,
        )  # fmt: skip
        stub = self.stub("Ledger", "recommender")
        stub.AppendBatch(ledger_pb2.AppendBatchRequest(entries=[ledger_pb2.AppendRequest(receipt=receipt)]), timeout=30)
        deadline = time.monotonic() + 120
        while True:
            try:
                if stub.GetCheckpoint(ledger_pb2.GetCheckpointRequest(), timeout=30).size >= 1:
                    return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:  # NO_CHECKPOINT: not yet
                    raise
            if time.monotonic() > deadline:
                raise RuntimeError("the ledger made no checkpoint for its first leaf")
            time.sleep(0.2)  # polling a child process's state (its checkpoint interval is 2 s)

    def stop(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self.health.close()
        self.victim.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.redis.stop()

    # --- what the fuzzer uses ------------------------------------------------------------------

    def tls(self, identity: str) -> TlsConfig:
        if identity not in self._tls:
            self._tls[identity] = self.ca.write(self.directory / "pki", identity)
        return self._tls[identity]

    def stub(self, service: str, identity: str) -> Any:
        """A stub of ``service`` ("KeyService", "Ledger", "Recommender") on one channel per identity,
        reused for every request."""
        server = SERVICE_OF[service]
        if (server, identity) not in self._channels:
            self._channels[server, identity] = channel(
                f"127.0.0.1:{self.ports[server]}", LIMITS, self.tls(identity), server
            )
        return _STUBS[server](self._channels[server, identity])

    def raw_call(self, service: str, method: str, identity: str) -> Callable[..., bytes]:
        """``method`` as a call that takes and returns serialized bytes: the fuzzer sends broken
        protobuf too."""
        self.stub(service, identity)
        ch = self._channels[SERVICE_OF[service], identity]
        return ch.unary_unary(f"/cipherfeed.v1.{service}/{method}")

    def seeds(self) -> Seeds:
        keys = self.victim.keys
        assert keys is not None
        weights = np.zeros(self.item_count)
        weights[:3] = 1 / 3
        history = encrypt_history(keys, weights)
        return Seeds(
            strings={
                "key_id": [self.victim.key_id or ""],
                "model_version": [self.model_version],
                "receipt_id": ["ab" * 32],
                "key_name": ["ledger", "nobody"],
            },
            # Valid HE material under the victim's key, sent as is and mutated (bytes flipped, cut
            # short, padded): what gets past the validator reaches OpenFHE in a live server.
            blobs={
                "message": [b"checkpoint body"],
                "query_ciphertext": [self.victim.encrypt_query(np.eye(64)[1])],
                "history_ciphertexts": history,
                "public_key": [keys.public_key_bytes],
                "rotation_key_map": [keys.rotation_key_bytes],
            },
            messages={"cipherfeed.v1.KeyRef": [common_pb2.KeyRef(key_id=self.victim.key_id or "", version=1)]},
            counts={"history_ciphertexts": len(history)},
        )

    def checks(self) -> dict[str, Callable[[], bool]]:
        """One valid request per server, answered right."""

        def recommender() -> bool:
            return len(self.health.score_ciphertext(self.query).scores) == self.item_count

        def keyservice() -> bool:
            request = keyservice_pb2.GetKeyRequest(key_id=self.health.key_id or "")
            return self.stub("KeyService", "device").GetKey(request, timeout=30).state == keyservice_pb2.ENABLED

        def ledger() -> bool:
            return self.stub("Ledger", "device").GetCheckpoint(ledger_pb2.GetCheckpointRequest(), timeout=30).size >= 1

        return {"recommender": recommender, "keyservice": keyservice, "ledger": ledger}

    def rss(self) -> dict[str, int]:
        """Each server's resident set, in bytes (0 for one that has exited)."""
        out = {}
        for name, proc in self.procs.items():
            try:
                out[name] = psutil.Process(proc.pid).memory_info().rss if proc.poll() is None else 0
            except psutil.NoSuchProcess:
                out[name] = 0
        return out

    def exited(self) -> dict[str, int]:
        """Servers that are no longer running, with their exit status (negative: the signal)."""
        return {name: code for name, proc in self.procs.items() if (code := proc.poll()) is not None}

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.directory / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""
