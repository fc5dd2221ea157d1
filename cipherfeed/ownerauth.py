"""Owners of HE keys prove themselves on every request that changes or uses their key.

A key belongs to an Ethereum account (secp256k1), so a browser wallet can own it. A request
carries ``OwnerAuth`` (common.proto), one of:

* an EIP-712 typed-data signature over (method, key id, request digest, nonce, expiry) in the
  fixed domain {name "cipherfeed", version "1", chainId}. The digest is the SHA-256 of the
  request's deterministic protobuf serialization with ``auth`` cleared, so the signature covers
  every other byte of the request. Nonces are single use (replays are refused), expiries are
  short (``OwnerAuthConfig.max_signature_lifetime``);
* a session token the key service issued after a Sign-In with Ethereum exchange (cipherfeed/siwe.py):
  Ed25519-signed by the key service's session key, bound to the account, the audience and an
  expiry. Any service verifies it with the key service's public key alone.

Errors: a missing, malformed, expired or replayed proof is ``Unauthenticated``; a valid proof by
an account that does not own the key is ``PermissionDenied``.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_utils import is_address, to_checksum_address
from google.protobuf.message import Message

from cipherfeed.config import OwnerAuthConfig
from cipherfeed.errors import InvalidArgument, PermissionDenied, Reason, ResourceExhausted, Unauthenticated
from cipherfeed.v1 import common_pb2


class OwnerAuthError(Unauthenticated):
    """The owner's proof is missing, malformed, not over this request, expired or replayed."""

    reason = Reason.OWNER_AUTH_INVALID


class NotOwner(PermissionDenied):
    """A valid proof by an account that does not own the key."""

    reason = Reason.NOT_KEY_OWNER


DOMAIN_NAME = "cipherfeed"
DOMAIN_VERSION = "1"
NONCE_BYTES = 32
SESSION_PREFIX = "cfs1"
SESSION_SIGNING_CONTEXT = b"cipherfeed session token v1\n"
MAX_SESSION_TOKEN_CHARS = 1024

EIP712_TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
    ],
    "OwnerRequest": [
        {"name": "method", "type": "string"},
        {"name": "keyId", "type": "string"},
        {"name": "requestDigest", "type": "bytes32"},
        {"name": "nonce", "type": "bytes32"},
        {"name": "expires", "type": "uint64"},
    ],
}


def method_name(service: str, method: str) -> str:
    """``cipherfeed.v1.KeyService/DisableKey``: what signatures name (the gRPC path without '/')."""
    return f"{service}/{method}"


def checksum_address(address: str) -> str:
    """The EIP-55 form of a 0x address, or InvalidArgument."""
    if not isinstance(address, str) or len(address) != 42 or not is_address(address):
        raise InvalidArgument(f"{address!r} is not an Ethereum address (0x and 40 hex digits)")
    return to_checksum_address(address)


def request_digest(request: Message) -> bytes:
    """SHA-256 of the request's deterministic serialization with its ``auth`` field cleared."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("auth")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).digest()


def typed_data(chain_id: int, method: str, key_id: str, digest: bytes, nonce: bytes, expires: int) -> dict[str, Any]:
    """The EIP-712 message a wallet signs (``eth_signTypedData_v4``), as a JSON-like dict."""
    return {
        "types": EIP712_TYPES,
        "primaryType": "OwnerRequest",
        "domain": {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": chain_id},
        "message": {"method": method, "keyId": key_id, "requestDigest": digest, "nonce": nonce, "expires": expires},
    }


def _signable(chain_id: int, method: str, key_id: str, digest: bytes, nonce: bytes, expires: int) -> SignableMessage:
    return encode_typed_data(full_message=typed_data(chain_id, method, key_id, digest, nonce, expires))


def sign_request(
    account: Any, chain_id: int, method: str, key_id: str, request: Message, lifetime: int = 120
) -> common_pb2.OwnerAuth:
    """Signs ``request`` for ``method`` on ``key_id`` with ``account`` (an eth-account
    LocalAccount) and sets its ``auth`` field; returns that field."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    expires = int(time.time()) + lifetime
    digest = request_digest(request)
    signed = account.sign_message(_signable(chain_id, method, key_id, digest, nonce, expires))
    auth = common_pb2.OwnerAuth(
        signature=common_pb2.Eip712Signature(
            signer=account.address, nonce=nonce, expires_unix=expires, signature=bytes(signed.signature)
        )
    )
    request.auth.CopyFrom(auth)  # type: ignore[attr-defined]
    return auth


# --- session tokens -----------------------------------------------------------------------


