"""Faults under load, with real processes: the mesh of `cipherfeed mesh up` (Redis, an anvil
chain, key service, a ledger on PostgreSQL, recommender, each its own process) while two devices
score by profile without pause, and one part at a time is killed and started again.

What must hold, checked after every fault: every request either succeeded or got UNAVAILABLE and
then succeeded when retried; every decrypted answer equals plaintext scoring with the model (no
client ever got a wrong answer); every acknowledged receipt is in the log exactly once, under a
signed checkpoint whose root is anchored on the chain, verified against the pinned trust alone;
the recommender's spool is drained; and the stores pass their integrity checks (the ledger's tree
recomputed against its checkpoints and anchors, the anchors on the chain one per size in order,
the key service's records under its master key).

Waiting is on conditions (counters of the load, health, the ledger's answers), with deadlines.
"""

from __future__ import annotations

import io
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from web3 import Web3

from cipherfeed import trust as trustfile
from cipherfeed.cli import Web3Chain
from cipherfeed.client.sdk import RecommenderClient
from cipherfeed.client.verify import fetch_and_verify
from cipherfeed.config import ClientConfig, GrpcLimits
from cipherfeed.he.packing import plaintext_scores
from cipherfeed.mesh import MeshOptions, ProcessMesh
from cipherfeed.receipts import Receipt
from cipherfeed.v1 import ledger_pb2_grpc
from services.keyservice.envelope import MasterKey
from services.keyservice.integrity import check_key_store
from services.keyservice.store import KeyStore
from services.ledger.anchor import compiled_contract
from services.ledger.integrity import LedgerIntegrity, check_chain, check_store, unique_leaves
from services.ledger.store import LedgerStore

CLIENTS = 2
PER_PHASE = 3  # successes before the fault, requests while it lasts, successes after it
RETRY_FOR = 120.0  # seconds a request is retried on UNAVAILABLE before the test calls it lost


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.05)


@dataclass
class Device:
    client: RecommenderClient
    u: np.ndarray
    expected: np.ndarray


@dataclass
class Load:
    """Devices scoring by profile until stopped; each request retried on UNAVAILABLE only."""

    devices: list[Device]
    successes: int = 0
    attempts: int = 0
    unavailable: int = 0
    receipts: list[Receipt] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # any status but UNAVAILABLE: not allowed
    lock: threading.Lock = field(default_factory=threading.Lock)
    fresh: bool = False  # a new profile (a fresh ciphertext) per request: no answer from the result cache

    def request(self, device: Device) -> None:
        deadline = time.monotonic() + RETRY_FOR
        while True:
            with self.lock:
                self.attempts += 1
            try:
                if self.fresh:
                    device.client.upload_profile(device.u)
                scored = device.client.score(device.u, use_profile=True)
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    with self.lock:
                        self.refused.append(f"{exc.code().name}: {exc.details()}")
                    return
                with self.lock:
                    self.unavailable += 1
                if time.monotonic() > deadline:
                    with self.lock:
                        self.refused.append(f"still UNAVAILABLE after {RETRY_FOR:.0f} s: {exc.details()}")
                    return
                time.sleep(0.2)  # retry backoff (not synchronisation)
                continue
            error = float(np.max(np.abs(scored.scores - device.expected)))
            with self.lock:
                if error > 1e-3:
                    self.wrong.append(f"max |error| {error:.3g}")
                self.successes += 1
                if scored.receipt is not None:
                    self.receipts.append(scored.receipt)
            return

    def run(self, stop: threading.Event) -> list[threading.Thread]:
        def loop(device: Device) -> None:
            while not stop.is_set():
                self.request(device)

        threads = [threading.Thread(target=loop, args=(d,), daemon=True) for d in self.devices]
        for t in threads:
            t.start()
        return threads


@dataclass
class FaultMesh:
    mesh: ProcessMesh
    devices: list[Device]
    trust: trustfile.TrustAnchors
    log: io.StringIO
    postgres: Postgres

    @property
    def state(self) -> Path:
        return self.mesh.options.state_dir

    @property
    def chain_url(self) -> str:
        return f"http://127.0.0.1:{self.mesh.children['anvil'].port}"


