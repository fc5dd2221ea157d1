"""Load benchmark (issue 13): N concurrent devices scoring by profile for T seconds against the
mesh run as separate processes on loopback, with 1, 2 and 3 recommender shards, directly (gRPC)
and through the HTTP gateway (``application/x-protobuf`` bodies, the same session token).

Each device has its own key and owner account (signed in: session tokens), and each Score is of a
fresh profile (``UploadProfile`` of a new encrypted interest vector, then ``Score`` by reference),
so no answer comes from the result cache. Devices do not decrypt during the run (their CPU would
be taken from the services on the same cores); every response's digest is checked, and after
the run one answer per device is decrypted and compared with plaintext scoring.

Reported per configuration: Scores/s over the window, Score latency p50/p99 (client side, the
profile upload apart), errors by status, the load average before and after, and the resident
memory of every service process at three points: at the start (before this window's first
Score), after the warm-up and at the end, with the growth from each of the first two to the end.
The warm-up is one Score per device alone (keys fetched and installed), three timed ones alone,
then ``--warmup-rounds`` Scores per device all at once, so that the heap has met the window's
concurrency; growth after it is the sustained growth the target is about, growth from the start
adds what the first Scores fill (installed key sets, a concurrent request's working set). RSS is
also sampled every ``--rss-every`` seconds during the window, and Redis's (one server for every
configuration: a cache filling by design up to its ``maxmemory``) is reported beside the services.

    python -m bench.load [--items 100000] [--clients 8] [--seconds 60] [--shards 1,2,3] [--paths direct,gateway]
                         [--warmup-rounds 3] [--rss-every 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np

from bench.common import log, machine, mesh_identities, write_json
from cipherfeed.client.sdk import RECOMMENDER, RecommenderClient
from cipherfeed.config import ClientConfig, GrpcLimits
from cipherfeed.devprocess import start_service
from cipherfeed.devredis import LocalRedis, free_port
from cipherfeed.he.codec import ciphertext_sha256
from cipherfeed.he.packing import plaintext_scores
from cipherfeed.v1 import recommender_pb2
from services.recommender.synthetic import synthetic_catalogue

LIMITS = GrpcLimits()
PROTOBUF_HEADERS = {"Content-Type": "application/x-protobuf", "Accept": "application/x-protobuf"}


class HttpError(Exception):
    """The gateway answered with a status other than 200."""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat utime, stime): on a shared
    machine the CPU a Score costs is steadier than the Scores a second."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    port: int


@dataclass
class Mesh:
    work: Path
    identity: Any
    redis: LocalRedis
    services: list[Service] = field(default_factory=list)

    def start(self, name: str, module: str, identity: str, port: int, env: dict[str, str]) -> Service:
        state = self.work / name
        state.mkdir(parents=True, exist_ok=True)
        full = {
            **self.identity(identity).to_env(),
            "CIPHERFEED_STATE_DIR": str(state),
            "CIPHERFEED_SCORE_RATE_PER_SECOND": "10000",  # speed, not the per-owner limit, is measured
            "CIPHERFEED_SCORE_BURST": "10000",
            **env,
        }
        proc = start_service(module, full, log_path=self.work / f"{name}.log")
        service = Service(name, proc, port)
        self.services.append(service)
        return service

    def stop(self) -> None:
        for s in reversed(self.services):
            s.proc.terminate()
        for s in reversed(self.services):
            try:
                s.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()
        self.services.clear()


def start_mesh(mesh: Mesh, model_path: Path, shards: int) -> int:
    """Key service, ledger, shards and the coordinator (or one recommender); the client port."""
    ks_port = free_port()
    ks = {"CIPHERFEED_KEYSERVICE_LISTEN": f"127.0.0.1:{ks_port}", **mesh.redis.env_for("keyservice")}
    mesh.start("keyservice", "services.keyservice.server", "keyservice", ks_port, ks)
    ks_target = f"127.0.0.1:{ks_port}"
    ledger_port = free_port()
    mesh.start(
        "ledger",
        "services.ledger.server",
        "ledger",
        ledger_port,
        {"CIPHERFEED_LEDGER_LISTEN": f"127.0.0.1:{ledger_port}", "CIPHERFEED_KEYSERVICE_TARGET": ks_target},
    )
    common = {
        "CIPHERFEED_MODEL_PATH": str(model_path),
        "CIPHERFEED_KEYSERVICE_TARGET": ks_target,
        **mesh.redis.env_for("recommender"),
    }
    targets = []
    if shards > 1:
        for i in range(shards):
            port = free_port()
            env = {**common, "CIPHERFEED_RECOMMENDER_LISTEN": f"127.0.0.1:{port}"}
            env |= {"CIPHERFEED_SHARD_INDEX": str(i), "CIPHERFEED_SHARD_COUNT": str(shards)}
            mesh.start(f"shard-{i}", "services.recommender.server", "recommender", port, env)
            targets.append(f"127.0.0.1:{port}")
    port = free_port()
    env = {**common, "CIPHERFEED_RECOMMENDER_LISTEN": f"127.0.0.1:{port}"}
    env["CIPHERFEED_LEDGER_TARGET"] = f"127.0.0.1:{ledger_port}"
    if targets:
        env["CIPHERFEED_SHARD_TARGETS"] = ",".join(targets)
    name = "coordinator" if targets else "recommender"
    mesh.start(name, "services.recommender.server", "recommender", port, env)
    return port


@dataclass
class Device:
    client: RecommenderClient
    queries: list[tuple[np.ndarray, bytes]]
    latencies_ms: list[float] = field(default_factory=list)
    upload_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    sample: tuple[np.ndarray, recommender_pb2.ScoreResponse] | None = None
    http: httpx.Client | None = None  # to the gateway, if one runs

    def reset(self) -> None:
        self.latencies_ms.clear()
        self.upload_ms.clear()
        self.errors.clear()
        self.sample = None

    def _post(self, path: str, request: Any, reply: Any) -> Any:
        """``request`` through the gateway as application/x-protobuf; the parsed answer."""
        assert self.http is not None
        r = self.http.post(path, content=request.SerializeToString(), headers=PROTOBUF_HEADERS)
        if r.status_code != 200:
            raise HttpError(f"HTTP_{r.status_code}")
        return reply.FromString(r.content)

    def fresh_query(self, rng: np.random.Generator) -> tuple[np.ndarray, bytes]:
        if self.queries:
            return self.queries.pop()
        u = rng.standard_normal(64)
        u /= np.linalg.norm(u)
        return u, self.client.encrypt_query(u)

    def score_once(self, rng: np.random.Generator, timed: bool, path: str = "direct") -> None:
        u, query = self.fresh_query(rng)
        c = self.client
        key = c._key_ref()
        t0 = time.perf_counter()
        try:
            upload = c._authorize(
                RECOMMENDER,
                "UploadProfile",
                key.key_id,
                recommender_pb2.UploadProfileRequest(key=key, query_ciphertext=query),
            )
            if path == "gateway":
                ref = self._post("/v1/profiles", upload, recommender_pb2.ProfileRef)
            else:
                ref = c.stub.UploadProfile(upload, timeout=120)
            t1 = time.perf_counter()
            request = c._authorize(
                RECOMMENDER, "Score", key.key_id, recommender_pb2.ScoreRequest(key=key, profile_ref=ref.profile_ref)
            )
            if path == "gateway":
                response = self._post("/v1/score", request, recommender_pb2.ScoreResponse)
            else:
                response = c.stub.Score(request, timeout=120)
            t2 = time.perf_counter()
        except grpc.RpcError as exc:
            if timed:
                self.errors[exc.code().name] += 1
            return
        except (HttpError, httpx.HTTPError) as exc:
            if timed:
                self.errors[str(exc) if isinstance(exc, HttpError) else type(exc).__name__] += 1
            return
        if response.response_sha256 != ciphertext_sha256(list(response.score_ciphertexts)) or response.from_cache:
            self.errors["BAD_RESPONSE"] += 1
            return
        if timed:
            self.upload_ms.append(1e3 * (t1 - t0))
            self.latencies_ms.append(1e3 * (t2 - t1))
        if self.sample is None:
            self.sample = (u, response)


def start_gateway(mesh: Mesh, recommender_port: int) -> int:
    ks = next(s for s in mesh.services if s.name == "keyservice")
    ledger = next(s for s in mesh.services if s.name == "ledger")
    port = free_port()
    env = {
        "CIPHERFEED_GATEWAY_PORT": str(port),
        "CIPHERFEED_TARGET": f"127.0.0.1:{recommender_port}",
        "CIPHERFEED_KEYSERVICE_TARGET": f"127.0.0.1:{ks.port}",
        "CIPHERFEED_LEDGER_TARGET": f"127.0.0.1:{ledger.port}",
        "CIPHERFEED_GATEWAY_MAX_CONCURRENCY": "256",
    }
    mesh.start("gateway", "gateway", "gateway", port, env)
    return port


def rss_of(mesh: Mesh) -> dict[str, float]:
    """MB resident per service process, and Redis's (the cache all configurations share)."""
    rss = {s.name: rss_mb(s.proc.pid) for s in mesh.services}
    if mesh.redis.process is not None:
        rss["redis"] = rss_mb(mesh.redis.process.pid)
    return rss


