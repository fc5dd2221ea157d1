"""The model artifact: one deterministic file whose SHA-256 is the model version.

Layout: ``MAGIC``, an 8-byte big-endian header length, a canonical JSON header (sorted keys, no
whitespace) with the metadata and each array's dtype, shape and offset, then the raw
little-endian array bytes. Saving the same model twice gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cipherfeed.atomicfile import PRIVATE, write_atomic

MAGIC = b"CIPHERFEED-MODEL\x00v1\n"
FORMAT_VERSION = 1
_ARRAYS = {
    "embeddings": "<f4",
    "popularity": "<f8",
    "posted_unix": "<i8",
    "creator_index": "<i4",
}


class ArtifactError(ValueError):
    """A model artifact is unreadable, truncated or inconsistent."""


@dataclass
class ModelArtifact:
    embeddings: np.ndarray  # (items, dim) float32, unit rows
    popularity: np.ndarray  # (items,) float64 in [0, 1]
    posted_unix: np.ndarray  # (items,) int64
    item_ids: list[str]
    creator_index: np.ndarray  # (items,) int32 into creator_ids
    creator_ids: list[str]
    creator_nicknames: list[str]
    popularity_weight: float
    created_by: str
    _bytes: bytes | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != n:
            raise ArtifactError(f"embeddings shape {self.embeddings.shape} does not match {n} items")
        for name in ("popularity", "posted_unix", "creator_index"):
            if getattr(self, name).shape != (n,):
                raise ArtifactError(f"{name} does not have one value per item")
        if len(self.creator_nicknames) != len(self.creator_ids):
            raise ArtifactError("one nickname per creator is required")
        if n and (self.creator_index.min() < 0 or self.creator_index.max() >= len(self.creator_ids)):
            raise ArtifactError("creator_index points outside creator_ids")

    @property
    def item_count(self) -> int:
        return len(self.item_ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def to_bytes(self) -> bytes:
        if self._bytes is None:
            self._bytes = _encode(self)
        return self._bytes

    @property
    def version(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: Path) -> str:
        """Writes atomically (temp file + rename) and returns the version."""
        write_atomic(path, self.to_bytes(), PRIVATE)  # the private item embeddings
        return self.version


def _encode(m: ModelArtifact) -> bytes:
    arrays = {name: np.ascontiguousarray(getattr(m, name), dtype=dtype) for name, dtype in _ARRAYS.items()}
    layout = {}
    offset = 0
    for name, arr in arrays.items():
        layout[name] = {
            "dtype": _ARRAYS[name],
            "shape": list(arr.shape),
            "offset": offset,
            "nbytes": arr.nbytes,
        }
        offset += arr.nbytes
    header = {
        "format": FORMAT_VERSION,
        "created_by": m.created_by,
        "popularity_weight": m.popularity_weight,
        "arrays": layout,
        "item_ids": m.item_ids,
        "creator_ids": m.creator_ids,
        "creator_nicknames": m.creator_nicknames,
    }
    head = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return b"".join([MAGIC, len(head).to_bytes(8, "big"), head, *(a.tobytes() for a in arrays.values())])


def load(path: Path) -> ModelArtifact:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read model artifact {path}: {exc.strerror}") from exc
    return from_bytes(data)


def from_bytes(data: bytes) -> ModelArtifact:
    if not data.startswith(MAGIC):
        raise ArtifactError("not a cipherfeed model artifact (bad magic)")
    pos = len(MAGIC)
    head_len = int.from_bytes(data[pos : pos + 8], "big")
    pos += 8
    try:
        header = json.loads(data[pos : pos + head_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError("model artifact header is not valid JSON") from exc
    if header.get("format") != FORMAT_VERSION:
        raise ArtifactError(f"unsupported model artifact format {header.get('format')!r}")
    body = memoryview(data)[pos + head_len :]
    arrays: dict[str, Any] = {}  # keyword arguments of ModelArtifact
    total = 0
    for name, dtype in _ARRAYS.items():
        spec = header["arrays"][name]
        if spec["dtype"] != dtype:
            raise ArtifactError(f"array {name} has dtype {spec['dtype']}, expected {dtype}")
        end = spec["offset"] + spec["nbytes"]
        if end > len(body):
            raise ArtifactError(f"model artifact truncated in array {name}")
        arrays[name] = np.frombuffer(body[spec["offset"] : end], dtype=dtype).reshape(spec["shape"]).copy()
        total += spec["nbytes"]
    if total != len(body):
        raise ArtifactError("model artifact has trailing bytes")
    artifact = ModelArtifact(
        **arrays,
        item_ids=header["item_ids"],
        creator_ids=header["creator_ids"],
        creator_nicknames=header["creator_nicknames"],
        popularity_weight=float(header["popularity_weight"]),
        created_by=header["created_by"],
    )
    artifact._bytes = bytes(data)
    return artifact
