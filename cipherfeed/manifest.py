"""The catalogue manifest: every item's public display fields, in score order, compactly encoded.

Clients download it once per model version and rank, filter and display feeds from it, so that
no request ever has to name an item. Shared by the recommender (encodes) and the SDK (decodes).

Encoding (format 1): ``MAGIC``, a 4-byte big-endian header length, a canonical JSON header
(counts, URL template, column names, dtypes and sizes), then one compressed body (xz, or zlib
when xz is unavailable) holding the columns back to back:

* ``item_ids``: ``<u8`` when every id is a canonical decimal below 2^64 (TikTok's snowflakes),
  otherwise a string table; ``creator_index`` ``<u4``; ``posted_unix`` ``<i8``; ``popularity``
  ``<f8``; ``creator_ids`` and ``creator_nicknames`` string tables.
* A string table is ``<u4`` byte lengths followed by the UTF-8 bytes, so any text round-trips.

Decoding treats the bytes as hostile: sizes are checked against the header before anything is
allocated, decompression is bounded by the size the header promises, and every column must be
exactly as long as its count says.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import zlib
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"CFMANIFEST\x00v1\n"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_ITEMS = 1 << 26  # 67M: far above any catalogue this mesh scores; bounds what a header may promise
_U64_MAX = (1 << 64) - 1
TIKTOK_URL = "https://www.tiktok.com/@{creator_id}/video/{item_id}"
SYNTHETIC_URL = "synthetic://{creator_id}/{item_id}"


class ManifestError(ValueError):
    """Manifest bytes are malformed, truncated, inconsistent or not what was published."""


@dataclass(frozen=True)
class CatalogueItem:
    """One item's public display fields (what a feed shows), named like the proto's ``Item``."""

    index: int
    item_id: str
    creator_id: str
    creator_nickname: str
    url: str
    popularity: float
    posted_unix: int


@dataclass(frozen=True)
class Manifest:
    model_version: str
    item_ids: list[str]
    creator_of: np.ndarray  # (items,) int64 index into creator_ids
    creator_ids: list[str]
    creator_nicknames: list[str]
    posted_unix: np.ndarray  # (items,) int64
    popularity: np.ndarray  # (items,) float64
    url_template: str
    sha256: bytes = b""  # of the encoded bytes this manifest was read from
    index_of: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    _creator_row: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.index_of:
            self.index_of.update({item_id: i for i, item_id in enumerate(self.item_ids)})
        if not self._creator_row:
            self._creator_row.update({c: i for i, c in enumerate(self.creator_ids)})

    @property
    def item_count(self) -> int:
        return len(self.item_ids)

    def items_of_creator(self, creator_id: str) -> list[int]:
        """Catalogue indices of a creator's videos, in catalogue order; KeyError if unknown."""
        row = self._creator_row[creator_id]
        return [int(i) for i in np.flatnonzero(self.creator_of == row)]

    def item(self, index: int) -> CatalogueItem:
        if not 0 <= index < self.item_count:
            raise IndexError(f"item index {index} is outside the catalogue (0..{self.item_count - 1})")
        creator = int(self.creator_of[index])
        creator_id, item_id = self.creator_ids[creator], self.item_ids[index]
        return CatalogueItem(
            index=index,
            item_id=item_id,
            creator_id=creator_id,
            creator_nickname=self.creator_nicknames[creator],
            url=self.url_template.format(creator_id=creator_id, item_id=item_id),
            popularity=float(self.popularity[index]),
            posted_unix=int(self.posted_unix[index]),
        )


def url_template_for(creator_ids: list[str]) -> str:
    return SYNTHETIC_URL if creator_ids and all(c.startswith("syn-") for c in creator_ids) else TIKTOK_URL


def _string_table(values: list[str]) -> bytes:
    encoded = [v.encode() for v in values]
    return np.array([len(b) for b in encoded], dtype="<u4").tobytes() + b"".join(encoded)


