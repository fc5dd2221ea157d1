"""gRPC transport for the key service: proto <-> domain, nothing else."""

from __future__ import annotations

import grpc
from google.protobuf.message import Message

from cipherfeed.errors import InvalidArgument, Reason, required
from cipherfeed.grpcutil import grpc_errors
from cipherfeed.he.keymap import KeyMaterial
from cipherfeed.identity import peer_identity
from cipherfeed.keystate import KeyState, check_key_id
from cipherfeed.ownerauth import checksum_address, method_name
from cipherfeed.v1 import common_pb2, keyservice_pb2, keyservice_pb2_grpc
from services.keyservice.core import KeyServiceCore, SigningPublicKey, key_id_for
from services.keyservice.store import KeyRow

Ctx = grpc.ServicerContext
SERVICE = keyservice_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name


def key_record(row: KeyRow) -> keyservice_pb2.KeyRecord:
    return keyservice_pb2.KeyRecord(
        key=common_pb2.KeyRef(key_id=row.key_id, version=row.current_version),
        state=keyservice_pb2.KeyState.Value(row.state.value),
        min_version=row.min_version,
        created_unix=row.created_unix,
        updated_unix=row.updated_unix,
        owner=row.owner,
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
    """Every change to a key, and reading its audit, is authorized by the key's owner
    (cipherfeed/ownerauth.py); an operator identity may also disable any key and read all audit."""

    def __init__(self, core: KeyServiceCore) -> None:
        self.core = core
        self.operators = frozenset(core.owner_auth.operator_identities)

    def _owner(self, method: str, request: Message, key_id: str) -> str:
        """The owner's address if ``request`` carries their valid authorization for ``method``."""
        owner = self.core.get(key_id).owner
        return self.core.owners.authorize(method_name(SERVICE, method), key_id, request, owner).address

    def _operator(self, context: Ctx) -> str | None:
        identity = peer_identity(context)
        return identity if identity in self.operators else None

    @grpc_errors
    def RegisterKey(self, request: keyservice_pb2.RegisterKeyRequest, context: Ctx) -> keyservice_pb2.KeyRecord:
        if not request.owner:
            raise required("owner")
        owner = checksum_address(request.owner)
        key_id = key_id_for(request.public_key)
        self.core.owners.authorize(method_name(SERVICE, "RegisterKey"), key_id, request, owner)
        material = KeyMaterial(public_key=request.public_key, rotation_keys=request.rotation_key_map)
        return key_record(self.core.register(material, owner))

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
        key_id = _key_id(request)
        by = self._owner("RotateKey", request, key_id)
        material = KeyMaterial(public_key=request.public_key, rotation_keys=request.rotation_key_map)
        return key_record(self.core.rotate(key_id, material, request.min_version, by))

    @grpc_errors
    def DisableKey(self, request: keyservice_pb2.KeyStateRequest, context: Ctx) -> keyservice_pb2.KeyRecord:
        key_id = _key_id(request)
        operator = None if request.HasField("auth") else self._operator(context)
        by = f"operator:{operator}" if operator else self._owner("DisableKey", request, key_id)
        return key_record(self.core.set_state(key_id, KeyState.DISABLED, by))

    @grpc_errors
    def EnableKey(self, request: keyservice_pb2.KeyStateRequest, context: Ctx) -> keyservice_pb2.KeyRecord:
        key_id = _key_id(request)
        return key_record(self.core.set_state(key_id, KeyState.ENABLED, self._owner("EnableKey", request, key_id)))

    @grpc_errors
    def DestroyKey(self, request: keyservice_pb2.KeyStateRequest, context: Ctx) -> keyservice_pb2.KeyRecord:
        key_id = _key_id(request)
        by = self._owner("DestroyKey", request, key_id)
        return key_record(self.core.set_state(key_id, KeyState.DESTROYED, by))

    @grpc_errors
    def GetSignInNonce(
        self, request: keyservice_pb2.GetSignInNonceRequest, context: Ctx
    ) -> keyservice_pb2.SignInChallenge:
        nonce, expires = self.core.signin_nonce()
        cfg = self.core.owner_auth
        return keyservice_pb2.SignInChallenge(
            nonce=nonce, expires_unix=expires, domain=cfg.siwe_domain, uri=cfg.siwe_uri, chain_id=cfg.chain_id
        )

    @grpc_errors
    def SignIn(self, request: keyservice_pb2.SignInRequest, context: Ctx) -> keyservice_pb2.SessionToken:
        if not request.message:
            raise required("message")
        if not request.signature:
            raise required("signature")
        token, claims = self.core.sign_in(request.message, request.signature)
        return keyservice_pb2.SessionToken(
            token=token, address=claims.address, expires_unix=claims.expires_unix, audience=claims.audience
        )

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
        after = min(request.after_seq, 2**63 - 1)  # SQL integers are 64-bit signed
        operator = None if request.HasField("auth") else self._operator(context)
        if request.key_id:
            key_id = check_key_id(request.key_id)
            if not operator:
                self._owner("ListAudit", request, key_id)
            rows = self.core.store.audit_entries(after, limit, subject=key_id)
        elif operator:
            rows = self.core.store.audit_entries(after, limit)
        else:  # the whole log links every key id: operators only
            raise InvalidArgument(
                "key_id is required: owners read their key's entries; the whole audit log is for operators",
                reason=Reason.FIELD_REQUIRED,
                metadata={"field": "key_id"},
            )
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
