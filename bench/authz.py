"""What the authorization interceptor costs: ``python -m bench.authz [--items 8192] [--reps 60]``.

One recommender core behind two mutual-TLS servers in the same process: one with the policy
interceptor (as every service runs), one without it. The same device client calls both,
alternating call by call, so both see the same machine: Score round trips (fresh ciphertext each
call, key state from Redis as in production) and a trivial RPC (GetModelInfo), where the
interceptor's share is not hidden by scoring's variance. The difference of the p50s is its cost.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import log, machine, mesh_identities, percentiles, serve_bench_keyservice, timed_ms, write_json
from cipherfeed import tls as mtls
from cipherfeed.client.sdk import RecommenderClient
from cipherfeed.config import ClientConfig, GrpcLimits, MiB, RecommenderConfig, ScoreRateLimit
from cipherfeed.devredis import LocalRedis
from cipherfeed.grpcutil import start_server
from cipherfeed.v1 import recommender_pb2, recommender_pb2_grpc
from services.recommender.server import build_core
from services.recommender.servicer import RecommenderServicer
from services.recommender.synthetic import synthetic_catalogue

LIMITS = GrpcLimits(max_message_bytes=64 * MiB)
TARGET_MS = 1.0  # issue 10: authorization and signature checks add <= 1 ms to a Score's p50
SERVICE = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name


def unchecked_server(servicer: RecommenderServicer, tls: Any) -> tuple[grpc.Server, int]:
    """The same mutual TLS, no policy interceptor: the baseline, never a way to run a service."""
    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=LIMITS.channel_options())
    recommender_pb2_grpc.add_RecommenderServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", mtls.server_credentials(tls))
    server.start()
    return server, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=8192, help="catalogue size (one block: the fastest Score)")
    parser.add_argument("--reps", type=int, default=60, help="Score calls per server")
    parser.add_argument("--cheap-reps", type=int, default=2000, help="GetModelInfo calls per server")
    parser.add_argument("--out", default="authz")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cf-bench-authz-"))
    identity = mesh_identities(work)
    redis_server = LocalRedis.start()
    redis = redis_server.config_for("recommender")
    ks_running, ks_core = serve_bench_keyservice(work, redis_server, identity, LIMITS)
    config = RecommenderConfig(
        listen="127.0.0.1:0",
        keyservice_target=f"127.0.0.1:{ks_running.port}",
        state_dir=work,
        limits=LIMITS,
        redis=redis,
        tls=identity("recommender"),
        score_rate=ScoreRateLimit(per_second=1e6, burst=10**6),  # measures speed, not the per-owner limit
    )
    core = build_core(config, synthetic_catalogue(args.items, seed=1))
    servicer = RecommenderServicer(core)
    checked = start_server(
        lambda s: recommender_pb2_grpc.add_RecommenderServicer_to_server(servicer, s),
        [SERVICE],
        "127.0.0.1:0",
        LIMITS,
        4,
        config.tls,
    )
    baseline, baseline_port = unchecked_server(servicer, config.tls)
    clients = {
        name: RecommenderClient(
            ClientConfig(
                target=f"127.0.0.1:{port}",
                keyservice_target=f"127.0.0.1:{ks_running.port}",
                deadline_seconds=120,
                home=work / "client",
                limits=LIMITS,
                tls=identity("device"),
            )
        )
        for name, port in (("on", checked.port), ("off", baseline_port))
    }
    results: dict[str, Any] = {"items": args.items}
    try:
        on, off = clients["on"], clients["off"]
        on.use_keys()
        on.register()
        off.keys, off.key_id, off.key_version, off.account = on.keys, on.key_id, on.key_version, on.account
        u = np.eye(64)[3]
        for c in (on, off):
            c.score(u)  # warm: key set installed, channels connected
        log(f"== Score round trips, {args.reps} per server, alternating")
        score_ms: dict[str, list[float]] = {"on": [], "off": []}
        for i in range(args.reps):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for name in order:
                core.results.flush()  # the previous answer's result-cache write is not in this sample
                score_ms[name].append(timed_ms(clients[name].score, u)[1])
        log(f"== GetModelInfo, {args.cheap_reps} per server, alternating")
        cheap_ms: dict[str, list[float]] = {"on": [], "off": []}
        request = recommender_pb2.GetModelInfoRequest()
        for i in range(args.cheap_reps):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for name in order:
                cheap_ms[name].append(timed_ms(lambda c=clients[name]: c.stub.GetModelInfo(request, timeout=10))[1])
        for label, samples in (("score", score_ms), ("get_model_info", cheap_ms)):
            results[label] = {name: percentiles(samples[name]) for name in ("on", "off")}
            results[label]["p50_added_ms"] = results[label]["on"]["p50_ms"] - results[label]["off"]["p50_ms"]
    finally:
        for c in clients.values():
            c.close()
        checked.stop(grace=1)
        baseline.stop(grace=1).wait()
        core.close()
        ks_running.stop(grace=1)
        ks_core.close()
        redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'call':<16} {'p50 on ms':>10} {'p50 off ms':>11} {'added ms':>9} {'p95 on':>8} {'p95 off':>8}")
    for label in ("score", "get_model_info"):
        r = results[label]
        print(
            f"{label:<16} {r['on']['p50_ms']:>10.3f} {r['off']['p50_ms']:>11.3f} {r['p50_added_ms']:>9.3f} "
            f"{r['on']['p95_ms']:>8.3f} {r['off']['p95_ms']:>8.3f}"
        )
    path = write_json(args.out, {"machine": machine(), "target_ms": TARGET_MS, **results})
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
