"""Key and cache benchmark: ``python -m bench.keys [--users 1000]``.

* rotation-key fetch for the mesh's key set: cold (key service over gRPC), from Redis, and an
  in-process hit, each up to "installed in OpenFHE and usable";
* Score by ``profile_ref`` against an inline query ciphertext: bytes on the wire and server time;
* recommender RSS while ``--users`` distinct keys cycle through a 50-key in-process cache.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from eth_account import Account

from bench.common import log, machine, mesh_identities, percentiles, timed_ms, write_json
from cipherfeed import heap, ownerauth
from cipherfeed.cache import Keys
from cipherfeed.client import keystore
from cipherfeed.client.sdk import RecommenderClient
from cipherfeed.config import ClientConfig, GrpcLimits, MiB, RecommenderConfig, ScoreRateLimit
from cipherfeed.devprocess import start_service
from cipherfeed.devredis import LocalRedis, free_port
from cipherfeed.he.params import MESH_PARAMS
from cipherfeed.v1 import common_pb2, keyservice_pb2, recommender_pb2
from services.recommender.server import serve as serve_recommender
from services.recommender.synthetic import synthetic_catalogue

LIMITS = GrpcLimits(max_message_bytes=128 * MiB, max_query_bytes=2 * MiB)
TARGETS = {
    "redis_fetch_ms": 10.0,
    "in_process_hit_ms": 0.1,
    "warm_request_overhead_bytes": 2048,
    "rss_drift": 0.05,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1000, help="distinct keys cycled through the cache")
    parser.add_argument("--cache-size", type=int, default=50, help="in-process key sets")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default="keys")
    args = parser.parse_args(argv)
    heap.limit_arenas(1)  # as the recommender's own process does at start (cipherfeed.heap)
    work = Path(tempfile.mkdtemp(prefix="cf-bench-keys-"))
    redis_server = LocalRedis.start()
    redis_config = redis_server.config_for("recommender")
    # The key service runs in its own process, so the RSS measured here is the recommender's
    # (plus a thin client), not the key service's 11 MB SQLite writes per registration.
    ks_port = free_port()
    identity = mesh_identities(work)
    ks_proc = start_service(
        "services.keyservice.server",
        {
            "CIPHERFEED_KEYSERVICE_LISTEN": f"127.0.0.1:{ks_port}",
            "CIPHERFEED_KEYSERVICE_DSN": f"sqlite:///{work / 'ks.db'}",
            "CIPHERFEED_STATE_DIR": str(work),
            **redis_server.env_for("keyservice"),
            "CIPHERFEED_GRPC_MAX_MESSAGE_BYTES": str(LIMITS.max_message_bytes),
            **identity("keyservice").to_env(),
        },
        log_path=work / "keyservice.log",
    )
    model = synthetic_catalogue(8192, seed=1)  # one block: Score cost is mostly the key path
    rec_config = RecommenderConfig(
        listen="127.0.0.1:0",
        max_registered_keys=args.cache_size,
        max_registered_key_bytes=100 * 1024 * MiB,
        keyservice_target=f"127.0.0.1:{ks_port}",
        state_dir=work,
        limits=LIMITS,
        redis=redis_config,
        tls=identity("recommender"),
        score_rate=ScoreRateLimit(per_second=1e6, burst=10**6),  # measures speed, not the per-owner limit
    )
    rec_running, core = serve_recommender(rec_config, model)
    results: dict[str, Any] = {}
    try:
        client = RecommenderClient(
            ClientConfig(
                target=f"127.0.0.1:{rec_running.port}",
                keyservice_target=f"127.0.0.1:{ks_port}",
                deadline_seconds=120,
                home=work / "client",
                limits=LIMITS,
                tls=identity("device"),
            )
        )
        client.use_keys()
        key_id, keys = client.register(), client.keys
        assert keys is not None
        ref = common_pb2.KeyRef(key_id=key_id, version=client.key_version)
        tag = f"{client.key_id}:{client.key_version}"
        resolver = core.keys

        log("== rotation-key fetch (mesh key set)")
        cold: list[float] = []
        from_redis: list[float] = []
        hit: list[float] = []
        redis_get: list[float] = []
        admin = redis_server.client()  # the recommender's own Redis user may not delete
        for _ in range(args.reps):
            core.installed.remove(tag)
            admin.delete(Keys.eval_keys(key_id, client.key_version))
            cold.append(timed_ms(resolver.resolve, ref)[1])
            core.installed.remove(tag)
            from_redis.append(timed_ms(resolver.resolve, ref)[1])
            get_unsealed = functools.partial(core.cache.get, sealed=False)  # key sets are digest-checked
            redis_get.append(timed_ms(get_unsealed, Keys.eval_keys(key_id, client.key_version))[1])
            hit.extend(timed_ms(resolver.installed.touch, tag)[1] for _ in range(100))
        admin.close()
        results["eval_key_fetch"] = {
            "key_set_bytes": len(keys.rotation_key_bytes) + len(keys.public_key_bytes),
            "cold_keyservice": percentiles(cold),
            "redis_get_only": percentiles(redis_get),
            "redis_to_installed": percentiles(from_redis),
            "in_process_hit": percentiles(hit),
        }

        log("== Score by profile_ref vs inline ciphertext")
        u = np.ones(64) / 8
        query = client.encrypt_query(u)
        inline_req = recommender_pb2.ScoreRequest(key=ref, query_ciphertext=query)
        profile = client.upload_profile(u)
        profile_req = recommender_pb2.ScoreRequest(key=ref, profile_ref=profile)
        inline_ms = [timed_ms(client.score, u)[1] for _ in range(args.reps)]  # fresh ciphertext: computed
        profile_first, profile_repeat = [], []
        for _ in range(args.reps):
            client.upload_profile(u)  # a new ciphertext, so its first score is computed
            profile_first.append(timed_ms(client.score, u, "", True)[1])
            profile_repeat.append(timed_ms(client.score, u, "", True)[1])  # same reference: result cache
        results["requests"] = {
            "inline_request_bytes": inline_req.ByteSize(),
            "inline_overhead_bytes": inline_req.ByteSize() - len(query),
            "profile_request_bytes": profile_req.ByteSize(),
            "bytes_saved_per_request": inline_req.ByteSize() - profile_req.ByteSize(),
            "inline_round_trip": percentiles(inline_ms),
            "profile_first_round_trip": percentiles(profile_first),
            "profile_repeat_round_trip": percentiles(profile_repeat),
        }

        log(f"== {args.users} distinct keys through a {args.cache_size}-key cache")
        shared = keystore.generate(MESH_PARAMS)
        process = psutil.Process()
        rss: list[tuple[int, int]] = []  # (users so far, RSS bytes)
        started = time.perf_counter()
        user_ids: list[tuple[str, Any]] = []  # (key id, owner account)
        for i in range(args.users):
            user = RecommenderClient(client.config)
            user.keys, user.account = keystore.load_test_keys(shared), Account.create()
            user_ids.append((user.register(), user.account))
            user.score(u)
            # Keys evicted long ago (two cache sizes back) are destroyed, so the key service's
            # store stays ~100 key sets (1.1 GB) instead of growing by 11 MB per user.
            if i >= 2 * args.cache_size:
                stale_id, stale_owner = user_ids[i - 2 * args.cache_size]
                stale = keyservice_pb2.KeyStateRequest(key_id=stale_id)
                method = "cipherfeed.v1.KeyService/DestroyKey"
                ownerauth.sign_request(stale_owner, user.config.chain_id, method, stale_id, stale)
                user.keyservice.DestroyKey(stale, timeout=30)
            user.close()
            if i == args.cache_size or i == args.users - 1 or (i + 1) % 100 == 0:
                rss.append((i + 1, process.memory_info().rss))
                log(f"   {i + 1} users, RSS {rss[-1][1] / MiB:.0f} MiB, {core.installed.count} key sets held")
        warm, final = rss[0][1], rss[-1][1]
        # After one full eviction cycle (twice the cache size) the allocator has reached its steady state.
        cycled = next((r for n, r in rss if n >= 2 * args.cache_size), warm)
        results["memory"] = {
            "users": args.users,
            "cache_size": args.cache_size,
            "rss_after_cache_full_mib": warm / MiB,
            "rss_at_end_mib": final / MiB,
            "drift": (final - warm) / warm,
            "rss_after_one_eviction_cycle_mib": cycled / MiB,
            "drift_after_one_eviction_cycle": (final - cycled) / cycled,
            "series_mib": [(n, r / MiB) for n, r in rss],
            "evictions": core.installed.stats.evictions,
            "seconds": time.perf_counter() - started,
        }
        client.close()
    finally:
        rec_running.stop(grace=1)
        core.close()
        ks_proc.terminate()
        ks_proc.wait(timeout=20)
        redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)

    f, r, m = results["eval_key_fetch"], results["requests"], results["memory"]
    print(f"{'measure':<46} {'p50':>10} {'p95':>10}")
    for name, key in (
        ("eval keys: cold from key service -> installed", "cold_keyservice"),
        ("eval keys: Redis GET only", "redis_get_only"),
        ("eval keys: Redis -> installed", "redis_to_installed"),
        ("eval keys: in-process hit", "in_process_hit"),
    ):
        print(f"{name:<46} {f[key]['p50_ms']:>8.3f}ms {f[key]['p95_ms']:>8.3f}ms")
    for name, key in (
        ("Score round trip, inline query", "inline_round_trip"),
        ("Score round trip, profile_ref, first", "profile_first_round_trip"),
        ("Score round trip, profile_ref, repeated", "profile_repeat_round_trip"),
    ):
        print(f"{name:<46} {r[key]['p50_ms']:>8.1f}ms {r[key]['p95_ms']:>8.1f}ms")
    print(
        f"key set {f['key_set_bytes'] / 1e6:.1f} MB; request inline {r['inline_request_bytes']} B "
        f"(overhead {r['inline_overhead_bytes']} B), by reference {r['profile_request_bytes']} B"
    )
    print(
        f"RSS {m['rss_after_cache_full_mib']:.0f} -> {m['rss_at_end_mib']:.0f} MiB over {m['users']} users "
        f"({100 * m['drift']:+.1f}%; {100 * m['drift_after_one_eviction_cycle']:+.1f}% after one eviction cycle), "
        f"{m['evictions']} evictions"
    )
    path = write_json(args.out, {"machine": machine(), "targets": TARGETS, **results})
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
