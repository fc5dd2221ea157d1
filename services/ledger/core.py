"""The ledger's domain core: entries in, proofs, checkpoints, anchors and receipt bundles out."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from cipherfeed.checkpoint import vkey
from cipherfeed.errors import FailedPrecondition, InvalidArgument, NotFound, Reason, Unavailable, required
from cipherfeed.receipts import ModelRecord, Receipt
from services.ledger.anchor import Anchorer
from services.ledger.log import Appended, TransparencyLog
from services.ledger.store import AnchorRow, CheckpointRow

log = logging.getLogger(__name__)
VERIFIER_KEYS = "verifier_keys"  # meta key: JSON list of vkeys
MAX_STORED_SIZE = 2**63 - 1
DEFAULT_ENTRIES_PAGE = 100
MAX_ENTRIES_PAGE = 256


@dataclass(frozen=True)
class Bundle:
    receipt: Receipt
    leaf_index: int
    inclusion: list[bytes]
    checkpoint: CheckpointRow


class LedgerCore:
    def __init__(self, log: TransparencyLog, anchorer: Anchorer | None) -> None:
        self.log = log
        self.anchorer = anchorer
        stored = log.store.meta(VERIFIER_KEYS)
        self._stored_keys: list[str] | None = json.loads(stored) if stored else None
        try:  # learn (and keep) the verifier keys while the key service is there
            self.verifier_keys()
        except Unavailable as exc:  # (the parameter "log" shadows the module's logger here)
            logging.getLogger(__name__).warning("verifier keys not known yet: %s", exc)

    def append(self, entries: list[Receipt | ModelRecord]) -> list[Appended]:
        if not entries:
            raise required("entries")
        if len(entries) > 10_000:
            raise InvalidArgument(
                "at most 10,000 entries per batch",
                reason=Reason.COUNT_LIMIT,
                metadata={"field": "entries", "limit": 10_000},
            )
        return self.log.append_many([e.leaf() for e in entries])

    def latest_checkpoint(self) -> CheckpointRow:
        latest = self.log.store.latest_checkpoint()
        if latest is None:
            raise FailedPrecondition("the log has no checkpoint yet", reason=Reason.NO_CHECKPOINT)
        return latest

    def verifier_keys(self) -> list[str]:
        """The checkpoint verifier keys, kept in the store too: while the signer cannot say (the key
        service is down, even since this ledger started), reads answer with the last keys it did."""
        signer = self.log.signer
        try:
            keys = [vkey(signer.name, k) for k in signer.public_keys()]
        except Unavailable:
            stored = self.log.store.meta(VERIFIER_KEYS)
            if stored is None:
                raise
            return list(json.loads(stored))
        if keys != self._stored_keys:
            self.log.store.set_meta(VERIFIER_KEYS, json.dumps(keys))
            self._stored_keys = keys
        return keys

    def inclusion(self, index: int, size: int) -> tuple[int, list[bytes]]:
        size = size or self.latest_checkpoint().size
        try:
            return size, self.log.inclusion(index, size)
        except ValueError as exc:
            raise InvalidArgument(str(exc), reason=Reason.PROOF_RANGE_INVALID) from None

    def consistency(self, old: int, new: int) -> list[bytes]:
        try:
            return self.log.consistency(old, new)
        except ValueError as exc:
            raise InvalidArgument(str(exc), reason=Reason.PROOF_RANGE_INVALID) from None

    def anchors(self, min_size: int) -> list[AnchorRow]:
        if min_size > MAX_STORED_SIZE:  # no tree is that large; SQL integers are signed 64-bit
            return []
        return self.log.store.anchors(min_size=min_size)

    def entries(self, start: int, count: int) -> tuple[int, list[tuple[int, ModelRecord | str]]]:
        """Leaves [start, start + count) of the latest checkpoint's tree (count at most
        MAX_ENTRIES_PAGE): each a model record, or "receipt" (not listed: its id is its holder's
        to look up), or "other" for a leaf of no known kind."""
        checkpoint = self.latest_checkpoint()
        count = count or DEFAULT_ENTRIES_PAGE
        if count > MAX_ENTRIES_PAGE:
            raise InvalidArgument(
                f"at most {MAX_ENTRIES_PAGE} entries per page",
                reason=Reason.COUNT_LIMIT,
                metadata={"field": "count", "limit": MAX_ENTRIES_PAGE},
            )
        if start >= checkpoint.size:
            return checkpoint.size, []
        leaves = self.log.store.leaves(start, min(start + count, checkpoint.size))
        return checkpoint.size, [(index, _entry_kind(data)) for index, data in leaves]

    def bundle(self, receipt_id: str) -> Bundle:
        index, data = self.log.locate(receipt_id)
        fields = json.loads(data)
        if fields.pop("type", None) != "cipherfeed.receipt.v1":
            raise NotFound(f"leaf {index} is not a receipt", reason=Reason.RECEIPT_NOT_FOUND)
        receipt = Receipt(**fields)
        checkpoint = self.log.store.checkpoint_covering(index)
        if checkpoint is None:
            raise FailedPrecondition(
                f"receipt is at index {index} but no checkpoint covers it yet; retry shortly",
                reason=Reason.NOT_CHECKPOINTED,
            )
        return Bundle(receipt, index, self.log.inclusion(index, checkpoint.size), checkpoint)

    def close(self) -> None:
        self.log.close()
        if self.anchorer is not None:
            self.anchorer.close()
        self.log.store.close()


def _entry_kind(data: bytes) -> ModelRecord | str:
    """A leaf as the log browser lists it: a model record in full, else only its kind."""
    try:
        fields = json.loads(data)
        kind = fields.pop("type") if isinstance(fields, dict) else None
        if kind == "cipherfeed.model.v1":
            record = ModelRecord(**fields)
            typed = [type(getattr(record, f)) for f in ("model_version", "created_by", "item_count", "unix_millis")]
            if typed == [str, str, int, int] and 0 <= record.item_count < 2**32 and record.leaf() == data:
                return record  # exactly a canonical model leaf, nothing else
        elif kind == "cipherfeed.receipt.v1":
            return "receipt"
    except (ValueError, TypeError, KeyError):  # not JSON, or not one of the log's entries
        pass
    return "other"
