"""Small helpers shared by the benchmarks: percentiles, machine description, JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from cipherfeed.config import GrpcLimits, KeyServiceConfig, TlsConfig
from cipherfeed.devredis import LocalRedis
from cipherfeed.grpcutil import RunningServer
from services.keyservice.core import KeyServiceCore
from services.keyservice.server import serve as serve_keyservice

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    """Progress for long runs, on stderr (the table goes to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p95_ms": float(np.percentile(a, 95)),
        "n": len(samples_ms),
    }


def machine_speed() -> dict[str, float]:
    """Two probes of this machine's state at run time, recorded beside the results: SHA-256
    throughput (CPU-bound) and a 256 MiB array copy (streaming memory). They catch a slower or
    throttled machine; they do not catch everything that moves encrypted scoring on a shared VM
    (two runs 25% apart here both copied at ~26 GB/s)."""
    import hashlib

    import numpy as np

    data = bytes(64 << 20)
    sha = min(timed_ms(lambda: hashlib.sha256(data).digest())[1] for _ in range(3))
    src = np.ones(32 << 20)  # 256 MiB of float64
    dst = np.empty_like(src)
    copy = min(timed_ms(np.copyto, dst, src)[1] for _ in range(3))
    return {"sha256_mb_per_s": 64 * 1.048576 / (sha / 1e3), "memcopy_gb_per_s": 2 * 0.268435456 / (copy / 1e3)}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for pkg in ("openfhe", "tenseal", "numpy", "grpcio"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "versions": versions,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "speed": machine_speed(),
    }


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def timed_ms(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, 1e3 * (time.perf_counter() - t0)


def mesh_identities(directory: Path) -> Callable[[str], TlsConfig]:
    """A development CA for a benchmark's mesh; each identity's certificate issued on first use,
    so benchmarks run over mutual TLS with the policy enforced, as in production."""
    from cipherfeed.tls import DevCertificateAuthority

    ca = DevCertificateAuthority("cipherfeed.bench")
    issued: dict[str, TlsConfig] = {}

    def identity(name: str) -> TlsConfig:
        if name not in issued:
            issued[name] = ca.write(directory / "pki", name)
        return issued[name]

    return identity


def serve_bench_keyservice(
    work: Path, redis_server: LocalRedis, identity: Callable[[str], TlsConfig], limits: GrpcLimits
) -> tuple[RunningServer, KeyServiceCore]:
    """The key service every benchmark runs beside its recommender: SQLite in ``work``, the
    benchmark's Redis as the key service's ACL user, its own mesh certificate."""
    return serve_keyservice(
        KeyServiceConfig(
            listen="127.0.0.1:0",
            dsn=f"sqlite:///{work / 'ks.db'}",
            state_dir=work,
            limits=limits,
            redis=redis_server.config_for("keyservice"),
            tls=identity("keyservice"),
        )
    )
