"""Encrypted scoring benchmark: ``python -m bench.scoring [--sizes 10000,100000] [--million]``.

For each catalogue size (synthetic, d = 64): server compute p50/p95 for one Score (key state,
validate, rotate, multiply, serialize and pack; each sample starts once the previous answer's
result-cache write, made behind its response, is done), beside each sample a fixed OpenFHE job
(four two-limb rotation precomputations on one thread, "probe": this shared VM's speed moves by
up to 1.5x for minutes at a time, and the probe moves with it), microseconds per item, query/response/evaluation-key
bytes, a gRPC round trip on loopback including client encryption and decryption, and, on the
same data in the same run, plaintext numpy and TenSEAL's CKKSVector.matmul doing the same scoring.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from eth_account import Account

from bench.common import log, machine, mesh_identities, percentiles, serve_bench_keyservice, timed_ms, write_json
from cipherfeed.client import keystore
from cipherfeed.client.sdk import RecommenderClient, encrypt_query
from cipherfeed.config import ClientConfig, GrpcLimits, MiB, RedisConfig, ScoreRateLimit, TlsConfig
from cipherfeed.devredis import LocalRedis
from cipherfeed.grpcutil import channel, start_server
from cipherfeed.he import packing, scorecheck
from cipherfeed.he.keymap import KeyMaterial, installed_tag
from cipherfeed.he.params import MESH_PARAMS
from cipherfeed.v1 import common_pb2, keyservice_pb2_grpc, recommender_pb2_grpc
from services.recommender.core import KeyLimits, RecommenderCore
from services.recommender.servicer import RecommenderServicer
from services.recommender.synthetic import synthetic_catalogue

LIMITS = GrpcLimits(max_message_bytes=256 * MiB, max_query_bytes=2 * MiB)
TARGETS = {
    "p50_ms_at_100k": 60.0,
    "p50_ms_at_1m": 1000.0,
    "response_bytes_per_item": 16.0,
    "query_bytes": 600_000,
}


def tenseal_peer(x: np.ndarray, u: np.ndarray, prior: np.ndarray, reps: int) -> dict[str, Any]:
    """TenSEAL CKKSVector doing the same scoring: enc(u).matmul(X_chunk^T) per 4,096 items."""
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.generate_galois_keys()
    ctx.global_scale = 2**40
    chunk = 4096
    plains = [ts.plain_tensor(x[i : i + chunk].T.astype(np.float64)) for i in range(0, x.shape[0], chunk)]
    enc = ts.ckks_vector(ctx, u.tolist())
    samples = []
    outputs: list[Any] = []
    for _ in range(reps):
        outputs, ms = timed_ms(lambda: [enc.matmul(p) for p in plains])
        samples.append(ms)
    got = np.concatenate([np.asarray(o.decrypt()) for o in outputs]) + prior
    return {
        **percentiles(samples),
        "params": "N=8192, moduli [60,40,40,60], scale 2^40, Galois keys for all power-of-two steps",
        "ciphertexts": len(outputs),
        "response_bytes": sum(len(o.serialize()) for o in outputs),
        "eval_key_bytes": len(ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=True)),
        "scores": got,
    }


def run_size(
    n: int,
    reps: int,
    tenseal_reps: int,
    keyservice_port: int,
    ks_core: Any,
    redis: RedisConfig,
    identity: Callable[[str], TlsConfig],
) -> dict[str, Any]:
    log(f"== {n:,} items x 64 dims")
    model = synthetic_catalogue(n, seed=n)
    stub = keyservice_pb2_grpc.KeyServiceStub(
        channel(f"127.0.0.1:{keyservice_port}", LIMITS, identity("recommender"), "keyservice")
    )
    core, encode_ms = timed_ms(
        lambda: RecommenderCore(
            model, MESH_PARAMS, 2, LIMITS, stub, KeyLimits(4, 1 << 40), redis, score_rate=ScoreRateLimit(1e6, 10**6)
        )
    )
    log(f"   plaintexts encoded in {encode_ms / 1e3:.1f} s")
    keys = keystore.generate(MESH_PARAMS)
    owner = Account.create()
    record = ks_core.register(KeyMaterial(keys.public_key_bytes, keys.rotation_key_bytes), owner.address)
    ref = common_pb2.KeyRef(key_id=record.key_id, version=1)
    rng = np.random.default_rng(n)
    u = model.embeddings[rng.integers(0, n, 20)].astype(np.float64).sum(axis=0)
    u /= np.linalg.norm(u)
    query = encrypt_query(keys, u)
    for _ in range(2):
        core.score(ref, query)
    samples = []
    probes = []
    probe_ct = core.codec.load_query(query)  # a two-limb ciphertext like every query
    result = None
    for _ in range(reps):
        query = encrypt_query(keys, u)  # a fresh ciphertext each time: no result cache hit
        # The previous answer's result-cache write (behind its response, into the Redis on these
        # same two cores) is finished first, so each sample is one request's own time.
        core.results.flush()
        result = core.score(ref, query)
        samples.append(result.server_millis)
        # The machine's state beside each sample: a fixed NTT-bound OpenFHE job on one thread.
        probes.append(timed_ms(lambda: [keys.cc.EvalFastRotationPrecompute(probe_ct) for _ in range(4)])[1])
    assert result is not None
    response_bytes = sum(len(b) for b in result.ciphertexts)

    # Correctness of what was timed.
    decrypted = []
    checker, tag = scorecheck.for_params(MESH_PARAMS), installed_tag(ref.key_id, ref.version)
    for blob in result.ciphertexts:  # checked as the device checks them
        pt = keys.cc.Decrypt(keys.secret_key, checker.load(blob, tag))
        pt.SetLength(MESH_PARAMS.slots)
        decrypted.append(np.asarray(pt.GetCKKSPackedValue()))
    got = packing.unpack_scores(decrypted, n, MESH_PARAMS.slots, core.scorer.tail_fold, MESH_PARAMS.padded_dim)
    prior = model.popularity_weight * model.popularity
    x = model.embeddings
    numpy_samples = [timed_ms(lambda: x @ u.astype(np.float32) + prior)[1] for _ in range(max(reps, 20))]
    clear = packing.plaintext_scores(x, u, model.popularity, model.popularity_weight)

    # Round trip over loopback gRPC, client encryption and decryption included.
    servicer = RecommenderServicer(core)
    running = start_server(
        lambda s: recommender_pb2_grpc.add_RecommenderServicer_to_server(servicer, s),
        ["cipherfeed.v1.Recommender"],
        "127.0.0.1:0",
        LIMITS,
        4,
        identity("recommender"),
    )
    client = RecommenderClient(
        ClientConfig(
            target=f"127.0.0.1:{running.port}",
            keyservice_target=f"127.0.0.1:{keyservice_port}",
            deadline_seconds=120,
            limits=LIMITS,
            tls=identity("device"),
        )
    )
    client.keys, client.account = keys, owner
    client.key_id, client.key_version = record.key_id, 1
    client.score(u)
    rtt = [timed_ms(client.score, u)[1] for _ in range(max(3, reps // 3))]
    client.close()
    running.stop(grace=1)

    row: dict[str, Any] = {
        "items": n,
        "dim": 64,
        "blocks": core.scorer.block_count,
        "server": percentiles(samples),
        "openfhe_probe": percentiles(probes),
        "us_per_item_p50": 1e3 * float(np.percentile(samples, 50)) / n,
        "round_trip": percentiles(rtt),
        "query_bytes": len(query),
        "response_bytes": response_bytes,
        "response_bytes_per_item": response_bytes / n,
        "eval_key_bytes": len(keys.rotation_key_bytes),
        "public_key_bytes": len(keys.public_key_bytes),
        "encode_seconds": encode_ms / 1e3,
        "max_abs_error": float(np.max(np.abs(got - clear))),
        "top10_identical": list(np.argsort(-got)[:10]) == list(np.argsort(-clear)[:10]),
        "numpy": percentiles(numpy_samples),
    }
    core.close()
    if tenseal_reps:
        log(f"   TenSEAL peer ({tenseal_reps} run(s))")
        peer = tenseal_peer(x, u, prior, tenseal_reps)
        scores = peer.pop("scores")
        peer["max_abs_error"] = float(np.max(np.abs(scores - clear)))
        peer["top10_identical"] = list(np.argsort(-scores)[:10]) == list(np.argsort(-clear)[:10])
        peer["speedup_of_cipherfeed"] = peer["p50_ms"] / row["server"]["p50_ms"]
        row["tenseal"] = peer
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'items':>9} {'p50 ms':>8} {'p95 ms':>8} {'probe ms':>8} {'us/item':>8} {'rtt ms':>8} {'query KB':>9} "
        f"{'resp B/item':>11} {'evalkey MB':>10} {'max err':>9} {'top10':>5} {'numpy ms':>9} "
        f"{'TenSEAL ms':>11} {'speedup':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        t = r.get("tenseal") or {"p50_ms": float("nan"), "speedup_of_cipherfeed": float("nan")}
        print(
            f"{r['items']:>9,} {r['server']['p50_ms']:>8.1f} {r['server']['p95_ms']:>8.1f} "
            f"{r['openfhe_probe']['p50_ms']:>8.1f} "
            f"{r['us_per_item_p50']:>8.3f} {r['round_trip']['p50_ms']:>8.1f} {r['query_bytes'] / 1e3:>9.0f} "
            f"{r['response_bytes_per_item']:>11.2f} {r['eval_key_bytes'] / 1e6:>10.1f} "
            f"{r['max_abs_error']:>9.1e} {'yes' if r['top10_identical'] else 'NO':>5} "
            f"{r['numpy']['p50_ms']:>9.2f} {t['p50_ms']:>11.0f} {t['speedup_of_cipherfeed']:>7.0f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated catalogue sizes")
    parser.add_argument(
        "--million", action="store_true", help="also run 1,000,000 items (~2 GB RAM, 10 without the kernel; minutes)"
    )
    parser.add_argument("--reps", type=int, default=20, help="timed Score calls per size")
    parser.add_argument("--tenseal-reps", type=int, default=1, help="TenSEAL runs per size (0 to skip)")
    parser.add_argument("--out", default="scoring", help="results file name under bench/results/ (no .json)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.million:
        sizes.append(1_000_000)
    work = Path(tempfile.mkdtemp(prefix="cf-bench-scoring-"))
    redis_server = LocalRedis.start()  # as in production: key state is a Redis GET per request
    redis = redis_server.config_for("recommender")
    identity = mesh_identities(work)
    ks_running, ks_core = serve_bench_keyservice(work, redis_server, identity, LIMITS)
    rows = []
    try:
        for n in sizes:
            reps = args.reps if n < 1_000_000 else max(3, args.reps // 4)
            rows.append(run_size(n, reps, args.tenseal_reps, ks_running.port, ks_core, redis, identity))
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
