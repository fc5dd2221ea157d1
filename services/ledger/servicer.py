"""gRPC transport for the ledger."""

from __future__ import annotations

import grpc

from cipherfeed.errors import invalid
from cipherfeed.grpcutil import grpc_errors
from cipherfeed.receipts import ModelRecord, Receipt
from cipherfeed.v1 import ledger_pb2, ledger_pb2_grpc
from services.ledger.core import LedgerCore
from services.ledger.store import CheckpointRow

Ctx = grpc.ServicerContext


def receipt_from_proto(r: ledger_pb2.Receipt) -> Receipt:
    return Receipt(
        query_sha256=r.query_sha256,
        response_sha256=r.response_sha256,
        model_version=r.model_version,
        key_id=r.key_id,
        key_version=r.key_version,
        unix_millis=r.unix_millis,
    )


def receipt_to_proto(r: Receipt) -> ledger_pb2.Receipt:
    return ledger_pb2.Receipt(
        query_sha256=r.query_sha256,
        response_sha256=r.response_sha256,
        model_version=r.model_version,
        key_id=r.key_id,
        key_version=r.key_version,
        unix_millis=r.unix_millis,
    )


def entry_from_proto(e: ledger_pb2.AppendRequest) -> Receipt | ModelRecord:
    which = e.WhichOneof("entry")
    if which == "receipt":
        return receipt_from_proto(e.receipt)
    if which == "model":
        m = e.model
        return ModelRecord(m.model_version, m.created_by, m.item_count, m.unix_millis)
    raise invalid("entry", "an entry is a receipt or a model record")


class LedgerServicer(ledger_pb2_grpc.LedgerServicer):
    def __init__(self, core: LedgerCore) -> None:
        self.core = core

    def _checkpoint(self, row: CheckpointRow) -> ledger_pb2.Checkpoint:
        return ledger_pb2.Checkpoint(
            origin=self.core.log.origin,
            size=row.size,
            root_hash=row.root,
            signed_note=row.note,
            verifier_keys=self.core.verifier_keys(),
        )

    @grpc_errors
    def Append(self, request: ledger_pb2.AppendRequest, context: Ctx) -> ledger_pb2.AppendResponse:
        (appended,) = self.core.append([entry_from_proto(request)])
        return ledger_pb2.AppendResponse(receipt_id=appended.leaf_hash.hex(), leaf_index=appended.index)

    @grpc_errors
    def AppendBatch(self, request: ledger_pb2.AppendBatchRequest, context: Ctx) -> ledger_pb2.AppendBatchResponse:
        appended = self.core.append([entry_from_proto(e) for e in request.entries])
        return ledger_pb2.AppendBatchResponse(
            appended=[ledger_pb2.AppendResponse(receipt_id=a.leaf_hash.hex(), leaf_index=a.index) for a in appended]
        )

    @grpc_errors
    def GetCheckpoint(self, request: ledger_pb2.GetCheckpointRequest, context: Ctx) -> ledger_pb2.Checkpoint:
        return self._checkpoint(self.core.latest_checkpoint())

    @grpc_errors
    def GetInclusionProof(
        self, request: ledger_pb2.GetInclusionProofRequest, context: Ctx
    ) -> ledger_pb2.InclusionProof:
        size, hashes = self.core.inclusion(request.leaf_index, request.tree_size)
        return ledger_pb2.InclusionProof(leaf_index=request.leaf_index, tree_size=size, hashes=hashes)

    @grpc_errors
    def GetConsistencyProof(
        self, request: ledger_pb2.GetConsistencyProofRequest, context: Ctx
    ) -> ledger_pb2.ConsistencyProof:
        hashes = self.core.consistency(request.first_size, request.second_size)
        return ledger_pb2.ConsistencyProof(
            first_size=request.first_size, second_size=request.second_size, hashes=hashes
        )

    @grpc_errors
    def GetAnchors(self, request: ledger_pb2.GetAnchorsRequest, context: Ctx) -> ledger_pb2.GetAnchorsResponse:
        return ledger_pb2.GetAnchorsResponse(
            anchors=[
                ledger_pb2.Anchor(
                    size=a.size,
                    root_hash=a.root,
                    chain_id=a.chain_id or "",
                    contract_address=a.contract or "",
                    transaction_hash=a.tx_hash or "",
                    block_number=a.block_number or 0,
                    confirmed=a.confirmed,
                )
                for a in self.core.anchors(request.min_size)
            ]
        )

    @grpc_errors
    def GetReceipt(self, request: ledger_pb2.GetReceiptRequest, context: Ctx) -> ledger_pb2.ReceiptBundle:
        b = self.core.bundle(request.receipt_id)
        return ledger_pb2.ReceiptBundle(
            receipt=receipt_to_proto(b.receipt),
            leaf_index=b.leaf_index,
            inclusion=ledger_pb2.InclusionProof(
                leaf_index=b.leaf_index, tree_size=b.checkpoint.size, hashes=b.inclusion
            ),
            checkpoint=self._checkpoint(b.checkpoint),
        )

    @grpc_errors
    def GetEntries(self, request: ledger_pb2.GetEntriesRequest, context: Ctx) -> ledger_pb2.GetEntriesResponse:
        size, entries = self.core.entries(request.start_index, request.count)
        reply = ledger_pb2.GetEntriesResponse(checkpoint_size=size)
        for index, model in entries:
            if model == "receipt":
                reply.entries.add(leaf_index=index, receipt=True)
            elif isinstance(model, str):
                reply.entries.add(leaf_index=index, other=True)
            else:
                reply.entries.add(
                    leaf_index=index,
                    model=ledger_pb2.ModelRecord(
                        model_version=model.model_version,
                        created_by=model.created_by,
                        item_count=model.item_count,
                        unix_millis=model.unix_millis,
                    ),
                )
        return reply
