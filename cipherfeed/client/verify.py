"""Offline verification of a receipt: leaf -> inclusion proof -> signed checkpoint -> on-chain anchor.

Each step raises ``VerificationError`` naming the step, so a caller (or the CLI's exit status) can
say exactly which link failed. The anchor step accepts the checkpoint's own root on chain, or a
later anchored root together with a consistency proof from the checkpoint to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cipherfeed.checkpoint import Checkpoint, NoteError, Verifier, verify_checkpoint
from cipherfeed.merkle import ProofError, leaf_hash, verify_consistency, verify_inclusion
from cipherfeed.receipts import Receipt

if TYPE_CHECKING:
    from cipherfeed.v1 import ledger_pb2_grpc

STEPS = ("receipt", "inclusion", "signature", "anchor")
EXIT_CODES = {"receipt": 10, "inclusion": 11, "signature": 12, "anchor": 13}


class VerificationError(Exception):
    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.exit_code = EXIT_CODES[step]


@dataclass(frozen=True)
class AnchorEvidence:
    """An anchored size and the root the chain holds for it."""

    size: int
    onchain_root: bytes
    source: str  # e.g. "chain 31337 contract 0x... block 12"


@dataclass(frozen=True)
class Verified:
    receipt: Receipt
    leaf_index: int
    checkpoint: Checkpoint
    anchor: AnchorEvidence


def verify_receipt(
    receipt: Receipt,
    expected_id: str,
    leaf_index: int,
    inclusion: list[bytes],
    note: str,
    verifiers: Iterable[Verifier],
    origin: str,
    anchors: Callable[[int], list[AnchorEvidence]],
    consistency: Callable[[int, int], list[bytes]],
) -> Verified:
    """``anchors(size)`` returns on-chain evidence for sizes >= size (smallest first);
    ``consistency(a, b)`` fetches a consistency proof (it is checked, not trusted)."""
    h = leaf_hash(receipt.leaf())
    if h.hex() != expected_id:
        raise VerificationError("receipt", "the receipt's fields do not hash to its id")
    try:
        checkpoint = verify_checkpoint(note, verifiers, origin=origin)
    except NoteError as exc:
        raise VerificationError("signature", str(exc)) from None
    try:
        verify_inclusion(leaf_index, checkpoint.size, h, inclusion, checkpoint.root)
    except ProofError as exc:
        raise VerificationError("inclusion", str(exc)) from None
    evidence = anchors(checkpoint.size)
    if not evidence:
        raise VerificationError("anchor", f"no anchor on chain at or after size {checkpoint.size} yet")
    first = evidence[0]
    if first.size == checkpoint.size:
        if first.onchain_root != checkpoint.root:
            raise VerificationError("anchor", "the chain holds another root for this checkpoint's size")
    else:
        try:
            proof = consistency(checkpoint.size, first.size)
            verify_consistency(checkpoint.size, first.size, checkpoint.root, first.onchain_root, proof)
        except ProofError as exc:
            raise VerificationError("anchor", f"later anchor is not consistent with the checkpoint: {exc}") from None
    return Verified(receipt, leaf_index, checkpoint, first)


def fetch_and_verify(
    receipt_id: str,
    ledger: ledger_pb2_grpc.LedgerStub,
    verifiers: list[Verifier],
    chain_root: Callable[[str, int], bytes] | None,
    deadline: float,
    expected: Receipt | None = None,
) -> Verified:
    """Fetches the bundle and anchors from the ledger and checks everything.

    ``chain_root(contract_address, size)`` reads the root the chain holds; with None the anchors
    the ledger reports are taken as they are (the caller must say so to its user).
    """
    from cipherfeed.v1 import ledger_pb2

    bundle = ledger.GetReceipt(ledger_pb2.GetReceiptRequest(receipt_id=receipt_id), timeout=deadline)
    r = bundle.receipt
    receipt = Receipt(r.query_sha256, r.response_sha256, r.model_version, r.key_id, r.key_version, r.unix_millis)
    if expected is not None and receipt != expected:
        raise VerificationError("receipt", "the ledger's receipt differs from the one this client kept")

    def anchors(size: int) -> list[AnchorEvidence]:
        reply = ledger.GetAnchors(ledger_pb2.GetAnchorsRequest(min_size=size), timeout=deadline)
        out = []
        for a in reply.anchors:
            if not a.confirmed:
                continue
            root = chain_root(a.contract_address, a.size) if chain_root else a.root_hash
            where = f"chain {a.chain_id} contract {a.contract_address} block {a.block_number} tx {a.transaction_hash}"
            out.append(AnchorEvidence(a.size, root, where))
        return out

    def consistency(old: int, new: int) -> list[bytes]:
        req = ledger_pb2.GetConsistencyProofRequest(first_size=old, second_size=new)
        return list(ledger.GetConsistencyProof(req, timeout=deadline).hashes)

    origin = bundle.checkpoint.origin
    return verify_receipt(
        receipt, receipt_id, bundle.leaf_index, list(bundle.inclusion.hashes), bundle.checkpoint.signed_note,
        verifiers, origin, anchors, consistency,
    )  # fmt: skip
