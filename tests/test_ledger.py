"""The ledger: receipts from real Scores verified down to an anchored root; tampering rejected;
crashes lose nothing; anchoring on py-evm in process and on a real anvil node, stopped mid-test."""

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import psycopg
import pytest
from web3 import Web3

from cipherfeed import trust
from cipherfeed.checkpoint import DASH, Verifier, verify_checkpoint, vkey
from cipherfeed.cli import web3_chain_root
from cipherfeed.client.verify import AnchorEvidence, VerificationError, verify_receipt
from cipherfeed.config import REPO_ROOT, LedgerConfig
from cipherfeed.devprocess import start_service
from cipherfeed.devredis import free_port
from cipherfeed.grpcutil import start_server
from cipherfeed.merkle import leaf_hash, verify_consistency
from cipherfeed.receipts import Receipt
from cipherfeed.v1 import ledger_pb2, ledger_pb2_grpc
from services.ledger.anchor import compiled_contract
from services.ledger.server import build_core
from services.ledger.server import serve as serve_ledger
from services.ledger.servicer import LedgerServicer
from services.ledger.signers import LocalSigner
from services.recommender.server import serve as serve_recommender
from tests.conftest import client_for, mesh_pki, recommender_config

ORIGIN = "cipherfeed.test/ledger"
ANVIL = REPO_ROOT / ".tools" / "node_modules" / ".bin" / "anvil"


class LedgerOnLoopback:
    """A real ledger core behind a loopback gRPC server (anchoring off: not under test here), over
    mutual TLS with the policy; ``stub`` calls as the recommender (the one identity that appends)."""

    def __init__(self, state: Path, servicer: ledger_pb2_grpc.LedgerServicer | None = None, **config) -> None:
        local = None if config.get("signer") == "keyservice" else LocalSigner(ORIGIN)
        settings = ledger_config(state, **config)
        self.core = build_core(settings, local, anchoring=False)
        implementation = servicer or LedgerServicer(self.core)
        self.server = start_server(
            lambda s: ledger_pb2_grpc.add_LedgerServicer_to_server(implementation, s),
            ["cipherfeed.v1.Ledger"],
            "127.0.0.1:0",
            settings.limits,
            4,
            settings.tls,
        )
        self.port = self.server.port
        self.channel = mesh_pki().channel(self.port, "ledger", "recommender")
        self.stub = ledger_pb2_grpc.LedgerStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=0)
        self.core.close()


