"""Offline verification of a receipt: leaf -> signed checkpoint -> inclusion proof -> on-chain anchor.

Each step raises ``VerificationError`` naming the step, so a caller (or the CLI's exit status) can
say exactly which link failed. ``verify_receipt`` is the pure core; ``fetch_and_verify`` asks the
ledger for the proofs and the chain for the anchor, and takes every trust decision (the log's
origin, the checkpoint keys, the chain and the contract) from the device's pinned trust file
(``cipherfeed.trust``), never from what the ledger or the key service answer. The anchor step
accepts the checkpoint's own root on chain, or a later anchored root together with a consistency
proof from the checkpoint to it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Protocol

from cipherfeed.checkpoint import Checkpoint, NoteError, Verifier, verify_checkpoint
from cipherfeed.merkle import ProofError, leaf_hash, verify_consistency, verify_inclusion
from cipherfeed.receipts import Receipt
from cipherfeed.trust import TrustAnchors

if TYPE_CHECKING:
    from cipherfeed.v1 import ledger_pb2_grpc

STEPS = ("receipt", "inclusion", "signature", "anchor")
EXIT_CODES = {"receipt": 10, "inclusion": 11, "signature": 12, "anchor": 13}
ZERO_ROOT = bytes(32)
MAX_SAVED_RECEIPT_BYTES = 64 * 1024
_RECEIPT_ID = re.compile(r"[0-9a-fA-F]{64}")
_RECEIPT_TYPES: dict[str, type] = {"key_version": int, "unix_millis": int}


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
    source: str  # e.g. "chain 31337 contract 0x..."


@dataclass(frozen=True)
class Verified:
    receipt: Receipt
    leaf_index: int
    checkpoint: Checkpoint
    anchor: AnchorEvidence


class Chain(Protocol):
    """What the anchor step reads from a chain (a JSON-RPC node the user picked, or the demo's)."""

    def chain_id(self) -> int: ...

    def root_at(self, contract: str, size: int) -> bytes: ...

    def latest(self, contract: str) -> tuple[int, bytes]: ...


def normalise_receipt_id(text: str) -> str:
    """A receipt id in its canonical form (64 lower-case hex digits)."""
    if not _RECEIPT_ID.fullmatch(text):
        raise VerificationError("receipt", "a receipt id is 64 hexadecimal digits")
    return text.lower()


def parse_saved_receipt(data: bytes, where: str) -> Receipt:
    """The receipt a client saved, checked field by field (exactly the receipt's fields, typed)."""
    if len(data) > MAX_SAVED_RECEIPT_BYTES:
        raise VerificationError("receipt", f"the saved copy {where} is larger than any receipt")
    try:
        d = json.loads(data)
    # ValueError covers bad UTF-8, bad JSON and integers beyond Python's 4,300 digits; a deeply
    # nested array raises RecursionError (both found by the saved_receipt fuzz target).
    except (ValueError, RecursionError) as exc:
        raise VerificationError("receipt", f"the saved copy {where} is not JSON ({str(exc)[:80]})") from None
    if not isinstance(d, dict):
        raise VerificationError("receipt", f"the saved copy {where} is not a JSON object")
    names = {f.name for f in fields(Receipt)}
    if set(d) != names:
        missing, extra = sorted(names - set(d)), sorted(str(k)[:40] for k in set(d) - names)
        raise VerificationError(
            "receipt", f"the saved copy {where} has the wrong fields (missing {missing}, unknown {extra})"
        )
    for name in names:
        want = _RECEIPT_TYPES.get(name, str)
        if type(d[name]) is not want:
            raise VerificationError("receipt", f"the saved copy {where}: {name} is not a {want.__name__}")
    return Receipt(**d)


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
    """``verifiers`` and ``origin`` must come from trust the caller pinned. ``anchors(size)``
    returns on-chain evidence for sizes >= size (smallest first); ``consistency(a, b)`` fetches a
    consistency proof (it is checked, not trusted)."""
    h = leaf_hash(receipt.leaf())
    if h.hex() != expected_id.lower():
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


def chain_anchors(chain: Chain, trust: TrustAnchors) -> Callable[[int], list[AnchorEvidence]]:
    """Anchor evidence read from the pinned contract on a chain whose id is the pinned one."""

    def anchors(size: int) -> list[AnchorEvidence]:
        contract = trust.anchor_contract
        try:
            chain_id = chain.chain_id()
            if chain_id != trust.chain_id:
                raise VerificationError("anchor", f"the node serves chain {chain_id}, not the pinned {trust.chain_id}")
            where = f"chain {chain_id} contract {contract}"
            root = chain.root_at(contract, size)
            if root != ZERO_ROOT:
                return [AnchorEvidence(size, root, where)]
            latest_size, latest_root = chain.latest(contract)
        except VerificationError:
            raise
        except Exception as exc:  # any failure to read the chain fails this step, with its reason
            raise VerificationError("anchor", f"reading {contract} on chain failed: {_short(exc)}") from None
        if latest_size < size:
            return []
        return [AnchorEvidence(latest_size, latest_root, where)]

    return anchors


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


def ledger_reported_anchors(
    ledger: ledger_pb2_grpc.LedgerStub, trust: TrustAnchors, deadline: float
) -> Callable[[int], list[AnchorEvidence]]:
    """The anchors the ledger reports, believed only for the pinned chain and contract (for a user
    who chose not to read the chain)."""
    from cipherfeed.v1 import ledger_pb2 as pb

    def anchors(size: int) -> list[AnchorEvidence]:
        reply = ledger.GetAnchors(pb.GetAnchorsRequest(min_size=size), timeout=deadline)
        out = []
        for a in reply.anchors:
            if not a.confirmed:
                continue
            if not trust.same_contract(a.contract_address) or a.chain_id != str(trust.chain_id):
                raise VerificationError(
                    "anchor",
                    f"the ledger reports an anchor in contract {a.contract_address[:42]!r} on chain "
                    f"{a.chain_id[:20]!r}; the trust file pins {trust.anchor_contract} on chain {trust.chain_id}",
                )
            where = f"chain {a.chain_id} contract {a.contract_address} block {a.block_number} tx {a.transaction_hash}"
            out.append(AnchorEvidence(a.size, bytes(a.root_hash), where))
        return out

    return anchors


def fetch_and_verify(
    receipt_id: str,
    ledger: ledger_pb2_grpc.LedgerStub,
    trust: TrustAnchors,
    chain: Chain | None,
    deadline: float,
    expected: Receipt | None = None,
) -> Verified:
    """Fetches the proofs from ``ledger`` (a ``LedgerStub``) and checks everything against
    ``trust``. ``chain`` None takes the anchors the ledger reports (the caller must say so to its
    user); ``expected`` is the receipt the client kept, compared with the ledger's."""
    from cipherfeed.v1 import ledger_pb2 as pb

    receipt_id = normalise_receipt_id(receipt_id)
    if expected is not None and expected.receipt_id != receipt_id:
        raise VerificationError("receipt", "the receipt this client kept does not hash to its id")
    bundle = ledger.GetReceipt(pb.GetReceiptRequest(receipt_id=receipt_id), timeout=deadline)
    r = bundle.receipt
    receipt = Receipt(r.query_sha256, r.response_sha256, r.model_version, r.key_id, r.key_version, r.unix_millis)
    if expected is not None and receipt != expected:
        raise VerificationError("receipt", "the ledger's receipt differs from the one this client kept")

    def consistency(old: int, new: int) -> list[bytes]:
        req = pb.GetConsistencyProofRequest(first_size=old, second_size=new)
        return [bytes(h) for h in ledger.GetConsistencyProof(req, timeout=deadline).hashes]

    anchors = chain_anchors(chain, trust) if chain is not None else ledger_reported_anchors(ledger, trust, deadline)
    return verify_receipt(
        receipt, receipt_id, int(bundle.leaf_index), [bytes(h) for h in bundle.inclusion.hashes],
        str(bundle.checkpoint.signed_note), trust.verifiers, trust.log_origin, anchors, consistency,
    )  # fmt: skip
