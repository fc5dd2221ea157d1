"""The key service's domain core: client HE keys (versions, states, audit) and the mesh's Ed25519
signing keys. Transport-free; the servicer maps its errors to status codes."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cipherfeed.cache import Cache, Keys
from cipherfeed.errors import AlreadyExists, NotFound, Reason, echo, invalid, too_large
from cipherfeed.he import keymap
from cipherfeed.he.codec import MaterialCodec
from cipherfeed.he.keymap import KeyMaterial
from cipherfeed.keystate import KeyState, KeyStateError, KeyStatus
from services.keyservice.envelope import MasterKey
from services.keyservice.store import KeyRow, KeyStore

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
    )


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
    ) -> None:
        self.store = store
        self.master = master
        self.codec = codec
        self.cache = cache
        self.states = StatePublisher(cache, key_state_ttl)
        self.max_material_bytes = max_material_bytes

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

    def register(self, material: KeyMaterial) -> KeyRow:
        self._checked(material)
        key_id = key_id_for(material.public_key)
        now = int(time.time())
        with self.store.transaction() as db:
            existing = self.store.key(key_id)
            if existing is not None:
                first = self.store.material(key_id, 1)
                if first is not None and first.sha256 == material.sha256:
                    return existing  # idempotent retry of the same registration
                raise AlreadyExists(
                    f"key {key_id[:16]} is registered with other rotation keys", reason=Reason.KEY_MATERIAL_CONFLICT
                )
            db.execute(
                "INSERT INTO he_keys (key_id, state, current_version, min_version, created_unix,"
                " updated_unix) VALUES (?, 'ENABLED', 1, 1, ?, ?)",
                (key_id, now, now),
            )
            self.store.insert_version(db, key_id, 1, material, now)
            self.store.audit(db, "key.register", key_id, 1, {"material_bytes": material.size})
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

    def rotate(self, key_id: str, material: KeyMaterial, min_version: int) -> KeyRow:
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
                {"min_version": new_min, "material_bytes": material.size},
            )
            return self._commit_state(key_id)

    def set_state(self, key_id: str, state: KeyState) -> KeyRow:
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
            self.store.audit(db, f"key.{state.value.lower()}", key_id, row.current_version, {"from": row.state.value})
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
        if len(message) > MAX_SIGN_BYTES:
            raise too_large("message", len(message), MAX_SIGN_BYTES)
        _check_signing_key_name(name)  # an empty name would select every key (found by the RPC fuzzer)
        rows = self.store.signing_keys(name)
        if not rows:
            raise NotFound(f"no signing key named {echo(name)}", reason=Reason.SIGNING_KEY_NOT_FOUND)
        current = rows[-1]
        raw = self.master.unwrap(current.wrapped_private_key, _signing_context(name, current.version))
        return current.version, Ed25519PrivateKey.from_private_bytes(raw).sign(message)

    def public_keys(self) -> list[SigningPublicKey]:
        rows = self.store.signing_keys()
        newest: dict[str, int] = {}
        for r in rows:
            newest[r.name] = max(newest.get(r.name, 0), r.version)
        return [SigningPublicKey(r.name, r.version, r.public_key, r.version == newest[r.name]) for r in rows]


def _check_signing_key_name(name: str) -> None:
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise invalid("key_name", "a signing key name is 1-64 letters, digits, '-', '_' or '.'")
    if not name.isascii():
        raise invalid("key_name", "a signing key name is ASCII")


def _signing_context(name: str, version: int) -> bytes:
    return f"signing-key|{name}|{version}".encode()