def ledger_config(tmp_path: Path, **kw) -> LedgerConfig:
    base = dict(listen="127.0.0.1:0", dsn=f"sqlite:///{tmp_path / 'ledger.db'}", origin=ORIGIN,
                checkpoint_every=10**9, checkpoint_interval=3600.0, state_dir=tmp_path,
                tls=mesh_pki().tls("ledger"))  # fmt: skip
    return LedgerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def mesh(tiktok_model, keyservice, redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ledger-mesh")
    signer = LocalSigner(ORIGIN)
    ledger, ledger_core = serve_ledger(ledger_config(tmp), signer=signer, background_anchoring=False)
    config = dataclasses.replace(
        recommender_config(tmp, keyservice[0], redis_server.config_for("recommender")),
        ledger_target=f"127.0.0.1:{ledger.port}",
    )
    rec, rec_core = serve_recommender(config, tiktok_model)
    client = client_for(rec.port, keyservice[0], tmp / "client")
    client.config = dataclasses.replace(client.config, ledger_target=f"127.0.0.1:{ledger.port}")
    client.use_keys()
    client.register()
    channel = mesh_pki().channel(ledger.port, "ledger", "device")
    yield client, rec_core, ledger_core, ledger_pb2_grpc.LedgerStub(channel), signer
    channel.close()
    client.close()
    rec.stop(grace=1)
    rec_core.close()
    ledger.stop(grace=1)
    ledger_core.close()


def settle(rec_core, ledger_core):
    """Deterministically: spool -> ledger, then a checkpoint, then its anchor."""
    assert rec_core.receipts.flush(timeout=30)
    ledger_core.log.checkpoint()
    ledger_core.anchorer.anchor_pending()


def onchain(ledger_core):
    def evidence(size):
        out = []
        for a in ledger_core.anchors(size):
            if a.confirmed:
                out.append(AnchorEvidence(a.size, ledger_core.anchorer.onchain_root(a.size), "py-evm"))
        return out

    return evidence


def verify(stub, ledger_core, signer, receipt_id, mutate=None, verifiers=None, anchors=None, bundle=None):
    bundle = bundle or stub.GetReceipt(ledger_pb2.GetReceiptRequest(receipt_id=receipt_id), timeout=10)
    r = bundle.receipt
    receipt = Receipt(r.query_sha256, r.response_sha256, r.model_version, r.key_id, r.key_version, r.unix_millis)
    parts = dict(receipt=receipt, inclusion=list(bundle.inclusion.hashes), note=bundle.checkpoint.signed_note)
    if mutate:
        parts = mutate(parts)
    return verify_receipt(
        parts["receipt"], receipt_id, bundle.leaf_index, parts["inclusion"], parts["note"],
        verifiers or [Verifier(signer.name, signer.public_key)], ORIGIN,
        anchors or onchain(ledger_core),
        lambda a, b: ledger_core.consistency(a, b),
    )  # fmt: skip


def test_every_score_gets_a_receipt_that_verifies_to_the_chain(mesh):
    client, rec_core, ledger_core, stub, signer = mesh
    scored = [client.score(np.eye(64)[i]) for i in range(3)]
    assert all(s.receipt and s.receipt.receipt_id == s.receipt_id for s in scored)
    with pytest.raises(grpc.RpcError) as info:  # logged or not, no checkpoint covers it yet
        stub.GetReceipt(ledger_pb2.GetReceiptRequest(receipt_id=scored[-1].receipt_id), timeout=10)
    assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
    settle(rec_core, ledger_core)
    for s in scored:
        verified = verify(stub, ledger_core, signer, s.receipt_id)
        assert verified.receipt == s.receipt and verified.anchor.size == verified.checkpoint.size
    # The model version the recommender loaded is in the log too.
    leaves = [ledger_core.log.store.leaf(i) for i in range(ledger_core.log.tree.size)]
    assert any(b'"cipherfeed.model.v1"' in leaf and rec_core.model_version.encode() in leaf for leaf in leaves)


def test_a_later_anchor_with_a_consistency_proof_also_verifies(mesh):
    client, rec_core, ledger_core, stub, signer = mesh
    early = client.score(np.eye(64)[5])
    assert rec_core.receipts.flush(timeout=30)
    ledger_core.log.checkpoint()  # checkpoint A: the client keeps this bundle
    old_bundle = stub.GetReceipt(ledger_pb2.GetReceiptRequest(receipt_id=early.receipt_id), timeout=10)
    client.score(np.eye(64)[6])
    settle(rec_core, ledger_core)  # checkpoint B, then A and B anchored in order
    checkpoints = [a.size for a in ledger_core.anchors(0)]
    assert checkpoints == sorted(set(checkpoints))
    only_later = lambda size: [e for e in onchain(ledger_core)(size) if e.size > size]  # noqa: E731
    verified = verify(stub, ledger_core, signer, early.receipt_id, anchors=only_later, bundle=old_bundle)
    assert verified.anchor.size > verified.checkpoint.size == old_bundle.checkpoint.size


def other_receipt(p):
    return {**p, "receipt": dataclasses.replace(p["receipt"], model_version="0" * 64)}


def flipped_proof(p):
    return {**p, "inclusion": [bytes(32), *p["inclusion"][1:]] if p["inclusion"] else [bytes(32)]}


def broken_signature(p):
    assert p["note"].count(DASH) == 1
    return {**p, "note": p["note"][:-10] + "AAAAAAAAA\n"}


def other_size(p):
    origin, size, rest = p["note"].split("\n", 2)
    return {**p, "note": f"{origin}\n{int(size) + 1}\n{rest}"}


@pytest.mark.parametrize(
    ("step", "mutate"),
    [
        ("receipt", other_receipt),
        ("inclusion", flipped_proof),
        ("signature", broken_signature),
        ("signature", other_size),
    ],
)
def test_tampering_is_rejected_at_the_right_step(mesh, step, mutate):
    client, rec_core, ledger_core, stub, signer = mesh
    s = client.score(np.eye(64)[7])
    settle(rec_core, ledger_core)
    with pytest.raises(VerificationError) as info:
        verify(stub, ledger_core, signer, s.receipt_id, mutate=mutate)
    assert info.value.step == step


def test_wrong_keys_and_wrong_anchors_are_rejected(mesh):
    client, rec_core, ledger_core, stub, signer = mesh
    s = client.score(np.eye(64)[8])
    settle(rec_core, ledger_core)
    stranger = LocalSigner(ORIGIN)
    with pytest.raises(VerificationError) as info:
        verify(stub, ledger_core, signer, s.receipt_id, verifiers=[Verifier(stranger.name, stranger.public_key)])
    assert info.value.step == "signature"
    forged = lambda size: [AnchorEvidence(size, bytes(32), "forged")]  # noqa: E731
    with pytest.raises(VerificationError) as info:
        verify(stub, ledger_core, signer, s.receipt_id, anchors=forged)
    assert info.value.step == "anchor"
    with pytest.raises(VerificationError) as info:
        verify(stub, ledger_core, signer, s.receipt_id, anchors=lambda size: [])
    assert info.value.step == "anchor"


def test_one_transaction_per_checkpoint_in_order(mesh):
    _, _, ledger_core, _, _ = mesh
    contract = ledger_core.anchorer._ensure_contract()
    events = contract.events.Anchored().get_logs(from_block=0)
    sizes = [e["args"]["size"] for e in events]
    assert sizes == [a.size for a in ledger_core.anchors(0)] and sizes == sorted(set(sizes))
    assert all(a.confirmed for a in ledger_core.anchors(0))


def test_checkpoints_are_consistent_and_a_tampered_store_refuses_to_start(tmp_path, ledger_dsn):
    config = ledger_config(tmp_path, dsn=ledger_dsn)
    signer = LocalSigner(ORIGIN)
    core = build_core(config, signer, anchoring=False)
    core.log.append_many([f"leaf {i}".encode() for i in range(10)])
    first = core.log.checkpoint()
    core.log.append_many([f"leaf {i}".encode() for i in range(10, 25)])
    second = core.log.checkpoint()
    verify_consistency(first.size, second.size, first.root, second.root, core.consistency(first.size, second.size))
    checkpoint = verify_checkpoint(second.note, [Verifier(signer.name, signer.public_key)], origin=ORIGIN)
    assert (checkpoint.size, checkpoint.root) == (25, second.root)
    assert Verifier.from_vkey(vkey(signer.name, signer.public_key)) == Verifier(signer.name, signer.public_key)
    for _ in range(50):  # keys whose base64 contains "+" or "/" too
        other = LocalSigner(ORIGIN)
        assert Verifier.from_vkey(vkey(other.name, other.public_key)).public_key == other.public_key
    core.close()
    core.log.store.close()
    # rewrite history behind the log's back
    behind_the_back(ledger_dsn, "UPDATE leaves SET hash = ?, data = ? WHERE idx = 3", (leaf_hash(b"forged"), b"forged"))
    with pytest.raises(RuntimeError, match="does not match"):
        build_core(config, signer, anchoring=False)


def behind_the_back(dsn: str, sql: str, params: tuple) -> None:
    """Runs ``sql`` on the ledger's database directly, as an intruder with database access could."""
    if dsn.startswith("sqlite:///"):
        with sqlite3.connect(dsn.removeprefix("sqlite:///")) as db:
            db.execute(sql, params)
    else:
        with psycopg.connect(dsn, autocommit=True) as db:
            db.execute(sql.replace("?", "%s"), params)


def start_ledger_process(
    tmp_path: Path, port: int, dsn: str | None = None, env: dict[str, str] | None = None, log_path: Path | None = None
) -> subprocess.Popen:
    return start_service(
        "services.ledger.server",
        {
            "CIPHERFEED_LEDGER_LISTEN": f"127.0.0.1:{port}",
            "CIPHERFEED_LEDGER_DSN": dsn or f"sqlite:///{tmp_path / 'ledger.db'}",
            "CIPHERFEED_LEDGER_SIGNER": "local",
            "CIPHERFEED_LEDGER_ORIGIN": ORIGIN,
            "CIPHERFEED_CHECKPOINT_INTERVAL": "3600",
            "CIPHERFEED_CHECKPOINT_EVERY": "1000000000",
            "CIPHERFEED_STATE_DIR": str(tmp_path),
            **mesh_pki().env("ledger"),
            **(env or {}),
        },
        log_path=log_path,
    )


def test_crash_between_append_and_checkpoint_loses_nothing(tmp_path, ledger_dsn):
    port = free_port()
    proc = start_ledger_process(tmp_path, port, ledger_dsn)
    receipts = [Receipt("aa" * 32, "bb" * 32, "cc" * 32, "dd" * 32, 1, i) for i in range(500)]
    try:
        with mesh_pki().channel(port, "ledger", "recommender") as ch:
            stub = ledger_pb2_grpc.LedgerStub(ch)
            request = ledger_pb2.AppendBatchRequest(
                entries=[
                    ledger_pb2.AppendRequest(receipt=ledger_pb2.Receipt(**dataclasses.asdict(r))) for r in receipts
                ]
            )
            acked = stub.AppendBatch(request, timeout=30).appended
            assert [a.receipt_id for a in acked] == [r.receipt_id for r in receipts]
    finally:
        proc.send_signal(signal.SIGKILL)  # acknowledged, never checkpointed: then a crash
        proc.wait(timeout=10)
    proc = start_ledger_process(tmp_path, port, ledger_dsn)
    try:
        with mesh_pki().channel(port, "ledger", "recommender") as ch:
            stub = ledger_pb2_grpc.LedgerStub(ch)
            checkpoint = stub.GetCheckpoint(ledger_pb2.GetCheckpointRequest(), timeout=10)
            assert checkpoint.size == len(acked)  # signed at start from the recovered leaves
            bundle = stub.GetReceipt(ledger_pb2.GetReceiptRequest(receipt_id=receipts[123].receipt_id), timeout=10)
            assert bundle.leaf_index == acked[123].leaf_index
            # A sender whose acknowledgement was lost sends the batch again: same indices, no growth.
            again = stub.AppendBatch(request, timeout=30).appended
            assert [a.leaf_index for a in again] == [a.leaf_index for a in acked]
            stub.GetCheckpoint(ledger_pb2.GetCheckpointRequest(), timeout=10)
    finally:
        proc.terminate()
        # A bound, not a speed check: the graceful stop (5 s grace, then the core's final
        # checkpoint) took over 10 s at load averages of 20-30 on two cores.
        proc.wait(timeout=60)


# Loaded by the ledger process (PYTHONPATH) as sitecustomize: the first time its main thread waits
# on a threading.Event with no timeout while a Python SIGTERM handler is installed, a SIGTERM lands
# while that thread holds the Event's lock, as a real one does when the kernel delivers it between
# two of the thread's bytecodes inside Event.wait(). It happened under load: the ledger's handler
# called Event.set(), which waits for that same lock, and the process never exited.
SIGNAL_INSIDE_EVENT_WAIT = """
import os, signal, threading
_wait = threading.Event.wait
_fired = []
def wait(self, timeout=None):
    handler = signal.getsignal(signal.SIGTERM)
    if timeout is None and not _fired and threading.current_thread() is threading.main_thread() \\
            and callable(handler):
        _fired.append(True)
        with self._cond:
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(100))  # bytecodes: the Python handler runs between them
    return _wait(self, timeout)
threading.Event.wait = wait
"""


def test_sigterm_at_the_worst_moment_of_the_wait_stops_the_ledger_and_keeps_what_it_acknowledged(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SIGNAL_INSIDE_EVENT_WAIT)
    dsn = f"sqlite:///{tmp_path / 'ledger.db'}"
    port = free_port()
    proc = start_ledger_process(tmp_path, port, dsn, {"PYTHONPATH": str(site)})
    receipts = [Receipt("ab" * 32, "cd" * 32, "ef" * 32, "01" * 32, 1, i) for i in range(50)]
    try:
        with mesh_pki().channel(port, "ledger", "recommender") as ch:
            request = ledger_pb2.AppendBatchRequest(
                entries=[
                    ledger_pb2.AppendRequest(receipt=ledger_pb2.Receipt(**dataclasses.asdict(r))) for r in receipts
                ]
            )
            acked = ledger_pb2_grpc.LedgerStub(ch).AppendBatch(request, timeout=30).appended
        proc.terminate()
        # A bound, not a speed check: the stop has a 25 s deadline; before, this process never exited.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc = start_ledger_process(tmp_path, port, dsn)
    try:
        with mesh_pki().channel(port, "ledger", "recommender") as ch:
            stub = ledger_pb2_grpc.LedgerStub(ch)
            assert stub.GetCheckpoint(ledger_pb2.GetCheckpointRequest(), timeout=10).size == len(acked)
            for r, a in zip(receipts, acked, strict=True):
                bundle = stub.GetReceipt(ledger_pb2.GetReceiptRequest(receipt_id=r.receipt_id), timeout=10)
                assert bundle.leaf_index == a.leaf_index
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


# sitecustomize for a ledger whose stop never finishes: the main thread's first Thread.join blocks
# forever (core.close() joins the log's threads; nothing before the stop joins a thread there).
JOIN_HANGS = """
import threading
_join = threading.Thread.join
def join(self, timeout=None):
    if threading.current_thread() is threading.main_thread():
        threading.Event().wait()
    return _join(self, timeout)
threading.Thread.join = join
"""


def test_a_stop_that_hangs_ends_at_its_deadline_with_the_stacks_logged_or_at_a_second_signal(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(JOIN_HANGS)
    log = tmp_path / "ledger.log"
    env = {"PYTHONPATH": str(site), "CIPHERFEED_SHUTDOWN_DEADLINE_SECONDS": "3"}
    proc = start_ledger_process(tmp_path, free_port(), env=env, log_path=log)
    try:
        proc.terminate()
        assert proc.wait(timeout=60) == 1  # the watchdog's exit, not a clean stop
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "stopping on SIGTERM" in text
    assert "Thread 0x" in text and "in join" in text  # where it hung, for the operator
    proc = start_ledger_process(tmp_path, free_port(), env={"PYTHONPATH": str(site)})  # default deadline: 25 s
    try:
        proc.terminate()
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1)  # stuck in its stop (this bounds nothing: the next line decides)
        proc.send_signal(signal.SIGINT)  # an operator's second Ctrl-C
        assert proc.wait(timeout=20) == -signal.SIGINT
    finally:
        if proc.poll() is None:
            proc.kill()


def test_append_is_idempotent_within_a_batch_concurrently_and_across_a_restart(tmp_path, ledger_dsn):
    config = ledger_config(tmp_path, dsn=ledger_dsn)
    signer = LocalSigner(ORIGIN)
    core = build_core(config, signer, anchoring=False)
    try:
        assert [a.index for a in core.log.append_many([b"a", b"b"])] == [0, 1]
        again = core.log.append_many([b"b", b"c", b"c", b"a"])  # old, new, new twice in one batch, old
        assert [a.index for a in again] == [1, 2, 2, 0]
        assert [a.leaf_hash for a in again] == [leaf_hash(x) for x in (b"b", b"c", b"c", b"a")]
        with ThreadPoolExecutor(4) as pool:  # identical batches racing into one group commit
            raced = list(pool.map(core.log.append_many, [[b"d", b"e"]] * 8))
        assert all([a.index for a in r] == [3, 4] for r in raced)
        assert core.log.tree.size == 5
        first = core.log.checkpoint()
    finally:
        core.close()
    core = build_core(config, signer, anchoring=False)  # the index of a leaf is durable
    try:
        assert [a.index for a in core.log.append_many([b"e", b"f", b"a"])] == [4, 5, 0]
        assert [core.log.store.leaf(i) for i in range(core.log.tree.size)] == [b"a", b"b", b"c", b"d", b"e", b"f"]
        second = core.log.checkpoint()
        proof = core.consistency(first.size, second.size)
        verify_consistency(first.size, second.size, first.root, second.root, proof)
    finally:
        core.close()


def test_a_second_ledger_on_one_postgresql_database_is_refused(tmp_path, postgres_database):
    config = ledger_config(tmp_path, dsn=postgres_database())
    core = build_core(config, LocalSigner(ORIGIN), anchoring=False)
    try:  # two processes each holding its own tree would sign forks of one log
        with pytest.raises(RuntimeError, match="another ledger"):
            build_core(config, LocalSigner(ORIGIN), anchoring=False)
    finally:
        core.close()
    build_core(config, LocalSigner(ORIGIN), anchoring=False).close()  # once it stopped, another may start


class Anvil:
    def __init__(self, state: Path) -> None:
        if not ANVIL.exists():
            pytest.fail(
                f"anvil is missing at {ANVIL}: run scripts/bootstrap.sh (it installs @foundry-rs/anvil from npm)"
            )
        self.port = free_port()
        self.state = state
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(ANVIL), "--host", "127.0.0.1", "--port", str(self.port), "--state", str(self.state)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for line in self.proc.stdout:  # readiness from anvil's own output, no polling
            if "Listening on" in line:
                return
        raise RuntimeError("anvil exited before listening")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # anvil writes --state on exit
            self.proc.wait(timeout=20)
            self.proc = None


def test_anvil_over_json_rpc_stopped_and_restarted_anchors_every_checkpoint_once_in_order(tmp_path):
    anvil = Anvil(tmp_path / "anvil-state.json")
    anvil.start()
    config = ledger_config(tmp_path, chain_rpc_url=anvil.url)
    core = build_core(config, LocalSigner(ORIGIN), background_anchoring=False)
    try:
        log = core.log
        log.append_many([b"one", b"two", b"three"])
        log.checkpoint()
        assert core.anchorer.anchor_pending() == 1
        anvil.stop()  # the chain goes away mid-test
        for batch in ([b"four"], [b"five", b"six"], [b"seven"]):
            log.append_many(batch)
            log.checkpoint()
        with pytest.raises(Exception):  # noqa: B017 - any connection error: the node is down
            core.anchorer.anchor_pending()
        assert [a.confirmed for a in core.anchors(0)] == [True, False, False, False]  # queued, not lost
        anvil.start()
        assert core.anchorer.anchor_pending() == 3
        assert core.anchorer.anchor_pending() == 0  # nothing left, nothing resent
        w3 = Web3(Web3.HTTPProvider(anvil.url))
        contract = w3.eth.contract(address=core.anchorer.contract_address, abi=compiled_contract()["abi"])
        events = contract.events.Anchored().get_logs(from_block=0)
        assert [e["args"]["size"] for e in events] == [3, 4, 6, 7]
        assert [bytes(e["args"]["root"]) for e in events] == [a.root for a in core.anchors(0)]
        assert contract.functions.latest().call() == [7, log.tree.root(7)]
        gas = [w3.eth.get_transaction_receipt(e["transactionHash"])["gasUsed"] for e in events]
        assert all(g < 120_000 for g in gas)
        read_root = web3_chain_root(anvil.url)  # what `cipherfeed verify --chain-rpc` reads
        assert read_root(core.anchorer.contract_address, 6) == log.tree.root(6)
    finally:
        core.close()
        anvil.stop()


def run_verify(*args, home):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CIPHERFEED_CLIENT_HOME": str(home), **mesh_pki().env("device")}
    return subprocess.run(
        [sys.executable, "-m", "cipherfeed.cli", "verify", *args], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_verify_command_exit_status_names_the_failing_step(mesh, tmp_path):
    client, rec_core, ledger_core, _, signer = mesh
    s = client.score(np.eye(64)[9])
    settle(rec_core, ledger_core)
    ledger = ["--ledger", client.config.ledger_target, "--no-local-copy"]

    def pinned(home: Path, key: LocalSigner) -> Path:
        anchorer = ledger_core.anchorer
        trust.pin_anchors(
            trust.TrustAnchors(ORIGIN, (vkey(key.name, key.public_key),), int(anchorer.chain_id),
                               trust.checksum_address(anchorer.contract_address)), home)  # fmt: skip
        return home

    home = pinned(tmp_path / "client", signer)
    ok = run_verify(s.receipt_id, *ledger, "--trust-ledger-anchors", home=home)
    assert ok.returncode == 0, ok.stderr
    assert "inclusion leaf" in ok.stdout and "as reported by the ledger" in ok.stdout
    stranger = pinned(tmp_path / "stranger", LocalSigner(ORIGIN))
    bad_key = run_verify(s.receipt_id, *ledger, "--trust-ledger-anchors", home=stranger)
    assert bad_key.returncode == 12 and "signature" in bad_key.stderr
    unchecked = run_verify(s.receipt_id, *ledger, home=home)
    assert unchecked.returncode == 13 and "--chain-rpc" in unchecked.stderr
    unknown = run_verify("ab" * 32, *ledger, "--trust-ledger-anchors", home=home)
    assert unknown.returncode == 3 and "NOT_FOUND" in unknown.stderr
    # A receipt kept by the client that differs from the ledger's copy is refused.
    kept = dataclasses.replace(s.receipt, unix_millis=s.receipt.unix_millis + 1)
    (home / "receipts").mkdir()
    (home / "receipts" / f"{s.receipt_id}.json").write_text(json.dumps(dataclasses.asdict(kept)))
    differs = run_verify(s.receipt_id, *ledger, "--trust-ledger-anchors", home=home)
    assert differs.returncode == 10 and "receipt" in differs.stderr