def _u64_ids(item_ids: list[str]) -> bytes | None:
    """The ids as little-endian u64 when each is a canonical decimal that fits, else None."""
    out = np.empty(len(item_ids), dtype="<u8")
    for i, item_id in enumerate(item_ids):
        if not item_id.isascii() or not item_id.isdigit() or (len(item_id) > 1 and item_id[0] == "0"):
            return None
        value = int(item_id)
        if value > _U64_MAX:
            return None
        out[i] = value
    return out.tobytes()


def encode(
    model_version: str,
    item_ids: list[str],
    creator_index: np.ndarray,
    creator_ids: list[str],
    creator_nicknames: list[str],
    posted_unix: np.ndarray,
    popularity: np.ndarray,
) -> bytes:
    """Deterministic bytes for the same inputs (a manifest's digest names its content)."""
    n = len(item_ids)
    ids_u64 = _u64_ids(item_ids)
    columns = [
        ("item_ids", "u64" if ids_u64 is not None else "strings", ids_u64 or _string_table(item_ids)),
        ("creator_index", "<u4", np.ascontiguousarray(creator_index, dtype="<u4").tobytes()),
        ("posted_unix", "<i8", np.ascontiguousarray(posted_unix, dtype="<i8").tobytes()),
        ("popularity", "<f8", np.ascontiguousarray(popularity, dtype="<f8").tobytes()),
        ("creator_ids", "strings", _string_table(creator_ids)),
        ("creator_nicknames", "strings", _string_table(creator_nicknames)),
    ]
    body = b"".join(c[2] for c in columns)
    header = {
        "format": FORMAT_VERSION,
        "model_version": model_version,
        "items": n,
        "creators": len(creator_ids),
        "url_template": url_template_for(creator_ids),
        "compression": "xz",
        "body_bytes": len(body),
        "columns": [{"name": name, "type": kind, "nbytes": len(data)} for name, kind, data in columns],
    }
    head = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    packed = lzma.compress(body, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=6)
    return MAGIC + len(head).to_bytes(4, "big") + head + packed


def _bounded_decompress(kind: str, data: bytes, expected: int) -> bytes:
    try:
        if kind == "xz":
            d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            out = d.decompress(data, max_length=expected + 1)
            finished = d.eof and not d.unused_data
        elif kind == "zlib":
            z = zlib.decompressobj()
            out = z.decompress(data, expected + 1)
            finished = z.eof and not z.unused_data
        else:
            raise ManifestError(f"unknown manifest compression {kind!r}")
    except (lzma.LZMAError, zlib.error) as exc:
        raise ManifestError(f"manifest body does not decompress: {exc}") from None
    if len(out) != expected or not finished:
        raise ManifestError(f"manifest body is {len(out)}+ bytes or has trailing data; the header says {expected}")
    return out


def _strings(data: bytes, count: int, what: str) -> list[str]:
    if len(data) < 4 * count:
        raise ManifestError(f"{what}: string table truncated")
    lengths = np.frombuffer(data[: 4 * count], dtype="<u4").astype(np.int64)
    if int(lengths.sum()) != len(data) - 4 * count:
        raise ManifestError(f"{what}: string lengths do not add up to the table")
    out, pos = [], 4 * count
    for size in lengths.tolist():
        try:
            out.append(data[pos : pos + size].decode())
        except UnicodeDecodeError:
            raise ManifestError(f"{what}: not UTF-8") from None
        pos += size
    return out


