"""The canonical leaf encodings of the transparency log, shared by recommender, ledger and client.

A leaf is canonical JSON (sorted keys, no spaces, UTF-8). A receipt's id is its RFC 6962 leaf hash
in hex, so anyone holding the receipt can recompute where it must be in the log.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from cipherfeed.merkle import leaf_hash


def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Receipt:
    """What served one Score: hashes of the query and response ciphertexts, the model, the key."""

    query_sha256: str
    response_sha256: str
    model_version: str
    key_id: str
    key_version: int
    unix_millis: int

    def leaf(self) -> bytes:
        return canonical({"type": "cipherfeed.receipt.v1", **asdict(self)})

    @property
    def receipt_id(self) -> str:
        return leaf_hash(self.leaf()).hex()


@dataclass(frozen=True)
class ModelRecord:
    """A model version the recommender loaded and served from ``unix_millis`` on."""

    model_version: str
    created_by: str
    item_count: int
    unix_millis: int

    def leaf(self) -> bytes:
        return canonical({"type": "cipherfeed.model.v1", **asdict(self)})
