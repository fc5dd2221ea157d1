"""The Redis ciphertext cache: optional, so Redis being down or flushed only costs latency.

Values are opaque bytes (evaluation keys, key states, uploaded profiles, score results). After a
connection error the cache stops asking Redis for a short, growing interval (a circuit breaker),
so requests do not wait on a dead server, and resumes by itself when Redis answers again.

Recommended server settings (multi-MB values, a bounded cache): ``maxmemory 2gb``,
``maxmemory-policy allkeys-lru``, no persistence needed (``save ""``, ``appendonly no``).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cipherfeed.config import RedisConfig

log = logging.getLogger(__name__)


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


class Cache:
    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self.stats = CacheStats()
        self._client: redis.Redis | None = None
        if config.url:
            self._client = redis.Redis.from_url(
                config.url,
                socket_timeout=config.socket_timeout,
                socket_connect_timeout=config.connect_timeout,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=30,
            )
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._backoff = config.min_backoff

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

    def get(self, key: str) -> bytes | None:
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
        else:
            self.stats.hits += 1
        return cast("bytes | None", value)  # the client is made without decode_responses

    def set(self, key: str, value: bytes, ttl_seconds: int) -> bool:
        if len(value) > self.config.max_value_bytes:
            return False
        client = self._usable()
        if client is None:
            return False
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
