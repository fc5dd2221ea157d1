"""Checkpoint signers: through the key service (the private key never leaves it), or a local
Ed25519 key for development and tests."""

from __future__ import annotations

import threading

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cipherfeed.errors import Unavailable
from cipherfeed.v1 import keyservice_pb2, keyservice_pb2_grpc
from services.ledger.log import NoteSigner


class LocalSigner(NoteSigner):
    def __init__(self, name: str, private_key: Ed25519PrivateKey | None = None) -> None:
        self.name = name
        self._key = private_key or Ed25519PrivateKey.generate()
        self.public_key = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, message: bytes) -> tuple[bytes, bytes]:
        return self.public_key, self._key.sign(message)

    def public_keys(self) -> list[bytes]:
        return [self.public_key]


class KeyServiceSigner(NoteSigner):
    """Signs with the key service's key ``key_name`` under the note key name ``name``."""

    def __init__(self, name: str, key_name: str, stub: keyservice_pb2_grpc.KeyServiceStub, deadline: float) -> None:
        self.name = name
        self.key_name = key_name
        self.stub = stub
        self.deadline = deadline
        self._versions: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        reply = self.stub.GetPublicKeys(keyservice_pb2.GetPublicKeysRequest(), timeout=self.deadline)
        with self._lock:
            for k in reply.keys:
                if k.key_name == self.key_name:
                    self._versions[k.key_version] = k.ed25519_public_key

    def sign(self, message: bytes) -> tuple[bytes, bytes]:
        try:
            reply = self.stub.Sign(
                keyservice_pb2.SignRequest(key_name=self.key_name, message=message), timeout=self.deadline
            )
            if reply.key_version not in self._versions:
                self._refresh()
        except grpc.RpcError as exc:
            raise Unavailable(
                f"key service cannot sign: {exc.code().name}", metadata={"dependency": "keyservice"}
            ) from None
        with self._lock:
            return self._versions[reply.key_version], reply.signature

    def public_keys(self) -> list[bytes]:
        """The cached keys (a new version is fetched when it first signs): reads of the log do not
        depend on the key service being up. Asks the key service only while nothing is cached."""
        with self._lock:
            cached = [self._versions[v] for v in sorted(self._versions)]
        if cached:
            return cached
        try:
            self._refresh()
        except grpc.RpcError as exc:
            raise Unavailable(
                f"key service unreachable: {exc.code().name}", metadata={"dependency": "keyservice"}
            ) from None
        with self._lock:
            return [self._versions[v] for v in sorted(self._versions)]
