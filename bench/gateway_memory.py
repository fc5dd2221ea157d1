"""What one request body costs the gateway in memory: ``python -m bench.gateway_memory``.

A gateway process (``cipherfeed serve gateway``, its own mesh identity) whose upstreams do not
listen: every request is read, parsed and transcoded in full, then refused 503 at the upstream
call, so the figure is the gateway's own cost. For each size, one ``POST /v1/score`` whose
ciphertext is that many bytes, as proto3 JSON (base64) and as ``application/x-protobuf``; the
gateway's RSS is sampled every 2 ms while the request runs. The README's gateway limits quote
the ratios (peak growth / body bytes). Memory does not depend on the machine's load, but the
load is recorded as for every benchmark.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import log, machine, mesh_identities, write_json
from bench.gateway import start_gateway
from cipherfeed.config import GatewayConfig
from cipherfeed.v1 import common_pb2, recommender_pb2

PROTOBUF = "application/x-protobuf"


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_growth(pid: int, url: str, body: bytes, content_type: str) -> dict[str, Any]:
    proc = psutil.Process(pid)
    before = proc.memory_info().rss
    peak, done = [before], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)  # a sampling period, not synchronisation

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        status = httpx.post(url, content=body, headers={"content-type": content_type}, timeout=300).status_code
    finally:
        done.set()
        watcher.join()
    growth = peak[0] - before
    return {"body_bytes": len(body), "status": status, "rss_before": before, "peak_growth": growth,
            "ratio": growth / len(body)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, nargs="+", default=[8, 32], help="ciphertext sizes (MiB)")
    parser.add_argument("--out", default="gateway-memory", help="results file name under bench/results/")
    args = parser.parse_args(argv)
    dead = _dead_port()
    with tempfile.TemporaryDirectory() as tmp:
        identity = mesh_identities(Path(tmp))
        config = GatewayConfig(
            port=0,
            recommender_target=f"127.0.0.1:{dead}",
            keyservice_target=f"127.0.0.1:{dead}",
            ledger_target=f"127.0.0.1:{dead}",
            tls=identity("gateway"),
        )
        proc, port = start_gateway(config)
        url = f"http://127.0.0.1:{port}/v1/score"
        results: dict[str, Any] = {"load_before": list(os.getloadavg())}
        try:
            for mib in args.mib:
                raw = b"\x01" * (mib << 20)
                request = recommender_pb2.ScoreRequest(key=common_pb2.KeyRef(key_id="0" * 64), query_ciphertext=raw)
                as_json = json.dumps({"key": {"keyId": "0" * 64}, "queryCiphertext": base64.b64encode(raw).decode()})
                results[f"json_{mib}mib"] = peak_growth(proc.pid, url, as_json.encode(), "application/json")
                results[f"protobuf_{mib}mib"] = peak_growth(proc.pid, url, request.SerializeToString(), PROTOBUF)
                log(f"{mib} MiB: json x{results[f'json_{mib}mib']['ratio']:.1f}, "
                    f"protobuf x{results[f'protobuf_{mib}mib']['ratio']:.1f}")  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(timeout=20)
        results["load_after"] = list(os.getloadavg())
    path = write_json(args.out, {"machine": machine(), "results": results})
    print(f"{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
