"""Nothing acknowledged is lost: receipts written while the ledger is down, or left in the spool
by a recommender that stopped, reach the log once a ledger answers; a full backlog refuses Scores."""

import dataclasses
import json
import sqlite3
import threading

import grpc
import numpy as np
import pytest

from cipherfeed.devredis import free_port
from cipherfeed.receipts import Receipt
from cipherfeed.v1 import ledger_pb2_grpc
from services.ledger.server import serve as serve_ledger
from services.ledger.signers import LocalSigner
from services.recommender import receipts as receipts_module
from services.recommender.receipts import ReceiptSpool
from services.recommender.server import serve as serve_recommender
from tests.conftest import client_for, recommender_config
from tests.test_ledger import ORIGIN, LedgerOnLoopback, ledger_config


def start_recommender(tiktok_model, keyservice, tmp_path, ledger_port, spool_max=1000):
    config = dataclasses.replace(
        recommender_config(tmp_path, keyservice[0], None),
        ledger_target=f"127.0.0.1:{ledger_port}",
        receipt_spool_max=spool_max,
    )
    return serve_recommender(config, tiktok_model)


def test_receipts_outlive_a_ledger_outage_and_a_recommender_restart(tiktok_model, keyservice, tmp_path):
    ledger_port = free_port()  # nothing listens there yet: the ledger is down
    rec, core = start_recommender(tiktok_model, keyservice, tmp_path, ledger_port)
    client = client_for(rec.port, keyservice[0], tmp_path / "client")
    client.use_keys()
    client.register()
    first = [client.score(np.eye(64)[i]).receipt_id for i in range(3)]
    assert core.receipts.pending >= 3  # model record + receipts, all waiting
    rec.stop(grace=1)
    core.close()  # the recommender goes away with receipts still spooled on disk

    ledger, ledger_core = serve_ledger(
        dataclasses.replace(ledger_config(tmp_path / "ledger"), listen=f"127.0.0.1:{ledger_port}"),
        signer=LocalSigner(ORIGIN),
        background_anchoring=False,
    )
    rec, core = start_recommender(tiktok_model, keyservice, tmp_path, ledger_port)  # same state dir
    try:
        client.close()
        client = client_for(rec.port, keyservice[0], tmp_path / "client")
        client.use_keys()
        client.register()
        later = client.score(np.eye(64)[3]).receipt_id
        assert core.receipts.flush(timeout=60)  # a condition wait, bounded: no sleep
        ledger_core.log.checkpoint()
        assert ledger_core.anchorer.anchor_pending() >= 1
        for receipt_id in [*first, later]:
            bundle = ledger_core.bundle(receipt_id)
            assert bundle.receipt.receipt_id == receipt_id
        assert all(a.confirmed for a in ledger_core.anchors(0))
    finally:
        client.close()
        rec.stop(grace=1)
        core.close()
        ledger.stop(grace=1)
        ledger_core.close()


def test_a_full_backlog_refuses_scores_instead_of_dropping_receipts(tiktok_model, keyservice, tmp_path):
    rec, core = start_recommender(tiktok_model, keyservice, tmp_path, free_port(), spool_max=3)
    client = client_for(rec.port, keyservice[0], tmp_path / "client")
    try:
        client.use_keys()
        client.register()
        for i in range(2):  # the model record took the first place in the spool
            client.score(np.eye(64)[i])
        with pytest.raises(grpc.RpcError) as info:
            client.score(np.eye(64)[2])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "backlog" in info.value.details()
        assert core.receipts.pending == 3
    finally:
        client.close()
        rec.stop(grace=1)
        core.close()


# --- the spool's sender on its own, against a ledger on loopback -----------------------------


def receipt(i: int) -> Receipt:
    return Receipt("aa" * 32, "bb" * 32, "cc" * 32, "dd" * 32, 1, i)