@dataclass(frozen=True)
class SessionClaims:
    address: str
    audience: str
    issued_unix: int
    expires_unix: int
    key_version: int  # the version of the key service's session signing key
    token_id: str

    def payload(self) -> bytes:
        return json.dumps(
            {
                "sub": self.address,
                "aud": self.audience,
                "iat": self.issued_unix,
                "exp": self.expires_unix,
                "kv": self.key_version,
                "jti": self.token_id,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not text or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_session(claims: SessionClaims, signature: bytes) -> str:
    return f"{SESSION_PREFIX}.{_b64(claims.payload())}.{_b64(signature)}"


def session_signing_input(claims: SessionClaims) -> bytes:
    """What the key service's session key signs (a context prefix: these bytes are no checkpoint)."""
    return SESSION_SIGNING_CONTEXT + claims.payload()


def decode_session(token: str, public_key: Callable[[int], bytes | None], audience: str, now: float) -> SessionClaims:
    """The claims of a token signed by the key service for ``audience``, still valid at ``now``."""
    if len(token) > MAX_SESSION_TOKEN_CHARS:
        raise OwnerAuthError("session token is too long")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != SESSION_PREFIX:
        raise OwnerAuthError("session token is malformed")
    try:
        payload, signature = _unb64(parts[1]), _unb64(parts[2])
        d = json.loads(payload)
        claims = SessionClaims(
            address=str(d["sub"]),
            audience=str(d["aud"]),
            issued_unix=int(d["iat"]),
            expires_unix=int(d["exp"]),
            key_version=int(d["kv"]),
            token_id=str(d["jti"]),
        )
    except (ValueError, KeyError, TypeError, RecursionError):
        raise OwnerAuthError("session token is malformed") from None
    if claims.payload() != payload:
        raise OwnerAuthError("session token is not in canonical form")
    key = public_key(claims.key_version)
    if key is None:
        raise OwnerAuthError("session token is signed by an unknown key")
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(signature, session_signing_input(claims))
    except (InvalidSignature, ValueError):
        raise OwnerAuthError("session token signature is invalid") from None
    if claims.audience != audience:
        raise OwnerAuthError(f"session token is for {claims.audience!r}, not {audience!r}")
    if claims.expires_unix <= now:
        raise OwnerAuthError("session token expired; sign in again", reason=Reason.OWNER_AUTH_EXPIRED)
    return claims


# --- nonces -------------------------------------------------------------------------------


class NonceStore(Protocol):
    def claim(self, signer: str, nonce: bytes, expires_unix: int) -> bool:
        """Records the nonce until it expires; False if it was already recorded (a replay)."""
        ...


class MemoryNonceStore:
    """Nonces seen by this process until their signatures expire; bounded (full: refuse, never
    forget an unexpired nonce, which would let its request be replayed)."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._seen: dict[tuple[str, bytes], int] = {}
        self._expiry: list[tuple[int, str, bytes]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)

    def claim(self, signer: str, nonce: bytes, expires_unix: int) -> bool:
        now = self.clock()
        with self._lock:
            while self._expiry and self._expiry[0][0] < now:
                _, s, n = heapq.heappop(self._expiry)
                self._seen.pop((s, n), None)
            if (signer, nonce) in self._seen:
                return False
            if len(self._seen) >= self.max_entries:
                raise ResourceExhausted("too many signed requests in flight; retry shortly", reason=Reason.COUNT_LIMIT)
            self._seen[(signer, nonce)] = expires_unix
            heapq.heappush(self._expiry, (expires_unix, signer, nonce))
            return True


# --- verification -------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    address: str  # checksummed
    via: str  # "eip712" or "session"


class OwnerVerifier:
    """Checks ``OwnerAuth`` on a request. ``session_key(version)`` returns the key service's
    session public key of that version (None if unknown)."""

    def __init__(
        self,
        config: OwnerAuthConfig,
        nonces: NonceStore,
        session_key: Callable[[int], bytes | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.nonces = nonces
        self.session_key = session_key
        self.clock = clock

    def caller(self, method: str, key_id: str, request: Message) -> Caller:
        """Who authorized this request (Unauthenticated if nobody did, validly)."""
        if not request.HasField("auth"):
            raise OwnerAuthError(
                f"{method} needs the key owner's authorization (an EIP-712 signature or session)",
                reason=Reason.OWNER_AUTH_REQUIRED,
            )
        auth = request.auth  # type: ignore[attr-defined]
        which = auth.WhichOneof("proof")
        if which == "session_token":
            claims = decode_session(auth.session_token, self.session_key, self.config.audience, self.clock())
            return Caller(claims.address, "session")
        if which != "signature":
            raise OwnerAuthError("owner authorization is empty", reason=Reason.OWNER_AUTH_REQUIRED)
        sig = auth.signature
        now = int(self.clock())
        if len(sig.nonce) != NONCE_BYTES:
            raise OwnerAuthError(f"signature nonce must be {NONCE_BYTES} bytes")
        if len(sig.signature) != 65:
            raise OwnerAuthError("signature must be 65 bytes")
        try:
            claimed = checksum_address(sig.signer)
        except InvalidArgument as exc:
            raise OwnerAuthError(f"signer: {exc}") from None
        if sig.expires_unix < now:
            raise OwnerAuthError("signature expired; sign the request again", reason=Reason.OWNER_AUTH_EXPIRED)
        if sig.expires_unix > now + self.config.max_signature_lifetime:
            raise OwnerAuthError(f"signature expires more than {self.config.max_signature_lifetime} s ahead")
        signable = _signable(self.config.chain_id, method, key_id, request_digest(request), sig.nonce, sig.expires_unix)
        try:
            recovered = Account.recover_message(signable, signature=sig.signature)
        except Exception:  # eth-account raises several types for malformed signatures
            raise OwnerAuthError("signature is malformed") from None
        if recovered != claimed:
            raise OwnerAuthError("signature does not match this request, method, key, domain or signer")
        return Caller(recovered, "eip712")

    def authorize(self, method: str, key_id: str, request: Message, owner: str) -> Caller:
        """The owner, if the request proves to be theirs; the nonce is spent only then."""
        who = self.caller(method, key_id, request)
        if not owner or who.address != owner:
            raise NotOwner(f"{who.address} does not own key {key_id[:16]}", reason=Reason.NOT_KEY_OWNER)
        self.spend(request, who)
        return who

    def spend(self, request: Message, who: Caller) -> None:
        """Records a signature's nonce (Unauthenticated if it was seen: a replay)."""
        if who.via != "eip712":
            return
        sig = request.auth.signature  # type: ignore[attr-defined]
        if not self.nonces.claim(who.address, bytes(sig.nonce), int(sig.expires_unix)):
            raise OwnerAuthError(
                "this signature was already used (replay); sign the request again", reason=Reason.OWNER_AUTH_REPLAYED
            )
