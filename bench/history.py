"""History profile benchmark: ``python -m bench.history [--sizes 26558,100000] [--million]``.

For each catalogue size (26,558: the dataset's own model when the dataset is there, else a
synthetic catalogue of that size; larger sizes synthetic, d = 64): the history upload's bytes
(one fresh ciphertext per block of 8,192 items), the server time to build a profile (E(w) ->
E(u): the projection alone, and the whole UploadHistory call: validation, key state, projection,
cache writes), Score by that profile, and today's inline-query Score in the same run, interleaved
sample by sample (this VM's speed moves by up to 1.5x for minutes at a time, and other work on
it moves it more: the process CPU time of the upload call and of the inline Score, and the load
average, are recorded beside the wall times). Correctness of what
was timed: the decrypted scores against the plaintext twin (``interest.history_interest``). The
key set's size (public key + rotation keys + conjugation key).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from eth_account import Account

from bench.common import log, machine, mesh_identities, percentiles, serve_bench_keyservice, timed_ms, write_json
from cipherfeed.client import keystore
from cipherfeed.client.interest import history_interest
from cipherfeed.client.sdk import encrypt_history, encrypt_query
from cipherfeed.config import GrpcLimits, MiB, RedisConfig, TlsConfig, default_dataset_path
from cipherfeed.devredis import LocalRedis
from cipherfeed.grpcutil import channel
from cipherfeed.he import packing, scorecheck, wire
from cipherfeed.he.keymap import KeyMaterial, installed_tag
from cipherfeed.he.params import MESH_PARAMS
from cipherfeed.v1 import common_pb2, keyservice_pb2_grpc
from services.recommender.artifact import ModelArtifact
from services.recommender.core import KeyLimits, RecommenderCore
from services.recommender.synthetic import synthetic_catalogue

LIMITS = GrpcLimits(max_message_bytes=256 * MiB, max_query_bytes=2 * MiB)
DATASET_ITEMS = 26_558
TARGETS = {
    "build_ms_at_100k": 100.0,
    "build_ms_at_1m": 400.0,
    "profile_over_inline_p50_at_100k": 1.3,
    "upload_bytes_at_26558": 1_500_000,
    "key_set_bytes": 20_000_000,
}


def catalogue(n: int) -> tuple[ModelArtifact, str]:
    if n == DATASET_ITEMS and default_dataset_path().is_file():
        from services.recommender.dataset import load_profiles
        from services.recommender.model import train

        model = train(load_profiles(default_dataset_path()), created_by="bench")
        if model.item_count == n:
            return model, "dataset"
    return synthetic_catalogue(n, seed=n), "synthetic"


def decrypt(keys: keystore.ClientKeys, core: RecommenderCore, blobs: list[bytes], n: int, tag: str) -> np.ndarray:
    decrypted = []
    checker = scorecheck.for_params(MESH_PARAMS)
    for blob in blobs:  # checked as the device checks them
        pt = keys.cc.Decrypt(keys.secret_key, checker.load(blob, tag))
        pt.SetLength(MESH_PARAMS.slots)
        decrypted.append(np.asarray(pt.GetCKKSPackedValue()))
    return packing.unpack_scores(decrypted, n, MESH_PARAMS.slots, core.scorer.tail_fold, MESH_PARAMS.padded_dim)


def run_size(
    n: int, reps: int, keyservice_port: int, ks_core: Any, redis: RedisConfig, identity: Callable[[str], TlsConfig]
) -> dict[str, Any]:
    model, source = catalogue(n)
    log(f"== {n:,} items x 64 dims ({source})")
    stub = keyservice_pb2_grpc.KeyServiceStub(
        channel(f"127.0.0.1:{keyservice_port}", LIMITS, identity("recommender"), "keyservice")
    )
    core, encode_ms = timed_ms(RecommenderCore, model, MESH_PARAMS, 2, LIMITS, stub, KeyLimits(4, 1 << 40), redis)
    log(f"   plaintexts encoded in {encode_ms / 1e3:.1f} s")
    keys = keystore.generate(MESH_PARAMS)
    owner = Account.create().address
    record = ks_core.register(KeyMaterial(keys.public_key_bytes, keys.rotation_key_bytes), owner)
    ref = common_pb2.KeyRef(key_id=record.key_id, version=1)
    rng = np.random.default_rng(n)
    weights = np.zeros(n)
    weights[rng.choice(n, 20, replace=False)] = rng.random(20) + 0.1  # a 20-engagement history
    weights /= weights.sum()
    u_unit = model.embeddings[rng.integers(0, n, 20)].astype(np.float64).sum(axis=0)
    u_unit /= np.linalg.norm(u_unit)
    for _ in range(2):  # warm up both paths (keys installed, pools started)
        profile_ref, _, _ = core.upload_history(ref, encrypt_history(keys, weights))
        core.score(ref, None, profile_ref=profile_ref)
        core.score(ref, encrypt_query(keys, u_unit))
    build, upload_server, by_profile, inline, upload_bytes = [], [], [], [], 0
    build_cpu, inline_cpu = [], []  # process CPU time: less moved by other load on the VM than wall time
    result = None
    for _ in range(reps):
        blobs = encrypt_history(keys, weights)  # fresh ciphertexts: no result-cache hit
        upload_bytes = sum(len(b) for b in blobs)
        core.results.flush()
        cpu = time.process_time()
        (profile_ref, _, millis), call_ms = timed_ms(core.upload_history, ref, blobs)
        build_cpu.append(1e3 * (time.process_time() - cpu))
        build.append(millis)
        upload_server.append(call_ms)
        core.results.flush()
        result = core.score(ref, None, profile_ref=profile_ref)
        by_profile.append(result.server_millis)
        core.results.flush()
        query = encrypt_query(keys, u_unit)
        cpu = time.process_time()
        inline.append(core.score(ref, query).server_millis)
        inline_cpu.append(1e3 * (time.process_time() - cpu))
    assert result is not None and not result.from_cache
    got = decrypt(keys, core, result.ciphertexts, n, installed_tag(ref.key_id, ref.version))
    want = packing.plaintext_scores(
        model.embeddings, history_interest(model.embeddings, weights), model.popularity, model.popularity_weight
    )
    packed = sum(len(wire.pack(b, (MESH_PARAMS.ring_dimension,))) for b in blobs)
    row: dict[str, Any] = {
        "items": n,
        "source": source,
        "blocks": core.history.block_count,
        "input_rotations": core.history.input_rotations,
        "kernel": core.history.kernel,
        "upload_bytes": upload_bytes,
        "upload_bytes_if_bit_packed": packed,
        "build": percentiles(build),
        "upload_server": percentiles(upload_server),
        "score_by_profile": percentiles(by_profile),
        "score_inline": percentiles(inline),
        "profile_over_inline_p50": float(np.percentile(by_profile, 50) / np.percentile(inline, 50)),
        "build_over_inline_p50": float(np.percentile(build, 50) / np.percentile(inline, 50)),
        "upload_call_cpu": percentiles(build_cpu),
        "score_inline_cpu": percentiles(inline_cpu),
        "load_average": os.getloadavg(),
        "max_abs_error": float(np.max(np.abs(got - want))),
        "top10_identical": list(np.argsort(-got)[:10]) == list(np.argsort(-want)[:10]),
        "key_set_bytes": len(keys.rotation_key_bytes) + len(keys.public_key_bytes),
        "encode_seconds": encode_ms / 1e3,
    }
    core.close()
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'items':>9} {'blocks':>6} {'R':>2} {'upload KB':>9} {'build p50':>9} {'p95':>7} {'upload call':>11} "
        f"{'by profile':>10} {'inline':>7} {'ratio':>6} {'build/inline':>12} {'cpu build':>9} {'cpu inline':>10} "
        f"{'max err':>8} {'top10':>5} {'key set MB':>10} {'load':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['items']:>9,} {r['blocks']:>6} {r['input_rotations']:>2} {r['upload_bytes'] / 1e3:>9.0f} "
            f"{r['build']['p50_ms']:>9.1f} {r['build']['p95_ms']:>7.1f} {r['upload_server']['p50_ms']:>11.1f} "
            f"{r['score_by_profile']['p50_ms']:>10.1f} {r['score_inline']['p50_ms']:>7.1f} "
            f"{r['profile_over_inline_p50']:>6.2f} {r['build_over_inline_p50']:>12.2f} "
            f"{r['upload_call_cpu']['p50_ms']:>9.1f} {r['score_inline_cpu']['p50_ms']:>10.1f} "
            f"{r['max_abs_error']:>8.1e} {'yes' if r['top10_identical'] else 'NO':>5} "
            f"{r['key_set_bytes'] / 1e6:>10.2f} {r['load_average'][0]:>5.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=f"{DATASET_ITEMS},100000", help="comma-separated catalogue sizes")
    parser.add_argument("--million", action="store_true", help="also run 1,000,000 items (~3 GB RAM; minutes)")
    parser.add_argument("--reps", type=int, default=15, help="timed samples per size")
    parser.add_argument("--out", default="history", help="results file name under bench/results/ (no .json)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.million:
        sizes.append(1_000_000)
    work = Path(tempfile.mkdtemp(prefix="cf-bench-history-"))
    redis_server = LocalRedis.start()
    redis = redis_server.config_for("recommender")
    identity = mesh_identities(work)
    ks_running, ks_core = serve_bench_keyservice(work, redis_server, identity, LIMITS)
    rows = []
    try:
        for n in sizes:
            reps = args.reps if n < 1_000_000 else max(3, args.reps // 3)
            rows.append(run_size(n, reps, ks_running.port, ks_core, redis, identity))
    finally:
        ks_running.stop(grace=1)
        ks_core.close()
        redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    path = write_json(
        args.out, {"machine": machine(), "params": MESH_PARAMS.__dict__, "targets": TARGETS, "rows": rows}
    )
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