def growth_pct(start: dict[str, float], end: dict[str, float]) -> dict[str, float]:
    return {k: 100 * (end[k] - v) / v for k, v in start.items() if v and k in end}


def run_concurrently(devices: list[Device], body: Any, seed: int) -> float:
    """``body(device, rng)`` on one thread per device; the seconds they took together."""
    threads = [threading.Thread(target=body, args=(d, np.random.default_rng(seed + i))) for i, d in enumerate(devices)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - t0


def run_window(
    mesh: Mesh, devices: list[Device], model: Any, path: str, shards: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Warm-up (alone, then all at once), then every device at once for ``args.seconds``."""
    rng = np.random.default_rng(shards)
    for d in devices:
        d.reset()
    rss_start = rss_of(mesh)
    for d in devices:  # warm-up: keys fetched and installed in every recommender process
        d.score_once(rng, timed=False, path=path)
    sequential = []
    for d in devices[:3]:  # unloaded latency: one request at a time
        d.score_once(rng, timed=True, path=path)
        sequential.extend(d.latencies_ms)
        d.latencies_ms.clear()
        d.upload_ms.clear()

    def warm(d: Device, local: np.random.Generator) -> None:  # the window's concurrency, untimed
        for _ in range(args.warmup_rounds):
            d.score_once(local, timed=False, path=path)

    run_concurrently(devices, warm, 500 * shards)
    rss_warm = rss_of(mesh)
    cpu_before = {s.name: cpu_seconds(s.proc.pid) for s in mesh.services}
    load_before = load_average()
    stop_at = time.monotonic() + args.seconds
    series: list[tuple[float, dict[str, float]]] = []
    sampling = threading.Event()

    def sample() -> None:  # a few /proc reads every few seconds: nothing next to a Score
        t0 = time.monotonic()
        while not sampling.wait(args.rss_every):
            series.append((round(time.monotonic() - t0, 1), rss_of(mesh)))

    def drive(d: Device, local: np.random.Generator) -> None:
        while time.monotonic() < stop_at:
            d.score_once(local, timed=True, path=path)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    window = run_concurrently(devices, drive, 1000 * shards)
    sampling.set()
    sampler.join()
    load_after = load_average()
    cpu_used = {s.name: cpu_seconds(s.proc.pid) - cpu_before[s.name] for s in mesh.services}
    rss_end = rss_of(mesh)
    latencies = [x for d in devices for x in d.latencies_ms]
    uploads = [x for d in devices for x in d.upload_ms]
    errors: Counter[str] = Counter()
    for d in devices:
        errors.update(d.errors)
    wrong = 0
    for d in devices:  # after the window: decrypt one answer per device against plaintext scoring
        if d.sample is None:
            continue
        u, response = d.sample
        got = d.client._decrypt(response, response.query_sha256, 0).scores
        want = plaintext_scores(model.embeddings, u, model.popularity, model.popularity_weight)
        wrong += int(np.max(np.abs(got - want)) >= 1e-4)
    p50 = float(np.percentile(latencies, 50)) if latencies else float("nan")
    p99 = float(np.percentile(latencies, 99)) if latencies else float("nan")
    return {
        "shards": shards,
        "path": path,
        "clients": args.clients,
        "seconds": round(window, 1),
        "scores": len(latencies),
        "scores_per_s": len(latencies) / window,
        "p50_ms": p50,
        "p99_ms": p99,
        "p99_over_p50": p99 / p50 if latencies else float("nan"),
        "sequential_p50_ms": float(np.median(sequential)) if sequential else float("nan"),
        "upload_profile_p50_ms": float(np.percentile(uploads, 50)) if uploads else float("nan"),
        "errors": dict(errors),
        "wrong_answers": wrong,
        "warmup_rounds": args.warmup_rounds,
        "rss_mb": {"start": rss_start, "warm": rss_warm, "end": rss_end},
        "rss_growth_pct": {"after_warmup": growth_pct(rss_warm, rss_end), "from_start": growth_pct(rss_start, rss_end)},
        "rss_mb_series": [{"t": t, **r} for t, r in series],
        "load_before": load_before,
        "load_after": load_after,
        # CPU seconds each service process spent in the window, per Score answered in it
        "cpu_s_per_score": {k: v / len(latencies) for k, v in cpu_used.items()} if latencies else {},
        "cpu_s_per_score_services": sum(cpu_used.values()) / len(latencies) if latencies else float("nan"),
    }


def run_configuration(
    work: Path, identity: Any, redis: LocalRedis, model: Any, model_path: Path, shards: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    mesh = Mesh(work / f"shards-{shards}", identity, redis)
    t0 = time.perf_counter()
    devices: list[Device] = []
    try:
        port = start_mesh(mesh, model_path, shards)
        gateway_port = start_gateway(mesh, port) if "gateway" in args.paths else None
        started_s = time.perf_counter() - t0
        log(f"{shards} shard(s): mesh up in {started_s:.0f} s ({', '.join(s.name for s in mesh.services)})")
        ks = next(s for s in mesh.services if s.name == "keyservice")
        rng = np.random.default_rng(shards)
        for i in range(args.clients):
            config = ClientConfig(
                target=f"127.0.0.1:{port}",
                keyservice_target=f"127.0.0.1:{ks.port}",
                deadline_seconds=120,
                home=mesh.work / f"device-{i}",
                limits=LIMITS,
                tls=identity("device"),
            )
            c = RecommenderClient(config)
            c.wait_ready(timeout=60)
            c.use_keys()
            c.register()
            c.sign_in()  # session tokens: the same proof on both paths
            d = Device(c, [])
            if gateway_port is not None:
                d.http = httpx.Client(base_url=f"http://127.0.0.1:{gateway_port}", timeout=120)
            for _ in range(args.queries_per_client):
                d.queries.append(d.fresh_query(rng))
            devices.append(d)
        rows = []
        for path in args.paths:
            row = run_window(mesh, devices, model, path, shards, args)
            row["startup_s"] = round(started_s, 1)
            rows.append(row)
            log(f"{shards} shard(s), {path}: {row['scores_per_s']:.2f} Scores/s, p50 {row['p50_ms']:.0f} ms")
        return rows
    finally:
        for d in devices:
            d.client.close()
            if d.http is not None:
                d.http.close()
        mesh.stop()


def largest_service_growth(growth: dict[str, float]) -> float:
    """The largest growth among the mesh's services (Redis, a cache by design, apart)."""
    values = [v for k, v in growth.items() if k != "redis"]
    return max(values) if values else float("nan")


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'shards':>6} {'path':>7} {'clients':>7} {'s':>4} {'Scores/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'p99/p50':>7} {'seq ms':>7} {'errors':>6} {'wrong':>5} {'RSS +% warm':>11} {'from start':>10}"
        "  load before/after"
    )
    for r in rows:
        growth = r["rss_growth_pct"]
        warm, start = largest_service_growth(growth["after_warmup"]), largest_service_growth(growth["from_start"])
        print(
            f"{r['shards']:>6} {r['path']:>7} {r['clients']:>7} {r['seconds']:>4.0f} {r['scores_per_s']:>9.2f} "
            f"{r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['p99_over_p50']:>7.2f} {r['sequential_p50_ms']:>7.0f} "
            f"{sum(r['errors'].values()):>6} {r['wrong_answers']:>5} "
            f"{warm:>11.1f} {start:>10.1f}"
            f"  {r['load_before']} / {r['load_after']}"
        )
        rss = r["rss_mb"]
        for name in rss["start"]:
            cpu = r["cpu_s_per_score"].get(name)
            print(
                f"{'':>8}{name:<12} RSS {rss['start'][name]:8.1f} start -> {rss['warm'][name]:8.1f} warm -> "
                f"{rss['end'][name]:8.1f} MB end ({growth['after_warmup'][name]:+.1f} % after warm-up, "
                f"{growth['from_start'][name]:+.1f} % from start)"
                + ("" if cpu is None else f", CPU {1e3 * cpu:.1f} ms/Score")
            )
        print(f"{'':>8}{'services':<12} CPU {1e3 * r['cpu_s_per_score_services']:7.1f} ms/Score")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--shards", default="1,2,3")
    parser.add_argument("--paths", default="direct,gateway", help="direct (gRPC) and/or gateway (HTTP, binary)")
    parser.add_argument("--queries-per-client", type=int, default=16, help="encrypted before the window")
    parser.add_argument("--warmup-rounds", type=int, default=3, help="Scores per device, all at once, before it")
    parser.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples in the window")
    parser.add_argument("--out", default="load")
    parser.add_argument("--keep", action="store_true", help="keep the services' logs (printed path)")
    args = parser.parse_args(argv)
    args.paths = [p for p in args.paths.split(",") if p]
    if not set(args.paths) <= {"direct", "gateway"}:
        parser.error("--paths: direct and/or gateway")
    shard_counts = [int(s) for s in args.shards.split(",") if s]
    work = Path(tempfile.mkdtemp(prefix="cipherfeed-load-"))
    redis = LocalRedis.start()
    try:
        identity = mesh_identities(work)
        model = synthetic_catalogue(args.items, seed=1)
        model_path = work / "model.cfmodel"
        model.save(model_path)
        rows = []
        for shards in shard_counts:
            rows.extend(run_configuration(work, identity, redis, model, model_path, shards, args))
        print_table(rows)
        payload = {
            "machine": machine(),
            "items": args.items,
            "clients": args.clients,
            "seconds": args.seconds,
            "rows": rows,
        }
        path = write_json(args.out, payload)
        log(f"wrote {path}")
    finally:
        redis.stop()
        if args.keep:
            log(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