def test_a_corrupt_spool_row_is_quarantined_once_and_delivery_goes_on(tmp_path, caplog):
    spool_path = tmp_path / "spool.db"
    with sqlite3.connect(spool_path) as db:  # rows as a damaged disk or an older build left them
        db.executescript(receipts_module.SCHEMA)
        rows = [
            ("receipt", json.dumps(dataclasses.asdict(receipt(0))).encode()),
            ("receipt", b"{not json"),
            ("receipt", json.dumps({**dataclasses.asdict(receipt(1)), "extra": 1}).encode()),
            ("bogus", json.dumps(dataclasses.asdict(receipt(2))).encode()),
            ("receipt", json.dumps(dataclasses.asdict(receipt(3))).encode()),
        ]
        db.executemany("INSERT INTO spool (kind, payload) VALUES (?, ?)", rows)
    ledger = LedgerOnLoopback(tmp_path / "ledger")
    spool = ReceiptSpool(spool_path, ledger.stub, max_pending=100)
    try:
        for i in (4, 5):
            spool.put(receipt(i))
        assert spool.flush(timeout=60)
        assert spool._thread.is_alive()
        assert (spool.sent, spool.quarantined, spool.pending) == (4, 3, 0)
        for i in (0, 3, 4, 5):
            ledger.core.log.locate(receipt(i).receipt_id)
        assert ledger.core.log.tree.size == 4
        spool.put(receipt(6))  # and it keeps delivering
        assert spool.flush(timeout=60) and spool.sent == 5
    finally:
        spool.close()
        ledger.close()
    with sqlite3.connect(spool_path) as db:  # kept for an operator, not dropped
        kept = db.execute("SELECT seq, kind, payload FROM quarantine ORDER BY seq").fetchall()
    assert [(kind, bytes(payload)) for _, kind, payload in kept] == rows[1:4]
    assert sum("moved to the quarantine table" in r.getMessage() for r in caplog.records) == 3


class StuckLedger(ledger_pb2_grpc.LedgerServicer):
    """Holds AppendBatch until released: the sender is inside the call when close() comes."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def AppendBatch(self, request, context):
        self.entered.set()
        self.release.wait(timeout=120)
        context.abort(grpc.StatusCode.UNAVAILABLE, "released")


def test_close_cancels_the_batch_in_flight_and_waits_for_the_sender(tmp_path):
    stuck = StuckLedger()
    ledger = LedgerOnLoopback(tmp_path / "stuck", servicer=stuck)
    spool = ReceiptSpool(tmp_path / "spool.db", ledger.stub, max_pending=100, deadline=120)
    try:
        spool.put(receipt(0))
        assert stuck.entered.wait(timeout=60)
        spool.close()
        assert not spool._thread.is_alive()  # it did not outlive the database it writes to
        assert (spool.sent, spool.pending) == (0, 1)  # unacknowledged: still spooled
    finally:
        stuck.release.set()
        ledger.close()
    real = LedgerOnLoopback(tmp_path / "ledger")
    again = ReceiptSpool(tmp_path / "spool.db", real.stub, max_pending=100)
    try:
        assert again.flush(timeout=60) and again.sent == 1  # the cancelled batch was still spooled
        real.core.log.locate(receipt(0).receipt_id)
    finally:
        again.close()
        real.close()


def test_a_row_the_ledger_refuses_is_isolated_and_quarantined(tmp_path):
    spool_path = tmp_path / "spool.db"
    too_big = dataclasses.replace(receipt(1), model_version="f" * 20_000)  # a leaf over the ledger's 16 KiB
    ledger = LedgerOnLoopback(tmp_path / "ledger")
    spool = ReceiptSpool(spool_path, ledger.stub, max_pending=100)
    try:
        for r in (receipt(0), too_big, *(receipt(i) for i in range(2, 7))):
            spool.put(r)
        assert spool.flush(timeout=60)
        assert (spool.sent, spool.quarantined) == (6, 1)
        assert [ledger.core.log.locate(receipt(i).receipt_id)[0] for i in (0, 2, 6)] == [0, 1, 5]
    finally:
        spool.close()
        ledger.close()
    with sqlite3.connect(spool_path) as db:
        (reason,) = db.execute("SELECT reason FROM quarantine").fetchone()
    assert reason.startswith("refused by the ledger")
