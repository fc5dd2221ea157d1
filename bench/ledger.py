"""Ledger benchmark: ``python -m bench.ledger [--leaves 1000000]``.

* receipts appended per second, durably (group commit), in process on SQLite (synchronous=FULL) and
  PostgreSQL, and over gRPC; and appends of leaves already in the log (answered with their index);
* inclusion proof generation and verification at 10^6 leaves;
* gas per anchor, and transactions per checkpoint, on the in-process py-evm chain.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import log, machine, mesh_identities, percentiles, timed_ms, write_json
from cipherfeed.config import GrpcLimits, LedgerConfig, TlsConfig
from cipherfeed.grpcutil import channel as grpc_channel
from cipherfeed.merkle import CompactTree, leaf_hash, verify_inclusion
from cipherfeed.receipts import Receipt
from cipherfeed.v1 import ledger_pb2, ledger_pb2_grpc
from services.ledger.server import build_core, serve
from services.ledger.signers import LocalSigner

TARGETS = {"receipts_per_second": 20_000, "inclusion_proof_ms_at_1m": 1.0, "verify_ms_at_1m": 0.2}


def receipts(n: int, seed: int) -> list[Receipt]:
    rng = random.Random(seed)
    return [
        Receipt(rng.randbytes(32).hex(), rng.randbytes(32).hex(), "ab" * 32, "cd" * 32, 1, 1_700_000_000_000 + i)
        for i in range(n)
    ]


def append_on_postgresql(work: Path, base: LedgerConfig, batches: list[list[bytes]], writers: int) -> dict[str, Any]:
    """The in-process run on a PostgreSQL store (the pgserver wheel's server, on a Unix socket)."""
    import pgserver

    n = sum(len(b) for b in batches)
    log(f"== {n:,} durable appends on PostgreSQL (pgserver, in process)")
    pgdata = work / "pgdata"
    work.chmod(0o755)  # pgserver runs the server as its own user when started by root
    server = pgserver.get_server(str(pgdata), cleanup_mode="stop")
    try:
        core = build_core(
            LedgerConfig(**{**base.__dict__, "dsn": server.get_uri()}), LocalSigner("bench/ledger"), anchoring=False
        )
        started = time.perf_counter()
        with ThreadPoolExecutor(writers) as pool:
            list(pool.map(core.log.append_many, batches))
        elapsed = time.perf_counter() - started
        core.close()
    finally:
        server.cleanup()
    return {"receipts": n, "seconds": elapsed, "per_second": n / elapsed}


def append_over_grpc(
    work: Path, base: LedgerConfig, args: argparse.Namespace, identity: Callable[[str], TlsConfig], plaintext: bool
) -> dict[str, Any]:
    """Durable AppendBatch throughput into a fresh ledger on loopback."""
    name = "grpc-plain" if plaintext else "grpc"
    server_tls = TlsConfig(insecure_dev=True) if plaintext else base.tls
    client_tls = TlsConfig(insecure_dev=True) if plaintext else identity("recommender")
    settings = {**base.__dict__, "dsn": f"sqlite:///{work / f'{name}.db'}", "listen": "127.0.0.1:0", "tls": server_tls}
    running, gcore = serve(LedgerConfig(**settings), LocalSigner("bench/ledger"), background_anchoring=False)
    channel = grpc_channel(f"127.0.0.1:{running.port}", GrpcLimits(max_message_bytes=64 * 2**20), client_tls, "ledger")
    stub = ledger_pb2_grpc.LedgerStub(channel)
    made = receipts(args.appends, 3 if plaintext else 2)  # once, not once per batch
    requests = [
        ledger_pb2.AppendBatchRequest(
            entries=[ledger_pb2.AppendRequest(receipt=ledger_pb2.Receipt(**r.__dict__)) for r in chunk]
        )
        for chunk in (made[i : i + args.batch] for i in range(0, args.appends, args.batch))
    ]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.writers) as pool:
        list(pool.map(lambda req: stub.AppendBatch(req, timeout=120), requests))
    elapsed = time.perf_counter() - started
    channel.close()
    running.stop(grace=1)
    gcore.close()
    return {"receipts": args.appends, "seconds": elapsed, "per_second": args.appends / elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--appends", type=int, default=200_000, help="receipts appended in the throughput runs")
    parser.add_argument("--batch", type=int, default=2000, help="receipts per append call (the spool's batch)")
    parser.add_argument("--writers", type=int, default=4, help="concurrent appenders")
    parser.add_argument("--leaves", type=int, default=1_000_000, help="tree size for the proof measurements")
    parser.add_argument("--anchors", type=int, default=20)
    parser.add_argument("--postgres", action=argparse.BooleanOptionalAction, default=True,
                        help="also append on a PostgreSQL store (the pgserver wheel)")  # fmt: skip
    parser.add_argument("--out", default="ledger")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cf-bench-ledger-"))
    results: dict[str, Any] = {}
    identity = mesh_identities(work)
    base = LedgerConfig(
        origin="bench/ledger",
        checkpoint_every=10**9,
        checkpoint_interval=3600.0,
        state_dir=work,
        tls=identity("ledger"),
    )

    log(f"== {args.appends:,} durable appends in batches of {args.batch} from {args.writers} writers (in process)")
    core = build_core(
        LedgerConfig(**{**base.__dict__, "dsn": f"sqlite:///{work / 'inproc.db'}"}),
        LocalSigner("bench/ledger"),
        anchoring=False,
    )
    leaves = [r.leaf() for r in receipts(args.appends, 1)]
    batches = [leaves[i : i + args.batch] for i in range(0, len(leaves), args.batch)]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.writers) as pool:
        list(pool.map(core.log.append_many, batches))
    elapsed = time.perf_counter() - started
    results["append_in_process"] = {"receipts": args.appends, "seconds": elapsed, "per_second": args.appends / elapsed}
    dup_started = time.perf_counter()  # the same batches again: every leaf is already there
    with ThreadPoolExecutor(args.writers) as pool:
        list(pool.map(core.log.append_many, batches))
    dup_elapsed = time.perf_counter() - dup_started
    assert core.log.tree.size == args.appends
    results["append_again_in_process"] = {"receipts": args.appends, "per_second": args.appends / dup_elapsed}
    core.close()

    if args.postgres:
        results["append_in_process_postgresql"] = append_on_postgresql(work, base, batches, args.writers)

    # Over gRPC: mutual TLS with the policy, as deployed, and the same in plaintext (the
    # development setting) right after it, so the difference is what TLS and the policy cost.
    for label, plaintext in (("append_grpc", False), ("append_grpc_plaintext", True)):
        transport = "plaintext (CIPHERFEED_INSECURE_DEV)" if plaintext else "mutual TLS, the recommender's identity"
        log(f"== the same over gRPC (AppendBatch, loopback, {transport})")
        results[label] = append_over_grpc(work, base, args, identity, plaintext)
    log(f"== proofs at {args.leaves:,} leaves")
    tree, build_ms = timed_ms(CompactTree, [leaf_hash(os.urandom(16)) for _ in range(args.leaves)])
    root = tree.root()
    rng = random.Random(3)
    indices = [rng.randrange(args.leaves) for _ in range(2000)]
    gen, ver = [], []
    for i in indices:
        proof, ms = timed_ms(tree.inclusion_proof, i, args.leaves)
        gen.append(ms)
        ver.append(timed_ms(verify_inclusion, i, args.leaves, tree.leaf(i), proof, root)[1])
    results["proofs"] = {
        "leaves": args.leaves,
        "tree_build_seconds": build_ms / 1e3,
        "inclusion_generate": percentiles(gen),
        "inclusion_verify": percentiles(ver),
        "proof_hashes": len(proof),
    }

    log(f"== {args.anchors} checkpoints anchored on py-evm")
    acore = build_core(
        LedgerConfig(**{**base.__dict__, "dsn": f"sqlite:///{work / 'anchor.db'}"}),
        LocalSigner("bench/ledger"),
        background_anchoring=False,
    )
    for i in range(args.anchors):
        acore.log.append_many([f"entry {i}".encode()])
        acore.log.checkpoint()
    anchorer = acore.anchorer
    assert anchorer is not None
    anchorer.anchor_pending()
    contract = anchorer._ensure_contract()
    w3 = anchorer._w3
    assert w3 is not None
    events = contract.events.Anchored().get_logs(from_block=0)
    gas = [w3.eth.get_transaction_receipt(e["transactionHash"])["gasUsed"] for e in events]
    results["anchoring"] = {
        "checkpoints": args.anchors,
        "transactions": len(events),
        "gas_per_anchor_first": gas[0],
        "gas_per_anchor_steady": gas[-1],
    }
    acore.close()

    a, g, p, c = results["append_in_process"], results["append_grpc"], results["proofs"], results["anchoring"]
    print(f"{'measure':<52} {'value':>14}")
    print(f"{'durable appends/s, in process (group commit)':<52} {a['per_second']:>14,.0f}")
    again = results["append_again_in_process"]
    print(f"{'appends/s of leaves already logged (idempotent)':<52} {again['per_second']:>14,.0f}")
    if "append_in_process_postgresql" in results:
        pg = results["append_in_process_postgresql"]
        print(f"{'durable appends/s, in process, PostgreSQL':<52} {pg['per_second']:>14,.0f}")
    print(f"{'durable appends/s, gRPC AppendBatch (mutual TLS)':<52} {g['per_second']:>14,.0f}")
    plain = results["append_grpc_plaintext"]
    print(f"{'durable appends/s, gRPC AppendBatch (plaintext)':<52} {plain['per_second']:>14,.0f}")
    gen_p, ver_p = p["inclusion_generate"], p["inclusion_verify"]
    print(f"{'inclusion proof at 1e6 leaves, p50 / p95 (ms)':<52} {gen_p['p50_ms']:>6.3f} / {gen_p['p95_ms']:.3f}")
    print(f"{'inclusion verify at 1e6 leaves, p50 / p95 (ms)':<52} {ver_p['p50_ms']:>6.3f} / {ver_p['p95_ms']:.3f}")
    print(f"{'gas per anchor (first / steady)':<52} {c['gas_per_anchor_first']:>7,} / {c['gas_per_anchor_steady']:,}")
    print(f"{'transactions per checkpoint':<52} {c['transactions'] / c['checkpoints']:>14.2f}")
    shutil.rmtree(work, ignore_errors=True)
    path = write_json(args.out, {"machine": machine(), "targets": TARGETS, **results})
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
