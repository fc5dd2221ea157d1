"""Domain errors shared by every service, as data: a kind (one status code per class), a stable
reason, metadata and a message. Transports (``cipherfeed.grpcutil``) turn them into a
``google.rpc.Status`` carrying a ``google.rpc.ErrorInfo``; clients branch on the reason only.

Messages and metadata never echo unbounded input: ``echo`` shortens anything a caller sent, and the
transport caps whatever is left (a status travels in HTTP/2 trailers, whose size gRPC limits).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

DOMAIN = "cipherfeed.dev"
MAX_ECHO_CHARS = 64


class Reason(str, Enum):
    """Every reason the mesh returns (``ErrorInfo.reason``), grouped by status code. Stable: clients
    branch on these, so a reason is added or deprecated, never renamed."""

    # UNAUTHENTICATED (cipherfeed/ownerauth.py)
    OWNER_AUTH_REQUIRED = "OWNER_AUTH_REQUIRED"  # sign the request (EIP-712) or send a session token
    OWNER_AUTH_INVALID = "OWNER_AUTH_INVALID"  # malformed, or not over this request, method, key or domain
    OWNER_AUTH_EXPIRED = "OWNER_AUTH_EXPIRED"  # sign again / sign in again
    OWNER_AUTH_REPLAYED = "OWNER_AUTH_REPLAYED"  # the nonce was used: sign again
    # PERMISSION_DENIED
    NOT_KEY_OWNER = "NOT_KEY_OWNER"  # a valid signer who does not own the key
    RESERVED_SIGNING_KEY = "RESERVED_SIGNING_KEY"  # the session key signs only the key service's tokens
    # INVALID_ARGUMENT
    FIELD_REQUIRED = "FIELD_REQUIRED"  # metadata: field
    FIELD_INVALID = "FIELD_INVALID"  # metadata: field
    REQUEST_MALFORMED = "REQUEST_MALFORMED"  # the request's bytes are not the method's protobuf message
    HE_MATERIAL_INVALID = "HE_MATERIAL_INVALID"  # untrusted ciphertext or key material refused
    PROFILE_KEY_MISMATCH = "PROFILE_KEY_MISMATCH"  # the profile was uploaded under another key
    PROOF_RANGE_INVALID = "PROOF_RANGE_INVALID"  # leaf index / tree sizes outside the log
    # UNAUTHENTICATED
    NO_PEER_IDENTITY = "NO_PEER_IDENTITY"  # no client certificate naming an identity of this mesh
    # PERMISSION_DENIED
    CALLER_NOT_ALLOWED = "CALLER_NOT_ALLOWED"  # metadata: caller, method (cipherfeed.policy)
    # NOT_FOUND
    KEY_NOT_FOUND = "KEY_NOT_FOUND"
    SIGNING_KEY_NOT_FOUND = "SIGNING_KEY_NOT_FOUND"
    ITEM_NOT_FOUND = "ITEM_NOT_FOUND"
    PROFILE_NOT_FOUND = "PROFILE_NOT_FOUND"  # expired or unknown: upload the profile again
    RECEIPT_NOT_FOUND = "RECEIPT_NOT_FOUND"
    ROUTE_NOT_FOUND = "ROUTE_NOT_FOUND"  # the HTTP gateway has no route for this path (404) or method (405)
    # ALREADY_EXISTS
    KEY_MATERIAL_CONFLICT = "KEY_MATERIAL_CONFLICT"  # same public key, other rotation keys
    # FAILED_PRECONDITION
    KEY_NOT_ENABLED = "KEY_NOT_ENABLED"  # metadata: state (DISABLED or DESTROYED)
    KEY_VERSION_UNAVAILABLE = "KEY_VERSION_UNAVAILABLE"  # metadata: version
    KEY_VERSION_RETIRED = "KEY_VERSION_RETIRED"  # metadata: version, min_version
    MODEL_MISMATCH = "MODEL_MISMATCH"  # metadata: serving_model (refresh the manifest, retry)
    NOT_CHECKPOINTED = "NOT_CHECKPOINTED"  # receipt not covered by a checkpoint yet: retry shortly
    NO_CHECKPOINT = "NO_CHECKPOINT"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    # RESOURCE_EXHAUSTED
    SIZE_LIMIT = "SIZE_LIMIT"  # metadata: field, limit, size
    COUNT_LIMIT = "COUNT_LIMIT"  # metadata: field, limit
    RATE_LIMITED = "RATE_LIMITED"  # carries RetryInfo when the limiter knows when to retry
    OWNER_QUOTA = "OWNER_QUOTA"  # metadata: quota (keys or bytes), limit; destroy a key to free it
    # UNAVAILABLE
    DEPENDENCY_UNAVAILABLE = "DEPENDENCY_UNAVAILABLE"  # metadata: dependency (keyservice, cache, ledger)
    BACKLOG_FULL = "BACKLOG_FULL"  # receipts waiting for the ledger
    RETRY = "RETRY"  # transient contention (e.g. keys evicted under load)
    # INTERNAL (no details beyond the reason)
    INTERNAL = "INTERNAL"


def echo(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)`` shortened to about ``limit`` characters: how a message quotes caller input."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} chars)" if isinstance(value, str | bytes) else ""
    return f"{text[:limit]}…{size}"


class CipherfeedError(Exception):
    """Base: the message is safe to return to the caller (no secrets, no key material).

    ``reason`` defaults to the class's; ``metadata`` are short strings (field names, limits);
    ``retry_after`` (seconds) becomes a ``google.rpc.RetryInfo`` for errors a client may retry.
    """

    reason: Reason = Reason.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        reason: Reason | None = None,
        metadata: Mapping[str, object] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason  # an instance may refine its class's reason
        self.metadata: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}
        self.retry_after = retry_after

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidArgument(CipherfeedError, ValueError):
    """The request is malformed (gRPC INVALID_ARGUMENT, HTTP 400)."""

    reason = Reason.FIELD_INVALID


class Unauthenticated(CipherfeedError):
    """The caller has no identity of this mesh (UNAUTHENTICATED, 401)."""

    reason = Reason.NO_PEER_IDENTITY


class PermissionDenied(CipherfeedError):
    """The caller is known but may not do this (PERMISSION_DENIED, 403)."""

    reason = Reason.CALLER_NOT_ALLOWED


class NotFound(CipherfeedError, LookupError):
    """A named thing does not exist (NOT_FOUND, 404)."""

    reason = Reason.KEY_NOT_FOUND


class AlreadyExists(CipherfeedError):
    """Creating something that exists with other content (ALREADY_EXISTS, 409)."""

    reason = Reason.KEY_MATERIAL_CONFLICT


class FailedPrecondition(CipherfeedError):
    """The system's state forbids the operation, e.g. a disabled key (FAILED_PRECONDITION, 400)."""

    reason = Reason.KEY_NOT_ENABLED


