"""gRPC transport for the key service: proto <-> domain, nothing else."""

from __future__ import annotations

import grpc

from cipherfeed.grpcutil import grpc_errors
from cipherfeed.he.keymap import KeyMaterial
from cipherfeed.keystate import KeyState, check_key_id
from cipherfeed.v1 import common_pb2, keyservice_pb2, keyservice_pb2_grpc
from services.keyservice.core import KeyServiceCore, SigningPublicKey
from services.keyservice.store import KeyRow

Ctx = grpc.ServicerContext


def key_record(row: KeyRow) -> keyservice_pb2.KeyRecord:
    return keyservice_pb2.KeyRecord(
        key=common_pb2.KeyRef(key_id=row.key_id, version=row.current_version),
        state=keyservice_pb2.KeyState.Value(row.state.value),
        min_version=row.min_version,
        created_unix=row.created_unix,
        updated_unix=row.updated_unix,
        versions=[
            keyservice_pb2.KeyVersionInfo(
                version=v.version,
                material_sha256=v.material_sha256 or b"",
                created_unix=v.created_unix,
                material_bytes=v.material_bytes,
            )
            for v in row.versions
        ],
    )


def signing_key(k: SigningPublicKey) -> keyservice_pb2.SigningPublicKey:
    return keyservice_pb2.SigningPublicKey(
        key_name=k.name, key_version=k.version, ed25519_public_key=k.public_key, current=k.current
    )


def _key_id(
    request: keyservice_pb2.GetKeyRequest | keyservice_pb2.RotateKeyRequest | keyservice_pb2.KeyStateRequest,
) -> str:
    return check_key_id(request.key_id)


class KeyServiceServicer(keyservice_pb2_grpc.KeyServiceServicer):
    def __init__(self, core: KeyServiceCore) -> None:
        self.core = core

    @grpc_errors
    def RegisterKey(self, request: keyservice_pb2.RegisterKeyRequest, context: Ctx) -> keyservice_pb2.KeyRecord:
        material = KeyMaterial(public_key=request.public_key, rotation_keys=request.rotation_key_map)
        return key_record(self.core.register(material))

    @grpc_errors
    def GetKey(self, request: keyservice_pb2.GetKeyRequest, context: Ctx) -> keyservice_pb2.KeyRecord:
        return key_record(self.core.get(_key_id(request)))

    @grpc_errors
    def GetEvalKeys(self, request: keyservice_pb2.GetKeyRequest, context: Ctx) -> keyservice_pb2.EvalKeys:
        version, material = self.core.eval_keys(_key_id(request), request.version)
        return keyservice_pb2.EvalKeys(
            key=common_pb2.KeyRef(key_id=request.key_id, version=version),
            public_key=material.public_key,
            rotation_key_map=material.rotation_keys,
        )

    @grpc_errors
    def RotateKey(self, request: keyservice_pb2.RotateKeyRequest, context: Ctx) -> keyservice_pb2.KeyRecord:
        material = KeyMaterial(public_key=request.public_key, rotation_keys=request.rotation_key_map)
        return key_record(self.core.rotate(_key_id(request), material, request.min_version))

    @grpc_errors
    def DisableKey(self, request: keyservice_pb2.KeyStateRequest, context: Ctx) -> keyservice_pb2.KeyRecord:
        return key_record(self.core.set_state(_key_id(request), KeyState.DISABLED))

    @grpc_errors
    def EnableKey(self, request: keyservice_pb2.KeyStateRequest, context: Ctx) -> keyservice_pb2.KeyRecord:
        return key_record(self.core.set_state(_key_id(request), KeyState.ENABLED))

    @grpc_errors
    def DestroyKey(self, request: keyservice_pb2.KeyStateRequest, context: Ctx) -> keyservice_pb2.KeyRecord:
        return key_record(self.core.set_state(_key_id(request), KeyState.DESTROYED))

    @grpc_errors
    def Sign(self, request: keyservice_pb2.SignRequest, context: Ctx) -> keyservice_pb2.SignResponse:
        version, signature = self.core.sign(request.key_name, request.message)
        return keyservice_pb2.SignResponse(key_name=request.key_name, key_version=version, signature=signature)

    @grpc_errors
    def GetPublicKeys(
        self, request: keyservice_pb2.GetPublicKeysRequest, context: Ctx
    ) -> keyservice_pb2.GetPublicKeysResponse:
        return keyservice_pb2.GetPublicKeysResponse(keys=[signing_key(k) for k in self.core.public_keys()])

    @grpc_errors
    def RotateSigningKey(
        self, request: keyservice_pb2.RotateSigningKeyRequest, context: Ctx
    ) -> keyservice_pb2.SigningPublicKey:
        return signing_key(self.core.rotate_signing_key(request.key_name))

    @grpc_errors
    def ListAudit(self, request: keyservice_pb2.ListAuditRequest, context: Ctx) -> keyservice_pb2.ListAuditResponse:
        limit = min(request.limit or 100, 1000)
        rows = self.core.store.audit_entries(min(request.after_seq, 2**63 - 1), limit)  # SQL integers are 64-bit signed
        return keyservice_pb2.ListAuditResponse(
            entries=[
                keyservice_pb2.AuditEntry(
                    seq=r.seq,
                    unix_millis=r.unix_millis,
                    action=r.action,
                    subject=r.subject,
                    version=r.version,
                    detail=r.detail,
                )
                for r in rows
            ]
        )
