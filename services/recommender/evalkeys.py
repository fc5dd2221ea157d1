"""Clients' rotation keys on a recommender: the key state is checked on every request; material
comes from the in-process set, else Redis, else the key service, verified against the SHA-256 the
key service recorded.

Keys are installed in OpenFHE's global map under ``<key_id>:<version>``, a tag this process
chooses, and the query is re-tagged before use. The installed set is an LRU bounded by count and
bytes; eviction removes the keys from OpenFHE's map, so memory stays flat however many users come
and go. Insertion and eviction take the write lock; evaluation holds the read lock throughout. An eviction
removes only the filing it evicted (``globalkeys`` generations), never a newer install of the tag.
"""

from __future__ import annotations

import builtins
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from cipherfeed import heap
from cipherfeed.cache import Cache, Keys
from cipherfeed.config import RedisConfig
from cipherfeed.errors import FailedPrecondition, NotFound, Reason, Unavailable
from cipherfeed.grpcutil import known_reason
from cipherfeed.he import keymap
from cipherfeed.he.codec import MaterialCodec, MaterialError
from cipherfeed.he.keymap import EVAL_KEY_LOCK, KeyMaterial
from cipherfeed.keystate import KeyState, KeyStatus, check_key_id
from cipherfeed.v1 import common_pb2, keyservice_pb2, keyservice_pb2_grpc

log = logging.getLogger(__name__)


class UnknownKeyError(NotFound):
    """The key service has no key with that id."""

    reason = Reason.KEY_NOT_FOUND


@dataclass
class InstallStats:
    installs: int = 0
    evictions: int = 0
    fetched_from_cache: int = 0
    fetched_from_keyservice: int = 0


class InstalledKeys:
    def __init__(self, codec: MaterialCodec, max_count: int, max_bytes: int) -> None:
        self.codec = codec
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.stats = InstallStats()
        # tag -> (bytes, generation of its filing in OpenFHE's map: a removal names the filing it means)
        self._lru: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._lru)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def touch(self, tag: str) -> bool:
        with self._lock:
            if tag not in self._lru:
                return False
            self._lru.move_to_end(tag)
            return True

    def install(self, tag: str, rotation_keys: builtins.bytes) -> None:  # the property above is "bytes"
        generation = keymap.install(self.codec, tag, rotation_keys)
        evict: list[tuple[str, int]] = []
        with self._lock:
            if tag in self._lru:
                self._bytes -= self._lru.pop(tag)[0]
            self._lru[tag] = (len(rotation_keys), generation)
            self._bytes += len(rotation_keys)
            self.stats.installs += 1
            while len(self._lru) > 1 and (len(self._lru) > self.max_count or self._bytes > self.max_bytes):
                old, (size, old_generation) = self._lru.popitem(last=False)
                self._bytes -= size
                evict.append((old, old_generation))
        # The removals wait for the write lock while scorings hold the read lock; the same tag may
        # be installed again meanwhile: naming the generation keeps that newer filing.
        for old, old_generation in evict:
            keymap.remove(self.codec, old, old_generation)
            with self._lock:
                self.stats.evictions += 1
        if evict:
            # Evicted key memory goes back to the system (see cipherfeed.heap): memory stays flat
            # however many users come and go; trimming only every 8th eviction left RSS +8%.
            heap.trim()

    def remove(self, tag: str) -> None:
        with self._lock:
            entry = self._lru.pop(tag, None)
            if entry is None:
                return
            self._bytes -= entry[0]
        keymap.remove(self.codec, tag, entry[1])

    def remove_key(self, key_id: str) -> None:
        with self._lock:
            tags = [t for t in self._lru if t.startswith(key_id + ":")]
        for tag in tags:
            self.remove(tag)

    @contextmanager
    def use(self, tag: str) -> Iterator[bool]:
        """Holds the read lock; yields whether ``tag`` is (still) installed."""
        with EVAL_KEY_LOCK.read():
            with self._lock:
                present = tag in self._lru
            yield present


