"""Nothing acknowledged is lost: receipts written while the ledger is down, or left in the spool
by a recommender that stopped, reach the log once a ledger answers; a full backlog refuses Scores."""

import dataclasses

import grpc
import numpy as np
import pytest

from cipherfeed.devredis import free_port
from services.ledger.server import serve as serve_ledger
from services.ledger.signers import LocalSigner
from services.recommender.server import serve as serve_recommender
from tests.conftest import client_for, recommender_config
from tests.test_ledger import ORIGIN, ledger_config


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