class Postgres:
    """A PostgreSQL server of its own (the pgserver wheel), crashed by an immediate stop."""

    def __init__(self, datadir: Path) -> None:
        import pgserver

        self.pg_ctl = pgserver.pg_ctl
        self.server = pgserver.get_server(str(datadir), cleanup_mode="stop")
        self.server.psql("CREATE DATABASE ledger;")
        self.dsn = str(self.server.get_uri("ledger"))
        self.socket_dir = self.server.get_postmaster_info().socket_dir

    def crash(self) -> None:
        # Immediate mode: every backend quits at once, no shutdown checkpoint; start-up then
        # runs crash recovery from the WAL, as after a power cut.
        self.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        from pgserver.utils import PostmasterInfo

        # pg_ctl itself, with a deadline for crash recovery on a loaded machine (pgserver's own
        # start allows 10 s); the same socket directory, so the ledger's DSN holds.
        args = ["-w", "-t", "300", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.server.log), "start"]
        self.pg_ctl(args, pgdata=self.server.pgdata, user=self.server.system_user, timeout=330)
        self.server._postmaster_info = PostmasterInfo.read_from_pgdata(self.server.pgdata)
        assert str(self.server.get_uri("ledger")) == self.dsn

    def stop(self) -> None:
        self.server.cleanup()


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory):
    pytest.importorskip("pgserver", reason="pgserver is a dev dependency; run scripts/bootstrap.sh")
    server = Postgres(tmp_path_factory.mktemp("fault-pg"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fault_mesh(tiktok_model, tmp_path_factory, postgres_server):
    state = tmp_path_factory.mktemp("fault-mesh")
    model_path = state / "model.cfmodel"
    tiktok_model.save(model_path)
    options = MeshOptions(
        state_dir=state,
        chain="anvil",
        ephemeral_ports=True,
        log_format="json",
        gateway=False,
        model_path=model_path,
        ledger_dsn=postgres_server.dsn,
        checkpoint_interval=0.5,
        extra_env={"CIPHERFEED_SCORE_RATE_PER_SECOND": "1000", "CIPHERFEED_SCORE_BURST": "1000"},
        startup_timeout=300,
    )
    out = io.StringIO()
    mesh = ProcessMesh(options, out)
    devices: list[Device] = []
    try:
        mesh.up()
        base = ClientConfig(
            target=mesh.target("recommender"),
            keyservice_target=mesh.target("keyservice"),
            ledger_target=mesh.target("ledger"),
            deadline_seconds=60,
            limits=GrpcLimits(),
            tls=mesh.tls("device"),
        )
        rng = np.random.default_rng(13)
        for n in range(CLIENTS):
            client = RecommenderClient(replace(base, home=state / f"device{n}"))
            client.wait_ready(timeout=30)
            client.use_keys()
            client.register()
            u = rng.normal(size=tiktok_model.embeddings.shape[1])
            u /= np.linalg.norm(u)
            expected = plaintext_scores(
                tiktok_model.embeddings, u, tiktok_model.popularity, tiktok_model.popularity_weight
            )
            devices.append(Device(client, u, expected))
        trust = trustfile.pin(mesh.trust_file, state / "device0")
        yield FaultMesh(mesh, devices, trust, out, postgres_server)
    finally:
        for d in devices:
            d.client.close()
        mesh.down()


def wait_receipts_delivered(
    device: RecommenderClient, trust: trustfile.TrustAnchors, chain_url: str, load: Load, state: Path
) -> None:
    """No wrong answer and no refusal in ``load``; every receipt it was given verified down to its
    anchor, trusting only ``trust``; the recommender's spool drained with nothing quarantined."""
    assert not load.wrong, load.wrong
    assert not load.refused, load.refused
    assert load.receipts
    ledger = ledger_pb2_grpc.LedgerStub(device.ledger_channel())
    chain = Web3Chain(chain_url)
    pending = {r.receipt_id: r for r in load.receipts}

    def all_verified() -> bool:
        for receipt_id, receipt in list(pending.items()):
            try:
                fetch_and_verify(receipt_id, ledger, trust, chain, 10, receipt)
            except Exception:  # not yet delivered, checkpointed or anchored
                return False
            del pending[receipt_id]
        return True

    wait_until(all_verified, 120, f"{len(pending)} acknowledged receipts in the log, signed and anchored")
    spool = sqlite3.connect(state / "recommender" / "receipt-spool.db")
    try:
        wait_until(lambda: spool.execute("SELECT COUNT(*) FROM spool").fetchone()[0] == 0, 60, "the spool drained")
        assert spool.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0] == 0
    finally:
        spool.close()


def check_log_holds_each_once(store: LedgerStore, trust: trustfile.TrustAnchors, load: Load) -> LedgerIntegrity:
    """Every acknowledged receipt is one leaf of the log, exactly once; the store's own check."""
    counts = unique_leaves(store, [bytes.fromhex(r.receipt_id) for r in load.receipts])
    assert set(counts.values()) == {1}, "an acknowledged receipt is not in the log exactly once"
    return check_store(store, trust.verifiers, trust.log_origin)


def check_everything_after(fm: FaultMesh, load: Load) -> None:
    """The invariants of the module docstring, for the receipts ``load`` was given."""
    wait_receipts_delivered(fm.devices[0].client, fm.trust, fm.chain_url, load, fm.state)
    store = LedgerStore(fm.postgres.dsn, serving=False)
    try:
        report = check_log_holds_each_once(store, fm.trust, load)
        w3 = Web3(Web3.HTTPProvider(fm.chain_url))
        contract = w3.eth.contract(address=fm.trust.anchor_contract, abi=compiled_contract()["abi"])
        check_chain(store, contract, report)
    finally:
        store.close()
    assert report.ok, report.problems
    assert report.leaves > 0 and report.anchors_confirmed > 0 and report.onchain_anchors == report.anchors_confirmed

    keys = KeyStore(f"sqlite:///{fm.state / 'keyservice' / 'keyservice.db'}")
    try:
        ks_report = check_key_store(keys, MasterKey.load(None, fm.state / "keyservice"))
    finally:
        keys.close()
    assert ks_report.ok, ks_report.problems
    assert ks_report.keys >= CLIENTS and ks_report.signing_keys >= 1


def break_and_mend(fm: FaultMesh, kill: Callable[[], None], mend: Callable[[], None]) -> Load:
    load = Load(fm.devices)
    stop = threading.Event()
    threads = load.run(stop)
    try:
        wait_until(lambda: load.successes >= PER_PHASE, 120, "successes before the fault")
        kill()
        during = load.attempts
        wait_until(lambda: load.attempts >= during + PER_PHASE, 120, "requests while the part is down")
        mend()
        after = load.successes
        wait_until(lambda: load.successes >= after + PER_PHASE, 180, "successes after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=RETRY_FOR + 60)
    print(f"load: {load.successes} answers, {load.unavailable} UNAVAILABLE retried, {len(load.receipts)} receipts")
    return load


@pytest.mark.parametrize("part", ["redis", "keyservice", "ledger", "recommender"])
def test_a_killed_service_restarted_under_load_loses_and_corrupts_nothing(fault_mesh, part):
    mesh = fault_mesh.mesh
    load = break_and_mend(fault_mesh, lambda: mesh.kill(part), lambda: mesh.restart(part))
    check_everything_after(fault_mesh, load)


def test_the_ledger_database_crashed_and_restarted_under_load_loses_and_corrupts_nothing(fault_mesh):
    pg = fault_mesh.postgres
    load = break_and_mend(fault_mesh, pg.crash, pg.start)
    check_everything_after(fault_mesh, load)
    ledger_log = (fault_mesh.state / "mesh" / "logs" / "ledger.log").read_text()
    assert "reconnected to the database" in ledger_log  # the same ledger process, a new connection


def test_the_chain_node_stopped_and_restarted_under_load_anchors_every_checkpoint_once(fault_mesh):
    anvil = fault_mesh.mesh.children["anvil"]
    # anvil keeps its chain only in the --state file it writes when it stops (SIGTERM): a SIGKILL
    # would give a new chain, which the ledger handles as a replaced chain, not as an outage.
    load = break_and_mend(fault_mesh, anvil.stop, lambda: fault_mesh.mesh.restart("anvil"))
    check_everything_after(fault_mesh, load)
