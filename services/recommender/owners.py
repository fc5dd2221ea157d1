"""The recommender's side of owner authorization: the key service's session public keys (fetched
over the mesh, refreshed when a token names a version not seen yet), the per-process nonce store,
and the Score rate limit per owner."""

from __future__ import annotations

import logging
import threading
import time

import grpc
from google.protobuf.message import Message

from cipherfeed.config import OwnerAuthConfig, ScoreRateLimit
from cipherfeed.errors import Unavailable
from cipherfeed.keystate import KeyStatus
from cipherfeed.ownerauth import Caller, MemoryNonceStore, OwnerVerifier
from cipherfeed.ratelimit import TokenBuckets
from cipherfeed.v1 import keyservice_pb2, keyservice_pb2_grpc

log = logging.getLogger(__name__)
REFRESH_INTERVAL = 5.0  # at most one key-service lookup per this many seconds for unknown versions


class SessionKeys:
    def __init__(self, keyservice: keyservice_pb2_grpc.KeyServiceStub, name: str, deadline: float) -> None:
        self.keyservice = keyservice
        self.name = name
        self.deadline = deadline
        self._keys: dict[int, bytes] = {}
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()

    def __call__(self, version: int) -> bytes | None:
        with self._lock:
            key = self._keys.get(version)
            if key is not None or time.monotonic() - self._fetched_at < REFRESH_INTERVAL:
                return key
            self._fetched_at = time.monotonic()
        try:
            reply = self.keyservice.GetPublicKeys(keyservice_pb2.GetPublicKeysRequest(), timeout=self.deadline)
        except grpc.RpcError as exc:
            raise Unavailable(f"key service: cannot read its session keys: {exc.code().name}") from None
        with self._lock:
            self._keys = {k.key_version: k.ed25519_public_key for k in reply.keys if k.key_name == self.name}
            return self._keys.get(version)


class OwnerChecks:
    def __init__(
        self,
        keyservice: keyservice_pb2_grpc.KeyServiceStub,
        config: OwnerAuthConfig,
        score_rate: ScoreRateLimit,
        deadline: float,
    ) -> None:
        self.config = config
        self.nonces = MemoryNonceStore(config.max_nonces)
        self.verifier = OwnerVerifier(config, self.nonces, SessionKeys(keyservice, config.session_key_name, deadline))
        self.score_buckets = TokenBuckets(score_rate.per_second, score_rate.burst, score_rate.max_buckets)

    def authorize(self, method: str, request: Message, status: KeyStatus) -> Caller:
        return self.verifier.authorize(method, status.key_id, request, status.owner)

    def admit_score(self, status: KeyStatus) -> None:
        self.score_buckets.take(status.owner or status.key_id, "scores for this owner")
