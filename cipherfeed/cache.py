"""The Redis ciphertext cache: optional, so Redis being down or flushed only costs latency.

Values are opaque bytes (evaluation keys, key states, uploaded profiles, score results). After a
connection error the cache stops asking Redis for a short, growing interval (a circuit breaker),
so requests do not wait on a dead server, and resumes by itself when Redis answers again.

Redis is not trusted with what it holds. Each service connects as its own ACL user (password from
a file, TLS with ``rediss://``), and every value is sealed: ``SEAL_MAGIC || HMAC-SHA256(mac key,
label || Redis key || issued ms || value) || issued ms || value``. The MAC binds the value to the
key name it was written under and to when it was written, so a value planted by anyone without
the MAC key, moved from another key, or (for readers that bound the age) replayed from long ago,
reads as a miss: it is counted (``CacheStats.rejected``), logged at most every 10 s, and the caller
goes to the source of truth. Only rotation-key sets are stored unsealed: they are 11 MB, and the
reader checks them against the SHA-256 the (sealed) key state records.

Recommended server settings (multi-MB values, a bounded cache): ``maxmemory 2gb``,
``maxmemory-policy allkeys-lru``, no persistence needed (``save ""``, ``appendonly no``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cipherfeed.config import ConfigError, RedisConfig

log = logging.getLogger(__name__)
SEAL_MAGIC = b"cfs1"
_SEAL_LABEL = b"cipherfeed.cache.v1\x00"
_SEAL_HEADER = len(SEAL_MAGIC) + 32 + 8
MIN_MAC_KEY_BYTES = 32
FUTURE_SKEW_SECONDS = 30.0  # a value "issued" further ahead than this was not written by a peer


def read_secret_file(path: Path, what: str, minimum: int = 1) -> bytes:
    """A secret from a file that only its owner may read (the cache's MAC key, a password)."""
    try:
        mode = path.stat().st_mode & 0o777
        data = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(f"the {what} file {path} is readable by others (mode {mode:o}); chmod 600 it")
    if len(data) < minimum:
        raise ConfigError(f"the {what} file {path} holds {len(data)} bytes; at least {minimum} are needed")
    return data


class Sealer:
    """HMAC-SHA256 seals for cache values (see the module docstring)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_MAC_KEY_BYTES:
            raise ConfigError(f"the cache MAC key is {len(key)} bytes; at least {MIN_MAC_KEY_BYTES} are needed")
        self._key = key

    def _tag(self, name: str, issued: bytes, value: bytes) -> bytes:
        mac = hmac.new(self._key, _SEAL_LABEL, hashlib.sha256)
        mac.update(name.encode())
        mac.update(b"\x00")
        mac.update(issued)
        mac.update(value)
        return mac.digest()

    def seal(self, name: str, value: bytes, now: float | None = None) -> bytes:
        issued = struct.pack(">Q", int(1000 * (time.time() if now is None else now)))
        return SEAL_MAGIC + self._tag(name, issued, value) + issued + value

    def open(self, name: str, blob: bytes, max_age: float | None = None) -> bytes | None:
        """The value, or None if ``blob`` is not a seal of it under ``name`` (or is too old)."""
        if len(blob) < _SEAL_HEADER or not blob.startswith(SEAL_MAGIC):
            return None
        tag, issued = blob[4:36], blob[36:44]
        value = memoryview(blob)[_SEAL_HEADER:]
        if not hmac.compare_digest(tag, self._tag(name, issued, value)):
            return None
        age = time.time() - struct.unpack(">Q", issued)[0] / 1000
        if age < -FUTURE_SKEW_SECONDS or (max_age is not None and age > max_age):
            return None
        return bytes(value)


def _is_loopback(url: str) -> bool:
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Keys:
    """Redis key names, all under one prefix."""

    prefix = "cf:"

    @classmethod
    def eval_keys(cls, key_id: str, version: int) -> str:
        return f"{cls.prefix}evalkeys:{key_id}:{version}"

    @classmethod
    def key_state(cls, key_id: str) -> str:
        return f"{cls.prefix}keystate:{key_id}"

    @classmethod
    def profile(cls, ref: str) -> str:
        return f"{cls.prefix}profile:{ref}"

    @classmethod
    def history(cls, ref: str) -> str:
        """A history profile's uploaded ciphertexts (its E(u) is under ``profile``)."""
        return f"{cls.prefix}history:{ref}"

    @classmethod
    def result(cls, model_version: str, key_id: str, version: int, query_sha256: str) -> str:
        return f"{cls.prefix}result:{model_version}:{key_id}:{version}:{query_sha256}"


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    errors: int = 0
    skipped_while_down: int = 0
    rejected: int = 0  # values that were not sealed by a holder of the MAC key (or too old)


class Cache:
    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self.stats = CacheStats()
        self._client: redis.Redis | None = None
        self._sealer: Sealer | None = None
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._backoff = config.min_backoff
        self._rejected_logged_at = 0.0
        self._rejected_unlogged = 0
        if config.url:
            if config.mac_key_file is None:
                raise ConfigError(
                    "a Redis cache needs CIPHERFEED_REDIS_MAC_KEY_FILE: values read back from Redis are "
                    "believed only when sealed with the key service's and recommenders' shared key"
                )
            self._sealer = Sealer(read_secret_file(config.mac_key_file, "cache MAC key", MIN_MAC_KEY_BYTES))
            auth: dict[str, object] = {}
            if config.username:
                auth["username"] = config.username
            if config.password_file is not None:
                auth["password"] = read_secret_file(config.password_file, "Redis password").decode()
            if config.url.startswith("rediss://"):
                auth["ssl_cert_reqs"] = "required"
                if config.tls_ca_file is not None:
                    auth["ssl_ca_certs"] = str(config.tls_ca_file)
            elif not _is_loopback(config.url):
                log.warning("Redis at a non-loopback address without TLS: use a rediss:// URL in production")
            self._client = redis.Redis.from_url(
                config.url,
                socket_timeout=config.socket_timeout,
                socket_connect_timeout=config.connect_timeout,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=30,
                **auth,
            )

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def _usable(self) -> redis.Redis | None:
        if self._client is None:
            return None
        with self._lock:
            if time.monotonic() < self._down_until:
                self.stats.skipped_while_down += 1
                return None
        return self._client

    def _failed(self, op: str, exc: Exception) -> None:
        with self._lock:
            self.stats.errors += 1
            self._down_until = time.monotonic() + self._backoff
            log.warning("redis %s failed (%s); bypassing the cache for %.1f s", op, type(exc).__name__, self._backoff)
            self._backoff = min(self._backoff * 2, self.config.max_backoff)

    def _succeeded(self) -> None:
        with self._lock:
            if self._backoff != self.config.min_backoff:
                log.info("redis is answering again; caching resumed")
            self._backoff = self.config.min_backoff

    def retry_now(self) -> None:
        """Ends the current bypass interval: the next call asks Redis again."""
        with self._lock:
            self._down_until = 0.0

    def reject(self, key: str, why: str) -> None:
        """Counts a value read from Redis that is not believed; logs at most every 10 s."""
        now = time.monotonic()
        with self._lock:
            self.stats.rejected += 1
            self._rejected_unlogged += 1
            if now - self._rejected_logged_at < 10.0:
                return
            count, self._rejected_unlogged, self._rejected_logged_at = self._rejected_unlogged, 0, now
        log.warning("ignored %d value(s) from Redis not written by the mesh (latest: %s, %s)", count, key[:80], why)

    def get(self, key: str, sealed: bool = True, max_age: float | None = None) -> bytes | None:
        """The value under ``key``; with ``sealed`` only if its seal verifies (and it is at most
        ``max_age`` seconds old), else None as for a miss."""
        client = self._usable()
        if client is None:
            return None
        try:
            value = client.get(key)
        except redis.RedisError as exc:
            self._failed("GET", exc)
            return None
        self._succeeded()
        if value is None:
            self.stats.misses += 1
            return None
        value = cast(bytes, value)  # the client is made without decode_responses
        if sealed:
            assert self._sealer is not None
            opened = self._sealer.open(key, value, max_age)
            if opened is None:
                self.reject(key, "seal missing, wrong or expired")
                self.stats.misses += 1
                return None
            value = opened
        self.stats.hits += 1
        return value

    def set(self, key: str, value: bytes, ttl_seconds: int, sealed: bool = True) -> bool:
        if len(value) > self.config.max_value_bytes:
            return False
        client = self._usable()
        if client is None:
            return False
        if sealed:
            assert self._sealer is not None
            value = self._sealer.seal(key, value)
        try:
            client.set(key, value, ex=ttl_seconds)
        except redis.RedisError as exc:
            self._failed("SET", exc)
            return False
        self._succeeded()
        return True

    def delete(self, *keys: str) -> bool:
        client = self._usable()
        if client is None or not keys:
            return False
        try:
            client.delete(*keys)
        except redis.RedisError as exc:
            self._failed("DEL", exc)
            return False
        self._succeeded()
        return True

    def delete_prefix(self, prefix: str) -> bool:
        """Deletes every key under ``prefix`` (SCAN, not KEYS, so Redis is never blocked)."""
        client = self._usable()
        if client is None:
            return False
        try:
            batch = []
            for key in client.scan_iter(match=prefix + "*", count=500):
                batch.append(key)
                if len(batch) >= 500:
                    client.delete(*batch)
                    batch.clear()
            if batch:
                client.delete(*batch)
        except redis.RedisError as exc:
            self._failed("SCAN/DEL", exc)
            return False
        self._succeeded()
        return True

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class WriteBehind:
    """Cache writes on one background thread, so a response never waits for Redis to store it.

    Until an entry is written it is served from memory, so a retry reaching this process is still
    answered without recomputation. At most ``max_pending`` entries and ``max_pending_bytes`` wait;
    beyond that a write is dropped (the cache is optional), so a slow Redis cannot grow this
    process's memory (a 1M-item result is ~15 MB).
    """

    def __init__(self, cache: Cache, max_pending: int = 8, max_pending_bytes: int = 64 << 20) -> None:
        self._cache = cache
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self._pending_bytes = 0
        self._pending: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-write")

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._pending.get(key)
        return value if value is not None else self._cache.get(key)

    def set(self, key: str, value: bytes, ttl_seconds: int) -> bool:
        """Queues a write; False if it was dropped (already pending, too many entries or bytes
        pending, or closed)."""
        with self._lock:
            full = len(self._pending) >= self._max_pending
            if full or key in self._pending or self._pending_bytes + len(value) > self._max_pending_bytes:
                return False
            self._pending[key] = value
            self._pending_bytes += len(value)
        try:
            self._writer.submit(self._write, key, value, ttl_seconds)
        except RuntimeError:  # shut down
            self._forget(key)
            return False
        return True

    def _forget(self, key: str) -> None:
        with self._lock:
            value = self._pending.pop(key, None)
            if value is not None:
                self._pending_bytes -= len(value)

    def _write(self, key: str, value: bytes, ttl_seconds: int) -> None:
        try:
            self._cache.set(key, value, ttl_seconds)
        finally:
            self._forget(key)

    def flush(self) -> None:
        """Returns once every write queued before the call has been attempted."""
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
