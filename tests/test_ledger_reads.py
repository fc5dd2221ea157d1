"""Reads of the log do not need the key service: with it killed (and with the ledger restarted
while it is down) checkpoints and receipt bundles still answer, with the verifier keys kept."""

import signal

import grpc

from cipherfeed.checkpoint import Verifier, verify_checkpoint
from cipherfeed.devprocess import start_service
from cipherfeed.devredis import free_port
from cipherfeed.receipts import Receipt
from cipherfeed.v1 import ledger_pb2
from tests.conftest import mesh_pki
from tests.test_ledger import ORIGIN, LedgerOnLoopback


def start_keyservice(tmp_path, master_key_file, port):
    return start_service(
        "services.keyservice.server",
        {
            "CIPHERFEED_KEYSERVICE_LISTEN": f"127.0.0.1:{port}",
            "CIPHERFEED_KEYSERVICE_DSN": f"sqlite:///{tmp_path / 'keyservice.db'}",
            "CIPHERFEED_MASTER_KEY_FILE": str(master_key_file),
            "CIPHERFEED_STATE_DIR": str(tmp_path),
            "CIPHERFEED_REDIS_URL": "",
            **mesh_pki().env("keyservice"),
        },
    )


def read_everything(stub, receipt_id):
    checkpoint = stub.GetCheckpoint(ledger_pb2.GetCheckpointRequest(), timeout=20)
    bundle = stub.GetReceipt(ledger_pb2.GetReceiptRequest(receipt_id=receipt_id), timeout=20)
    return checkpoint, bundle


def test_ledger_reads_answer_while_the_key_service_is_down(tmp_path, master_key_file):
    port = free_port()
    keyservice = start_keyservice(tmp_path, master_key_file, port)
    config = dict(signer="keyservice", keyservice_target=f"127.0.0.1:{port}")
    receipt = Receipt("aa" * 32, "bb" * 32, "cc" * 32, "dd" * 32, 1, 7)
    ledger = LedgerOnLoopback(tmp_path / "ledger", **config)
    try:
        ledger.core.log.append_many([receipt.leaf()])
        assert ledger.core.log.checkpoint() is not None  # signed by the key service
        before = read_everything(ledger.stub, receipt.receipt_id)
        keyservice.send_signal(signal.SIGKILL)
        keyservice.wait(timeout=20)
        after = read_everything(ledger.stub, receipt.receipt_id)
        assert after == before
    finally:
        ledger.close()
    restarted = LedgerOnLoopback(tmp_path / "ledger", **config)  # started while the key service is down
    try:
        checkpoint, bundle = read_everything(restarted.stub, receipt.receipt_id)
        assert (checkpoint, bundle) == before
        verifiers = [Verifier.from_vkey(k) for k in checkpoint.verifier_keys]
        assert verify_checkpoint(checkpoint.signed_note, verifiers, origin=ORIGIN).size == 1
        with mesh_pki().channel(port, "keyservice", "operator") as ch:  # and it really is down
            try:
                grpc.channel_ready_future(ch).result(timeout=0.5)
                raise AssertionError("the key service answered")
            except grpc.FutureTimeoutError:
                pass
    finally:
        restarted.close()
        if keyservice.poll() is None:
            keyservice.kill()
            keyservice.wait()