class KeyResolver:
    def __init__(
        self,
        codec: MaterialCodec,
        installed: InstalledKeys,
        cache: Cache,
        redis_config: RedisConfig,
        keyservice: keyservice_pb2_grpc.KeyServiceStub,
        deadline_seconds: float,
    ) -> None:
        self.codec = codec
        self.installed = installed
        self.cache = cache
        self.redis_config = redis_config
        self.keyservice = keyservice
        self.deadline = deadline_seconds
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._fetch_locks_guard = threading.Lock()

    def _call(self, method: str, request: object) -> Any:
        try:
            return getattr(self.keyservice, method)(request, timeout=self.deadline)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.NOT_FOUND:
                raise UnknownKeyError(exc.details() or "unknown key") from None
            if code == grpc.StatusCode.FAILED_PRECONDITION:  # the key service's reason, passed on
                reason = known_reason(exc, Reason.KEY_NOT_ENABLED)
                raise FailedPrecondition(exc.details() or "key state forbids its use", reason=reason) from None
            raise Unavailable(f"key service: {code.name}", metadata={"dependency": "keyservice"}) from None

    def status(self, key_id: str) -> KeyStatus:
        """The key's state: Redis (sealed by the key service on every change, believed for at most
        its TTL so an old state cannot be replayed for longer), else the key service."""
        name = Keys.key_state(key_id)
        cached = self.cache.get(name, max_age=self.redis_config.key_state_ttl)
        if cached is not None:
            try:
                status = KeyStatus.from_json(cached)
            except (ValueError, KeyError, TypeError):
                status = None
            if status is not None and status.key_id == key_id:
                return status
            self.cache.reject(name, "sealed but not this key's state")
        record = self._call("GetKey", keyservice_pb2.GetKeyRequest(key_id=key_id))
        return KeyStatus(
            key_id=key_id,
            state=KeyState(keyservice_pb2.KeyState.Name(record.state)),
            current_version=record.key.version,
            min_version=record.min_version,
            material_sha256={v.version: v.material_sha256.hex() for v in record.versions if v.material_sha256},
            owner=record.owner,
        )

    def usable_version(self, ref: common_pb2.KeyRef, status: KeyStatus | None = None) -> tuple[KeyStatus, int]:
        """The key's status and the version to use; ``status`` if this request already read it."""
        check_key_id(ref.key_id, "key.key_id")
        if status is None or status.key_id != ref.key_id:
            status = self.status(ref.key_id)
        if status.state is KeyState.DESTROYED:
            self.installed.remove_key(ref.key_id)
        return status, status.check_usable(ref.version)

    @contextmanager
    def holding(self, key_id: str, checked: tuple[KeyStatus, int], attempts: int = 3) -> Iterator[tuple[str, int]]:
        """The client's rotation keys resolved, installed and held (the read lock) for the block:
        yields their OpenFHE tag and version. They may be evicted between resolve and use, so they
        are resolved again, up to ``attempts`` times, then UNAVAILABLE with reason RETRY."""
        version = checked[1]
        for _ in range(attempts):
            tag, version = self.resolve(common_pb2.KeyRef(key_id=key_id, version=version), checked)
            with self.installed.use(tag) as present:
                if present:
                    yield tag, version
                    return
        raise Unavailable("rotation keys were evicted repeatedly under load; retry", reason=Reason.RETRY)

    def resolve(self, ref: common_pb2.KeyRef, checked: tuple[KeyStatus, int] | None = None) -> tuple[str, int]:
        """The OpenFHE tag holding usable rotation keys for ``ref``, installing them if needed.
        ``checked`` is a (status, version) this request already obtained from ``usable_version``."""
        status, version = checked or self.usable_version(ref)
        tag = keymap.installed_tag(ref.key_id, version)
        if self.installed.touch(tag):
            return tag, version
        lock = self._fetch_lock(tag)
        try:
            with lock:
                if not self.installed.touch(tag):
                    material = self._fetch(ref.key_id, version, status.material_sha256[version])
                    self.installed.install(tag, material.rotation_keys)
        finally:
            with self._fetch_locks_guard:  # only fetches in flight keep a lock: no growth per user
                if self._fetch_locks.get(tag) is lock:
                    del self._fetch_locks[tag]
        return tag, version

    def _fetch_lock(self, tag: str) -> threading.Lock:
        """One fetch per tag at a time: concurrent first requests for a key share one download."""
        with self._fetch_locks_guard:
            return self._fetch_locks.setdefault(tag, threading.Lock())

    def _fetch(self, key_id: str, version: int, expected_sha256: str) -> KeyMaterial:
        cache_key = Keys.eval_keys(key_id, version)
        # Unsealed (11 MB): believed only if it hashes to the digest the sealed key state records.
        blob = self.cache.get(cache_key, sealed=False)
        if blob is not None:
            try:
                material: KeyMaterial | None = KeyMaterial.from_bytes(blob)
            except MaterialError:
                material = None
            if material is not None and material.sha256.hex() == expected_sha256:
                self.installed.stats.fetched_from_cache += 1
                return material
            self.cache.reject(cache_key, "rotation keys that do not match the key state's digest")
        reply = self._call("GetEvalKeys", keyservice_pb2.GetKeyRequest(key_id=key_id, version=version))
        material = KeyMaterial(public_key=reply.public_key, rotation_keys=reply.rotation_key_map)
        if material.sha256.hex() != expected_sha256:
            raise Unavailable(
                f"key service returned material for {key_id[:16]} v{version} that fails its hash",
                metadata={"dependency": "keyservice"},
            )
        self.installed.stats.fetched_from_keyservice += 1
        self.cache.set(cache_key, material.to_bytes(), self.redis_config.eval_keys_ttl, sealed=False)
        return material
