"""The key service's domain core: client HE keys (versions, states, audit) and the mesh's Ed25519
signing keys. Transport-free; the servicer maps its errors to status codes."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cipherfeed import ownerauth, siwe
from cipherfeed.cache import Cache, Keys
from cipherfeed.config import OwnerAuthConfig, OwnerQuotas
from cipherfeed.errors import (
    AlreadyExists,
    NotFound,
    PermissionDenied,
    Reason,
    ResourceExhausted,
    echo,
    invalid,
    too_large,
)
from cipherfeed.he import keymap
from cipherfeed.he.codec import MaterialCodec
from cipherfeed.he.keymap import KeyMaterial
from cipherfeed.keystate import KeyState, KeyStateError, KeyStatus
from cipherfeed.ownerauth import OwnerAuthError
from services.keyservice.envelope import MasterKey
from services.keyservice.store import KeyRow, KeyStore, SigningRow

log = logging.getLogger(__name__)
MAX_SIGN_BYTES = 64 * 1024


class UnknownKeyError(NotFound):
    """No key with that id was ever registered."""

    reason = Reason.KEY_NOT_FOUND


def key_id_for(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()


def status_of(row: KeyRow) -> KeyStatus:
    return KeyStatus(
        key_id=row.key_id,
        state=row.state,
        current_version=row.current_version,
        min_version=row.min_version,
        material_sha256={v.version: v.material_sha256.hex() for v in row.versions if v.material_sha256},
        owner=row.owner,
    )


class OwnerQuotaExceeded(ResourceExhausted):
    """The owner holds as many keys or bytes as the key service keeps for one account."""

    reason = Reason.OWNER_QUOTA


class DatabaseNonces:
    """Signature nonces in the key service's database: a replay is refused across restarts."""

    def __init__(self, store: KeyStore, max_rows: int) -> None:
        self.store = store
        self.max_rows = max_rows

    def claim(self, signer: str, nonce: bytes, expires_unix: int) -> bool:
        return self.store.claim_nonce(signer, nonce, expires_unix, self.max_rows)


@dataclass(frozen=True)
class SigningPublicKey:
    name: str
    version: int
    public_key: bytes
    current: bool


