"""What the HTTP gateway adds to a Score: ``python -m bench.gateway [--items 26558] [--reps 60]``.

One recommender (synthetic catalogue, no result cache: every call is scored) and its key service
over mutual TLS; a gateway process in front of them (``cipherfeed serve gateway``, its own mesh
identity). The same request, one encrypted query with the owner's session token, is sent three
ways, alternating call by call so all three see the same machine:

* direct: the gRPC stub, as the SDK calls it;
* binary: ``POST /v1/score`` with an ``application/x-protobuf`` body and answer;
* JSON: the same request as proto3 JSON (ciphertext in base64) and the answer as JSON.

Each sample is the client's round trip including decoding the answer into a ``ScoreResponse``
(protobuf parse, or JSON parse and base64 decoding), since that is what a client of each path
pays. Targets (issue 12): binary p50 <= 1.15x direct, JSON p50 <= 1.5x direct.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from google.protobuf import json_format

from bench.common import log, machine, mesh_identities, timed_ms, write_json
from cipherfeed.client.sdk import RecommenderClient
from cipherfeed.config import (
    ClientConfig,
    GatewayConfig,
    GrpcLimits,
    KeyServiceConfig,
    MiB,
    RecommenderConfig,
    ScoreRateLimit,
)
from cipherfeed.devprocess import start_service
from cipherfeed.grpcutil import start_server
from cipherfeed.v1 import common_pb2, recommender_pb2, recommender_pb2_grpc
from services.keyservice.server import serve as serve_keyservice
from services.recommender.server import build_core
from services.recommender.servicer import RecommenderServicer
from services.recommender.synthetic import synthetic_catalogue

LIMITS = GrpcLimits(max_message_bytes=64 * MiB)
TARGETS = {"binary": 1.15, "json": 1.5}  # p50 over direct gRPC's p50
SERVICE = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
PROTOBUF = "application/x-protobuf"


def start_gateway(config: GatewayConfig) -> tuple[subprocess.Popen[bytes], int]:
    proc = start_service("gateway", config.to_env())
    for conn in psutil.Process(proc.pid).net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN:
            return proc, int(conn.laddr.port)
    proc.kill()
    raise RuntimeError("the gateway listens on no port")


def percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "n": len(samples),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=26558, help="catalogue size (the TikTok catalogue's)")
    parser.add_argument("--reps", type=int, default=60, help="Score calls per path")
    parser.add_argument("--out", default="gateway")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cf-bench-gateway-"))
    identity = mesh_identities(work)
    load_before = os.getloadavg()
    ks_running, ks_core = serve_keyservice(
        KeyServiceConfig(
            listen="127.0.0.1:0",
            dsn=f"sqlite:///{work / 'ks.db'}",
            state_dir=work,
            limits=LIMITS,
            tls=identity("keyservice"),
        )
    )
    config = RecommenderConfig(
        listen="127.0.0.1:0",
        keyservice_target=f"127.0.0.1:{ks_running.port}",
        state_dir=work,
        limits=LIMITS,
        tls=identity("recommender"),
        score_rate=ScoreRateLimit(per_second=1e6, burst=10**6),  # measures speed, not the per-owner limit
    )
    core = build_core(config, synthetic_catalogue(args.items, seed=1))
    servicer = RecommenderServicer(core)
    recommender = start_server(
        lambda s: recommender_pb2_grpc.add_RecommenderServicer_to_server(servicer, s),
        [SERVICE],
        "127.0.0.1:0",
        LIMITS,
        4,
        config.tls,
    )
    gateway, gateway_port = start_gateway(
        GatewayConfig(
            port=0,
            recommender_target=f"127.0.0.1:{recommender.port}",
            keyservice_target=f"127.0.0.1:{ks_running.port}",
            ledger_target="127.0.0.1:1",  # no ledger: Score does not need one
            limits=LIMITS,
            tls=identity("gateway"),
        )
    )
    client = RecommenderClient(
        ClientConfig(
            target=f"127.0.0.1:{recommender.port}",
            keyservice_target=f"127.0.0.1:{ks_running.port}",
            deadline_seconds=120,
            home=work / "client",
            limits=LIMITS,
            tls=identity("device"),
        )
    )
    http = httpx.Client(base_url=f"http://127.0.0.1:{gateway_port}", timeout=120)
    results: dict[str, Any] = {"items": args.items, "reps": args.reps}
    try:
        client.use_keys()
        key_id = client.register()
        token = client.sign_in()
        u = np.zeros(client.params().embedding_dim)
        u[3] = 1.0
        request = recommender_pb2.ScoreRequest(
            key=common_pb2.KeyRef(key_id=key_id, version=client.key_version),
            query_ciphertext=client.encrypt_query(u),
        )
        request.auth.session_token = token
        binary_body = request.SerializeToString()
        json_body = json.dumps(
            {
                "key": {"keyId": key_id, "version": client.key_version},
                "queryCiphertext": base64.b64encode(request.query_ciphertext).decode(),
                "auth": {"sessionToken": token},
            }
        ).encode()

        def direct() -> recommender_pb2.ScoreResponse:
            response: recommender_pb2.ScoreResponse = client.stub.Score(request, timeout=120)
            return response

        def binary() -> recommender_pb2.ScoreResponse:
            r = http.post("/v1/score", content=binary_body, headers={"Content-Type": PROTOBUF, "Accept": PROTOBUF})
            r.raise_for_status()
            return recommender_pb2.ScoreResponse.FromString(r.content)

        def as_json() -> recommender_pb2.ScoreResponse:
            r = http.post("/v1/score", content=json_body, headers={"Content-Type": "application/json"})
            r.raise_for_status()
            return json_format.Parse(r.text, recommender_pb2.ScoreResponse())

        paths = {"direct": direct, "binary": binary, "json": as_json}
        answers = {name: fn() for name, fn in paths.items()}  # warm: key set installed, channels connected
        for answer in answers.values():
            answer.ClearField("server_millis")
        assert answers["direct"] == answers["binary"] == answers["json"], "the three paths disagree"
        sizes = {
            "request_bytes": {"binary": len(binary_body), "json": len(json_body)},
            "response_bytes": {
                "binary": answers["direct"].ByteSize(),
                "json": len(json_format.MessageToJson(answers["direct"], indent=None)),
            },
        }
        log(f"== Score round trips, {args.reps} per path, alternating ({args.items} items)")
        samples: dict[str, list[float]] = {name: [] for name in paths}
        server_ms: dict[str, list[float]] = {name: [] for name in paths}
        names = list(paths)
        for i in range(args.reps):
            for name in names[i % 3 :] + names[: i % 3]:
                answer, ms = timed_ms(paths[name])
                samples[name].append(ms)
                server_ms[name].append(answer.server_millis)
        for name in names:
            results[name] = percentiles(samples[name])
            results[name]["server_p50_ms"] = float(np.percentile(server_ms[name], 50))
        base = results["direct"]["p50_ms"]
        for name in ("binary", "json"):
            results[name]["p50_ratio"] = results[name]["p50_ms"] / base
            results[name]["p50_added_ms"] = results[name]["p50_ms"] - base
            results[name]["target_ratio"] = TARGETS[name]
            results[name]["met"] = results[name]["p50_ratio"] <= TARGETS[name]
        results["sizes"] = sizes
    finally:
        http.close()
        client.close()
        gateway.terminate()
        gateway.wait(timeout=30)
        recommender.stop(grace=1)
        core.close()
        ks_running.stop(grace=1)
        ks_core.close()
        shutil.rmtree(work, ignore_errors=True)
    results["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    print(f"{'path':<8} {'p50 ms':>9} {'p99 ms':>9} {'x direct':>9} {'target':>7} {'server p50':>11}")
    for name in ("direct", "binary", "json"):
        r = results[name]
        ratio = f"{r['p50_ratio']:.3f}" if "p50_ratio" in r else "1"
        target = f"{TARGETS[name]:.2f}" if name in TARGETS else "-"
        print(f"{name:<8} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} {ratio:>9} {target:>7} {r['server_p50_ms']:>11.2f}")
    load = results["load_average"]
    print(f"load average (1, 5, 15 min): before {load['before']}, after {load['after']} on {os.cpu_count()} cores")
    path = write_json(args.out, {"machine": machine(), **results})
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
