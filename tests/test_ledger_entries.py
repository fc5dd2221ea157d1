"""GetEntries, the log browser's read: pages of the latest checkpoint's tree, model records in full
(each verifiably included), receipts listed only as such (their ids are their holders' to look up),
nothing beyond the checkpoint, bounded pages, precise refusals; callable by the gateway and devices."""

from __future__ import annotations

import grpc
import pytest

from cipherfeed.errors import Reason
from cipherfeed.grpcutil import reason_of
from cipherfeed.merkle import leaf_hash, verify_inclusion
from cipherfeed.receipts import ModelRecord, Receipt
from cipherfeed.v1 import ledger_pb2, ledger_pb2_grpc
from tests.conftest import mesh_pki
from tests.test_ledger import LedgerOnLoopback


def test_entries_list_models_in_full_and_receipts_only_as_such(tmp_path):
    ledger = LedgerOnLoopback(tmp_path / "ledger")
    gateway = mesh_pki().channel(ledger.port, "ledger", "gateway")
    stub = ledger_pb2_grpc.LedgerStub(gateway)
    try:
        with pytest.raises(grpc.RpcError) as empty:
            stub.GetEntries(ledger_pb2.GetEntriesRequest(), timeout=20)
        assert reason_of(empty.value) == Reason.NO_CHECKPOINT
        model = ModelRecord("ab" * 32, "recommender@test", 26558, 1_700_000_000_000)
        receipts = [Receipt(f"{n:064x}", "bb" * 32, "ab" * 32, "cd" * 32, 1, n) for n in range(300)]
        ledger.core.append([model, *receipts[:150]])
        ledger.core.append([ModelRecord("ef" * 32, "recommender@test", 10, 5), *receipts[150:]])
        # Leaves of no kind the ledger knows (another writer, an older format): listed as such.
        odd = [b"not json", b'{"type":"cipherfeed.model.v1","item_count":"many"}', b"[1]"]
        ledger.core.log.append_many(odd)
        checkpoint = ledger.core.log.checkpoint()
        assert checkpoint is not None and checkpoint.size == 305
        ledger.core.append([Receipt("ee" * 32, "bb" * 32, "ab" * 32, "cd" * 32, 1, 9)])  # not checkpointed

        reply = stub.GetEntries(ledger_pb2.GetEntriesRequest(start_index=0, count=256), timeout=20)
        assert reply.checkpoint_size == 305 and [e.leaf_index for e in reply.entries] == list(range(256))
        kinds = [e.WhichOneof("entry") for e in reply.entries]
        assert kinds[0] == "model" and kinds[151] == "model" and kinds.count("receipt") == 254
        assert all(e.receipt for e in reply.entries if e.WhichOneof("entry") == "receipt")
        first = reply.entries[0].model
        listed = ModelRecord(first.model_version, first.created_by, first.item_count, first.unix_millis)
        assert listed == model
        proof = stub.GetInclusionProof(ledger_pb2.GetInclusionProofRequest(leaf_index=0, tree_size=305), timeout=20)
        verify_inclusion(0, 305, leaf_hash(listed.leaf()), list(proof.hashes), checkpoint.root)
        # No receipt's id, hash or field is in the listing: only that a receipt is there.
        raw = reply.SerializeToString()
        assert not any(bytes.fromhex(r.receipt_id) in raw or r.query_sha256.encode() in raw for r in receipts)

        tail = stub.GetEntries(ledger_pb2.GetEntriesRequest(start_index=290), timeout=20)
        assert [e.leaf_index for e in tail.entries] == list(range(290, 305))  # the checkpoint's tree only
        assert [e.WhichOneof("entry") for e in tail.entries[-3:]] == ["other"] * 3
        assert all(e.other for e in tail.entries[-3:])
        assert list(stub.GetEntries(ledger_pb2.GetEntriesRequest(start_index=2**64 - 1), timeout=20).entries) == []
        with pytest.raises(grpc.RpcError) as large:
            stub.GetEntries(ledger_pb2.GetEntriesRequest(count=257), timeout=20)
        assert large.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason_of(large.value) == Reason.COUNT_LIMIT
        with mesh_pki().channel(ledger.port, "ledger", "device") as device:  # devices may browse too
            assert (
                len(ledger_pb2_grpc.LedgerStub(device).GetEntries(ledger_pb2.GetEntriesRequest(), timeout=20).entries)
                == 100
            )
    finally:
        gateway.close()
        ledger.close()