def decode(data: bytes, expected_sha256: bytes | None = None) -> Manifest:
    """The manifest in ``data``; with ``expected_sha256``, refused unless the bytes hash to it."""
    digest = hashlib.sha256(data).digest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise ManifestError("manifest bytes do not match the published digest")
    if not data.startswith(MAGIC):
        raise ManifestError("not a cipherfeed catalogue manifest (bad magic)")
    pos = len(MAGIC)
    head_len = int.from_bytes(data[pos : pos + 4], "big")
    if head_len > MAX_HEADER_BYTES or pos + 4 + head_len > len(data):
        raise ManifestError("manifest header is truncated or too large")
    try:
        header = json.loads(data[pos + 4 : pos + 4 + head_len])
        if header.get("format") != FORMAT_VERSION:
            raise ManifestError(f"unsupported manifest format {header.get('format')!r}")
        n, creators, body_bytes = int(header["items"]), int(header["creators"]), int(header["body_bytes"])
        columns = {c["name"]: (str(c["type"]), int(c["nbytes"])) for c in header["columns"]}
        order = [c["name"] for c in header["columns"]]
        model_version, template = str(header["model_version"]), str(header["url_template"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ManifestError):
            raise
        raise ManifestError(f"manifest header is malformed: {exc}") from None
    except RecursionError:  # nested deeper than the interpreter's limit: a hostile header
        raise ManifestError("manifest header is nested too deeply") from None
    if not (0 <= n <= MAX_ITEMS and 0 <= creators <= max(n, 1)):
        raise ManifestError(f"manifest promises {n} items and {creators} creators")
    if template not in (TIKTOK_URL, SYNTHETIC_URL):
        raise ManifestError("manifest URL template is not one the client knows")
    fixed = {"creator_index": ("<u4", 4 * n), "posted_unix": ("<i8", 8 * n), "popularity": ("<f8", 8 * n)}
    for name, (kind, size) in fixed.items():
        if columns.get(name) != (kind, size):
            raise ManifestError(f"manifest column {name} is {columns.get(name)}, expected {(kind, size)}")
    if set(columns) != {*fixed, "item_ids", "creator_ids", "creator_nicknames"} or len(order) != len(columns):
        raise ManifestError("manifest columns are not the expected set")
    # Strings are at most 4 KiB each: the size a header may promise stays bounded by the counts.
    limit = 24 * n + (4 + 4096) * (n + 2 * creators)
    if sum(size for _, size in columns.values()) != body_bytes or not 0 <= body_bytes <= limit:
        raise ManifestError("manifest column sizes do not add up to the body")
    body = _bounded_decompress(str(header.get("compression")), data[pos + 4 + head_len :], body_bytes)
    parts, at = {}, 0
    for name in order:
        size = columns[name][1]
        parts[name] = body[at : at + size]
        at += size
    kind = columns["item_ids"][0]
    if kind == "u64":
        if columns["item_ids"][1] != 8 * n:
            raise ManifestError("manifest item ids are not one u64 per item")
        item_ids = [str(v) for v in np.frombuffer(parts["item_ids"], dtype="<u8").tolist()]
    elif kind == "strings":
        item_ids = _strings(parts["item_ids"], n, "item ids")
    else:
        raise ManifestError(f"unknown item id encoding {kind!r}")
    if columns["creator_ids"][0] != "strings" or columns["creator_nicknames"][0] != "strings":
        raise ManifestError("creator columns must be string tables")
    creator_ids = _strings(parts["creator_ids"], creators, "creator ids")
    nicknames = _strings(parts["creator_nicknames"], creators, "creator nicknames")
    creator_of = np.frombuffer(parts["creator_index"], dtype="<u4").astype(np.int64)
    if n and int(creator_of.max()) >= creators:
        raise ManifestError("manifest creator index points outside the creator table")
    if len(set(item_ids)) != n:
        raise ManifestError("manifest lists an item id twice")
    popularity = np.frombuffer(parts["popularity"], dtype="<f8").copy()
    if not np.all(np.isfinite(popularity)):
        raise ManifestError("manifest popularity is not finite")
    return Manifest(
        model_version=model_version,
        item_ids=item_ids,
        creator_of=creator_of,
        creator_ids=creator_ids,
        creator_nicknames=nicknames,
        posted_unix=np.frombuffer(parts["posted_unix"], dtype="<i8").copy(),
        popularity=popularity,
        url_template=template,
        sha256=digest,
    )
