"""Who may call what: the mesh's one authorization table, enforced by ``AuthorizationInterceptor``.

Callers are named by the SPIFFE ID of their verified client certificate
(``spiffe://<trust-domain>/<name>``, see ``cipherfeed.identity``). A method missing from the table
is refused to everyone (deny by default); the policy test walks every method of every served
service against this table, so a new RPC without an entry fails it.

* No client certificate: the TLS handshake itself refuses the connection (the server requires
  one), so no byte of a request is read. A certificate the CA verified but that names no SPIFFE
  identity of the mesh's trust domain: UNAUTHENTICATED. A known identity the table does not list
  for the method: PERMISSION_DENIED.
* This table decides which *kind* of caller may reach a method. Whether a device or the gateway
  acts for the key's owner (an owner signature over the request) is checked inside the key
  service and the recommender, not here; that is why devices and the gateway reach the key-state
  RPCs below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from cipherfeed import errors
from cipherfeed.identity import peer_spiffe_id

# Mesh services (each also a client of the others) and the client identities.
KEYSERVICE = "keyservice"
RECOMMENDER = "recommender"
LEDGER = "ledger"
GATEWAY = "gateway"
OPERATOR = "operator"  # the mesh's operators: signing-key rotation, disabling abusive keys
DEVICE = "device"  # end-user devices: one generic certificate; per-user authority is the owner's signature

IDENTITIES: tuple[str, ...] = (KEYSERVICE, RECOMMENDER, LEDGER, GATEWAY, OPERATOR, DEVICE)
EVERYONE: frozenset[str] = frozenset(IDENTITIES)  # every authenticated identity of the mesh
USERS: frozenset[str] = frozenset({DEVICE, GATEWAY})  # a user's own device, or the gateway acting for it

KS = "/cipherfeed.v1.KeyService/"
LG = "/cipherfeed.v1.Ledger/"
RC = "/cipherfeed.v1.Recommender/"
SH = "/cipherfeed.v1.RecommenderShard/"

# (service, method) -> identities allowed to call it.
POLICY: dict[str, frozenset[str]] = {
    # Key service: users' HE keys.
    KS + "RegisterKey": USERS,
    KS + "GetKey": USERS | {RECOMMENDER, OPERATOR},  # the recommender checks a key's state on a cache miss
    KS + "GetEvalKeys": frozenset({RECOMMENDER}),  # rotation keys: only the scorer needs them
    KS + "RotateKey": USERS,  # new material is the owner's alone, never an operator's
    KS + "DisableKey": USERS | {OPERATOR},  # an operator may disable (and re-enable) any key
    KS + "EnableKey": USERS | {OPERATOR},
    KS + "DestroyKey": USERS | {OPERATOR},
    KS + "ListAudit": USERS | {OPERATOR},  # owners see their own entries (checked in the key service)
    KS + "GetSignInNonce": USERS,  # Sign-In with Ethereum: a session token for the owner's account
    KS + "SignIn": USERS,
    # Key service: the mesh's signing keys.
    KS + "Sign": frozenset({LEDGER}),  # only the ledger signs (checkpoints)
    KS + "GetPublicKeys": EVERYONE,  # verification keys are public
    KS + "RotateSigningKey": frozenset({OPERATOR}),
    # Ledger: receipts come only from recommenders; proofs are public to the mesh.
    LG + "Append": frozenset({RECOMMENDER}),
    LG + "AppendBatch": frozenset({RECOMMENDER}),
    LG + "GetCheckpoint": EVERYONE,
    LG + "GetInclusionProof": EVERYONE,
    LG + "GetConsistencyProof": EVERYONE,
    LG + "GetAnchors": EVERYONE,
    LG + "GetReceipt": EVERYONE,
    LG + "GetEntries": EVERYONE,
    # Recommender: scoring is for users; the catalogue and parameters are public to the mesh.
    RC + "GetParams": EVERYONE,
    RC + "GetModelInfo": EVERYONE,
    RC + "GetCatalogueManifest": EVERYONE,
    RC + "GetItems": EVERYONE,
    RC + "UploadProfile": USERS,
    RC + "UploadHistory": USERS,
    RC + "Score": USERS,
    # Recommender shards: parts of an answer, only for the coordinator recommender that merges them
    # (and that checked the owner, the rate and the key first).
    SH + "GetShardInfo": frozenset({RECOMMENDER}),
    SH + "ScoreBlocks": frozenset({RECOMMENDER}),
    SH + "ProjectHistoryBlocks": frozenset({RECOMMENDER}),
    # Every server: health and reflection for every authenticated caller.
    "/grpc.health.v1.Health/Check": EVERYONE,
    "/grpc.health.v1.Health/List": EVERYONE,
    "/grpc.health.v1.Health/Watch": EVERYONE,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": EVERYONE,
}


def allowed(method: str, identity: str) -> bool:
    """Deny by default: True only if the table lists ``identity`` for ``method``."""
    return identity in POLICY.get(method, frozenset())


class AuthorizationInterceptor(grpc.ServerInterceptor):
    """Checks every call against ``POLICY`` before its handler runs."""

    def __init__(self, trust_domain: str) -> None:
        self._trust_domain = trust_domain
        self._wrapped: dict[tuple[str, int], grpc.RpcMethodHandler] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED, as without the interceptor
        method = handler_call_details.method
        key = (method, id(handler))
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrap(method, handler)
            self._wrapped[key] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: Any) -> grpc.RpcMethodHandler:
        from grpc_status import rpc_status

        from cipherfeed.grpcutil import rich_status  # grpcutil builds servers with this interceptor

        allowed_identities = POLICY.get(method, frozenset())
        trust_domain = self._trust_domain

        def check(context: grpc.ServicerContext) -> None:
            peer = peer_spiffe_id(context)
            if peer is None or peer[0] != trust_domain:
                status = rich_status(
                    grpc.StatusCode.UNAUTHENTICATED,
                    errors.Reason.NO_PEER_IDENTITY.value,
                    f"no client identity of spiffe://{trust_domain}",
                )
                context.abort_with_status(rpc_status.to_status(status))
            elif peer[1] not in allowed_identities:
                status = rich_status(
                    grpc.StatusCode.PERMISSION_DENIED,
                    errors.Reason.CALLER_NOT_ALLOWED.value,
                    f"{peer[1]} may not call {method}",
                    {"caller": peer[1], "method": method},
                )
                context.abort_with_status(rpc_status.to_status(status))

        def guard(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            def guarded(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
                check(context)
                return behaviour(request_or_iterator, context)

            return guarded

        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return handler._replace(**{kind: guard(behaviour)})
        raise ValueError(f"handler for {method} has no behaviour")