class StatePublisher:
    """Writes each key's state to Redis, where recommenders read it on every request.

    Writes happen under the store's lock, in the order of the changes, so an older state never
    overwrites a newer one. A write that fails is retried in the background until Redis answers;
    until then recommenders that miss in Redis ask the key service directly.
    """

    def __init__(self, cache: Cache, ttl_seconds: int) -> None:
        self.cache = cache
        self.ttl = ttl_seconds
        self._pending: dict[str, KeyStatus] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if cache.enabled:
            self._thread = threading.Thread(target=self._retry_loop, name="keystate-retry", daemon=True)
            self._thread.start()

    def publish(self, status: KeyStatus) -> None:
        if not self.cache.enabled:
            return
        if self.cache.set(Keys.key_state(status.key_id), status.to_json(), self.ttl):
            with self._lock:
                self._pending.pop(status.key_id, None)
        else:
            with self._lock:
                self._pending[status.key_id] = status

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _retry_loop(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                batch = list(self._pending.values())
            for status in batch:
                if self.cache.set(Keys.key_state(status.key_id), status.to_json(), self.ttl):
                    with self._lock:
                        if self._pending.get(status.key_id) is status:
                            del self._pending[status.key_id]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class KeyServiceCore:
    def __init__(
        self,
        store: KeyStore,
        master: MasterKey,
        codec: MaterialCodec,
        cache: Cache,
        key_state_ttl: int,
        max_material_bytes: int,
        owner_auth: OwnerAuthConfig | None = None,
        quotas: OwnerQuotas | None = None,
    ) -> None:
        self.store = store
        self.master = master
        self.codec = codec
        self.cache = cache
        self.states = StatePublisher(cache, key_state_ttl)
        self.max_material_bytes = max_material_bytes
        self.owner_auth = owner_auth or OwnerAuthConfig()
        self.quotas = quotas or OwnerQuotas()
        self.owners = ownerauth.OwnerVerifier(
            self.owner_auth, DatabaseNonces(store, self.owner_auth.max_nonces), self.session_public_key
        )
        self._nonce_mac_key = secrets.token_bytes(32)  # sign-in nonces outlive no restart
        self.ensure_signing_key(self.owner_auth.session_key_name)

    def close(self) -> None:
        self.states.close()
        self.store.close()

    # --- client HE keys -------------------------------------------------------------------

    def _checked(self, material: KeyMaterial) -> KeyMaterial:
        if material.size > self.max_material_bytes:
            raise too_large("key material", material.size, self.max_material_bytes)
        keymap.validate(self.codec, material)
        return material

    def _row(self, key_id: str) -> KeyRow:
        row = self.store.key(key_id)
        if row is None:
            raise UnknownKeyError(f"no key with id {echo(key_id)}")
        return row

    def _commit_state(self, key_id: str) -> KeyRow:
        row = self._row(key_id)
        self.states.publish(status_of(row))
        return row

    def _check_quota(self, owner: str, more_keys: int, more_bytes: int) -> None:
        """Under the store's transaction lock, so concurrent requests cannot both pass."""
        keys, stored = self.store.owner_usage(owner)
        q = self.quotas
        if keys + more_keys > q.max_keys:
            raise OwnerQuotaExceeded(
                f"{owner} holds {keys} keys; the limit per owner is {q.max_keys}",
                metadata={"quota": "keys", "limit": q.max_keys},
            )
        if stored + more_bytes > q.max_bytes:
            raise OwnerQuotaExceeded(
                f"{owner} stores {stored} bytes of key material; {more_bytes} more would pass the limit"
                f" of {q.max_bytes}",
                metadata={"quota": "bytes", "limit": q.max_bytes},
            )

    def register(self, material: KeyMaterial, owner: str) -> KeyRow:
        owner = ownerauth.checksum_address(owner)
        self._checked(material)
        key_id = key_id_for(material.public_key)
        now = int(time.time())
        with self.store.transaction() as db:
            existing = self.store.key(key_id)
            if existing is not None:
                first = self.store.material(key_id, 1)
                if first is not None and first.sha256 == material.sha256 and existing.owner == owner:
                    return existing  # idempotent retry of the same registration
                raise AlreadyExists(
                    f"key {key_id[:16]} is registered with other rotation keys or another owner",
                    reason=Reason.KEY_MATERIAL_CONFLICT,
                )
            self._check_quota(owner, 1, material.size)
            db.execute(
                "INSERT INTO he_keys (key_id, state, current_version, min_version, created_unix,"
                " updated_unix, owner) VALUES (?, 'ENABLED', 1, 1, ?, ?, ?)",
                (key_id, now, now, owner),
            )
            self.store.insert_version(db, key_id, 1, material, now)
            self.store.audit(db, "key.register", key_id, 1, {"material_bytes": material.size, "by": owner})
            row = self._commit_state(key_id)
        log.info("registered key %s", key_id[:16])
        return row

    def get(self, key_id: str) -> KeyRow:
        # Also refreshes the state recommenders read; the store lock orders it after any change.
        with self.store.locked():
            return self._commit_state(key_id)

    def status(self, key_id: str) -> KeyStatus:
        return status_of(self.get(key_id))

    def eval_keys(self, key_id: str, version: int) -> tuple[int, KeyMaterial]:
        row = self._row(key_id)
        v = status_of(row).check_usable(version)
        material = self.store.material(key_id, v)
        if material is None:
            raise KeyStateError(
                f"key {key_id[:16]} version {v} has no material",
                reason=Reason.KEY_VERSION_UNAVAILABLE,
                metadata={"version": v},
            )
        return v, material

    def rotate(self, key_id: str, material: KeyMaterial, min_version: int, by: str) -> KeyRow:
        self._checked(material)
        now = int(time.time())
        with self.store.transaction() as db:
            row = self._row(key_id)
            if row.state is not KeyState.ENABLED:
                raise KeyStateError(
                    f"key {key_id[:16]} is {row.state.value}; only ENABLED keys rotate",
                    reason=Reason.KEY_NOT_ENABLED,
                    metadata={"state": row.state.value},
                )
            if row.owner:
                self._check_quota(row.owner, 0, material.size)
            new_version = row.current_version + 1
            new_min = max(row.min_version, min_version)
            if new_min > new_version:
                raise invalid("min_version", f"min_version {min_version} is above the new version {new_version}")
            self.store.insert_version(db, key_id, new_version, material, now)
            db.execute(
                "UPDATE he_keys SET current_version = ?, min_version = ?, updated_unix = ? WHERE key_id = ?",
                (new_version, new_min, now, key_id),
            )
            self.store.audit(
                db,
                "key.rotate",
                key_id,
                new_version,
                {"min_version": new_min, "material_bytes": material.size, "by": by},
            )
            return self._commit_state(key_id)

    def set_state(self, key_id: str, state: KeyState, by: str) -> KeyRow:
        """``by`` says who in the audit: the owner's address or ``operator:<mesh identity>``."""
        now = int(time.time())
        with self.store.transaction() as db:
            row = self._row(key_id)
            if row.state is KeyState.DESTROYED:
                raise KeyStateError(
                    f"key {key_id[:16]} is DESTROYED; its state cannot change",
                    reason=Reason.KEY_NOT_ENABLED,
                    metadata={"state": row.state.value},
                )
            if row.state is state:
                return row
            if state is KeyState.DESTROYED:
                db.execute(
                    "UPDATE he_key_versions SET public_key = NULL, rotation_keys = NULL,"
                    " material_sha256 = NULL WHERE key_id = ?",
                    (key_id,),
                )
            db.execute("UPDATE he_keys SET state = ?, updated_unix = ? WHERE key_id = ?", (state.value, now, key_id))
            detail = {"from": row.state.value, "by": by}
            self.store.audit(db, f"key.{state.value.lower()}", key_id, row.current_version, detail)
            row = self._commit_state(key_id)
        if state is KeyState.DESTROYED:
            self.store.db.scrub("he_key_versions")
            self.cache.delete(*(Keys.eval_keys(key_id, v.version) for v in row.versions))
            log.info("destroyed the material of key %s", key_id[:16])
        return row

    # --- signing keys ---------------------------------------------------------------------

    def ensure_signing_key(self, name: str) -> None:
        if not self.store.signing_keys(name):
            self.rotate_signing_key(name)

    def rotate_signing_key(self, name: str) -> SigningPublicKey:
        _check_signing_key_name(name)
        private = Ed25519PrivateKey.generate()
        raw = private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        with self.store.transaction() as db:
            version = len(self.store.signing_keys(name)) + 1
            wrapped = self.master.wrap(raw, _signing_context(name, version))
            db.execute(
                "INSERT INTO signing_keys (name, version, public_key, wrapped_private_key, created_unix)"
                " VALUES (?, ?, ?, ?, ?)",
                (name, version, public, wrapped, int(time.time())),
            )
            self.store.audit(db, "signing.rotate", name, version, {"public_key": public.hex()})
        log.info("signing key %s is now version %d", name, version)
        return SigningPublicKey(name, version, public, True)

    def sign(self, name: str, message: bytes) -> tuple[int, bytes]:
        """For the mesh's callers; the session key signs only session tokens, made here."""
        if name == self.owner_auth.session_key_name:
            raise PermissionDenied(
                f"the {name!r} key signs only session tokens the key service issues",
                reason=Reason.RESERVED_SIGNING_KEY,
            )
        return self._sign(name, message)

    def _sign(self, name: str, message: bytes) -> tuple[int, bytes]:
        if len(message) > MAX_SIGN_BYTES:
            raise too_large("message", len(message), MAX_SIGN_BYTES)
        _check_signing_key_name(name)  # an empty name would select every key (found by the RPC fuzzer)
        rows = self.store.signing_keys(name)
        if not rows:
            raise NotFound(f"no signing key named {echo(name)}", reason=Reason.SIGNING_KEY_NOT_FOUND)
        return rows[-1].version, self._sign_with(rows[-1], message)

    def _sign_with(self, row: SigningRow, message: bytes) -> bytes:
        raw = self.master.unwrap(row.wrapped_private_key, _signing_context(row.name, row.version))
        return Ed25519PrivateKey.from_private_bytes(raw).sign(message)

    def public_keys(self) -> list[SigningPublicKey]:
        rows = self.store.signing_keys()
        newest: dict[str, int] = {}
        for r in rows:
            newest[r.name] = max(newest.get(r.name, 0), r.version)
        return [SigningPublicKey(r.name, r.version, r.public_key, r.version == newest[r.name]) for r in rows]

    def session_public_key(self, version: int) -> bytes | None:
        for row in self.store.signing_keys(self.owner_auth.session_key_name):
            if row.version == version:
                return row.public_key
        return None

    # --- Sign-In with Ethereum ------------------------------------------------------------

    def signin_nonce(self) -> tuple[str, int]:
        """A fresh EIP-4361 nonce and its expiry. Stateless (a MAC over expiry and randomness):
        anonymous callers cannot fill a table by asking for nonces."""
        expires = int(time.time()) + self.owner_auth.signin_nonce_ttl
        body = expires.to_bytes(8, "big") + secrets.token_bytes(12)
        return (body + hmac.new(self._nonce_mac_key, body, hashlib.sha256).digest()[:12]).hex(), expires

    def _check_signin_nonce(self, nonce: str) -> tuple[bytes, int]:
        """The nonce's bytes (what is recorded as used: hex case cannot make a second one) and expiry."""
        try:
            raw = bytes.fromhex(nonce)
        except ValueError:
            raw = b""
        body, mac = raw[:20], raw[20:]
        expected = hmac.new(self._nonce_mac_key, body, hashlib.sha256).digest()[:12]
        if len(raw) != 32 or not hmac.compare_digest(mac, expected):
            raise OwnerAuthError("sign-in nonce was not issued by this key service (or it restarted); ask again")
        expires = int.from_bytes(body[:8], "big")
        if expires < time.time():
            raise OwnerAuthError("sign-in nonce expired; ask for a new one", reason=Reason.OWNER_AUTH_EXPIRED)
        return raw, expires

    def sign_in(self, text: str, signature: bytes) -> tuple[str, ownerauth.SessionClaims]:
        """Checks a signed EIP-4361 message against this service's domain, URI, chain and nonces;
        returns a session token for its address."""
        cfg = self.owner_auth
        try:
            message = siwe.verified(text, signature)
        except siwe.SiweError as exc:
            raise OwnerAuthError(f"sign-in message refused: {exc}") from None
        if message.domain != cfg.siwe_domain or message.uri != cfg.siwe_uri:
            raise OwnerAuthError(f"sign-in message must name domain {cfg.siwe_domain!r} and URI {cfg.siwe_uri!r}")
        if message.chain_id != cfg.chain_id:
            raise OwnerAuthError(f"sign-in message is for chain {message.chain_id}, not {cfg.chain_id}")
        now = time.time()
        if message.expires is None:
            raise OwnerAuthError("sign-in message needs an Expiration Time")
        if message.expires.timestamp() <= now:
            raise OwnerAuthError("sign-in message expired", reason=Reason.OWNER_AUTH_EXPIRED)
        if message.issued.timestamp() > now + cfg.clock_skew:
            raise OwnerAuthError("sign-in message is issued in the future")
        if message.valid_from is not None and message.valid_from.timestamp() > now + cfg.clock_skew:
            raise OwnerAuthError("sign-in message is not valid yet")
        nonce, nonce_expires = self._check_signin_nonce(message.nonce)
        if not self.store.claim_nonce("siwe", nonce, nonce_expires, cfg.max_nonces):
            raise OwnerAuthError("sign-in nonce was already used; ask for a new one", reason=Reason.OWNER_AUTH_REPLAYED)
        expires = int(min(now + cfg.session_ttl, message.expires.timestamp()))
        current = self.store.signing_keys(cfg.session_key_name)[-1]
        claims = ownerauth.SessionClaims(
            address=message.address,
            audience=cfg.audience,
            issued_unix=int(now),
            expires_unix=expires,
            key_version=current.version,
            token_id=secrets.token_hex(16),
        )
        signature = self._sign_with(current, ownerauth.session_signing_input(claims))
        log.info("session for %s until %d", message.address, expires)
        return ownerauth.encode_session(claims, signature), claims


def _check_signing_key_name(name: str) -> None:
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise invalid("key_name", "a signing key name is 1-64 letters, digits, '-', '_' or '.'")
    if not name.isascii():
        raise invalid("key_name", "a signing key name is ASCII")


def _signing_context(name: str, version: int) -> bytes:
    return f"signing-key|{name}|{version}".encode()