class ResourceExhausted(CipherfeedError):
    """A size, count or rate limit was exceeded (RESOURCE_EXHAUSTED, 429)."""

    reason = Reason.SIZE_LIMIT


class Unavailable(CipherfeedError):
    """A dependency cannot be reached right now; retrying may succeed (UNAVAILABLE, 503)."""

    reason = Reason.DEPENDENCY_UNAVAILABLE


def required(field: str) -> InvalidArgument:
    return InvalidArgument(f"{field} is required", reason=Reason.FIELD_REQUIRED, metadata={"field": field})


def invalid(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(message, reason=Reason.FIELD_INVALID, metadata={"field": field})


def too_large(field: str, size: int, limit: int, unit: str = "bytes") -> ResourceExhausted:
    return ResourceExhausted(
        f"{field} is {size} {unit}; the limit is {limit}",
        reason=Reason.SIZE_LIMIT,
        metadata={"field": field, "size": size, "limit": limit},
    )


def rate_limited(message: str, retry_after: float | None, **metadata: object) -> ResourceExhausted:
    """For rate limiters: RESOURCE_EXHAUSTED / RATE_LIMITED, with RetryInfo when ``retry_after`` is known."""
    return ResourceExhausted(message, reason=Reason.RATE_LIMITED, metadata=metadata, retry_after=retry_after)
