"""The write-behind result cache: answers before Redis stores, serves pending entries, stays bounded."""

import threading

from cipherfeed.cache import Cache, WriteBehind
from cipherfeed.config import RedisConfig


def test_pending_entries_are_served_from_memory_then_land_in_redis(redis_server):
    cache = Cache(redis_server.config_for("admin"))
    writes = WriteBehind(cache, max_pending=2)
    gate = threading.Event()
    writes._writer.submit(gate.wait)  # hold the writer so that entries stay pending
    try:
        assert writes.set("cf:test:a", b"A" * 1000, 60)
        assert writes.set("cf:test:b", b"B", 60)
        assert not writes.set("cf:test:c", b"C", 60)  # bounded: the third is dropped, not queued
        assert writes.get("cf:test:a") == b"A" * 1000  # a retry is answered before Redis has it
        direct = redis_server.client()
        assert not direct.exists("cf:test:a")
    finally:
        gate.set()
    writes.flush()
    assert cache.get("cf:test:a") == b"A" * 1000 and cache.get("cf:test:b") == b"B"
    assert direct.get("cf:test:b").endswith(b"B")  # sealed (cipherfeed.cache) around the value
    assert 0 < direct.ttl("cf:test:a") <= 60
    assert writes.get("cf:test:c") is None
    writes.close()
    assert not writes.set("cf:test:d", b"D", 60)  # closed: refused, nothing left pending
    assert writes.get("cf:test:d") is None
    cache.close()


def test_pending_bytes_are_bounded_too(redis_server):
    cache = Cache(redis_server.config_for("admin"))
    writes = WriteBehind(cache, max_pending=8, max_pending_bytes=1000)
    gate = threading.Event()
    writes._writer.submit(gate.wait)
    try:
        assert writes.set("cf:test:big", b"x" * 800, 60)
        assert not writes.set("cf:test:more", b"y" * 300, 60)  # 1,100 bytes would wait: dropped
        assert writes.set("cf:test:small", b"z" * 200, 60)
    finally:
        gate.set()
    writes.flush()
    assert writes.set("cf:test:more", b"y" * 300, 60)  # written ones no longer count
    writes.close()
    cache.close()


def test_a_failed_write_is_dropped_and_forgotten(redis_server):
    cache = Cache(
        RedisConfig(
            url="redis://127.0.0.1:1/0", socket_timeout=0.5, connect_timeout=0.5, mac_key_file=redis_server.mac_key_file
        )
    )
    writes = WriteBehind(cache)
    assert writes.set("cf:test:x", b"X", 60)  # accepted: the response does not wait
    writes.flush()
    assert writes.get("cf:test:x") is None  # the write failed, nothing is held in memory
    assert cache.stats.errors >= 1
    writes.close()
