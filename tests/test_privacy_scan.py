"""The leak scanner the privacy test uses, and proof that it finds every encoding it claims to.

Searching raw bytes for a small integer's varint is meaningless (index 10 is byte 0x0a, the tag
of every message's field 1), so the scanner decodes the protobuf wire format itself, known and
unknown fields alike, and checks every decoded value:

* item ids (the TikTok snowflakes, 19 digits) anywhere in the bytes, including inside
  ciphertexts and key material: as ASCII/UTF-8 text, as a u64 (fixed64 little- and big-endian)
  and as its varint. These are long enough that a chance match is impossible.
* catalogue indices in every integer a request carries: varints read as uint, two's-complement
  int and zigzag; fixed32/fixed64 as unsigned and signed; packed repeated fields element by
  element; float/double values; every run of decimal digits in strings, and in byte fields that
  are text (the checkpoint note the ledger asks the key service to sign).

Numbers with a protocol meaning (a key version, a tree size, a leaf index) may equal an item's
index by chance; those named fields are allowed a value only if a server sent that same value
in a response (the client echoing what it was told). Token fields (key ids, model versions,
receipt ids, profile references, hex digests) are allowed only as values a server sent. What
cannot be checked: indices inside ciphertexts and keys (their headers hold small integers such
as the ring dimension; that they are ciphertext under the user's key is the protection).
"""

from __future__ import annotations

import base64
import contextlib
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from cipherfeed.v1 import common_pb2, keyservice_pb2, ledger_pb2, recommender_pb2

# Request fields whose integers have a protocol meaning: allowed when a server sent that value.
PROTOCOL_NUMBERS = {
    "cipherfeed.v1.KeyRef.version",
    "cipherfeed.v1.GetKeyRequest.version",
    "cipherfeed.v1.Receipt.key_version",
    "cipherfeed.v1.GetInclusionProofRequest.leaf_index",
    "cipherfeed.v1.GetInclusionProofRequest.tree_size",
    "cipherfeed.v1.GetConsistencyProofRequest.first_size",
    "cipherfeed.v1.GetConsistencyProofRequest.second_size",
    "cipherfeed.v1.GetAnchorsRequest.min_size",
}
# Request fields holding a server-issued token or a digest: allowed when a server sent that value.
TOKEN_FIELDS = {
    "cipherfeed.v1.KeyRef.key_id",
    "cipherfeed.v1.GetKeyRequest.key_id",
    "cipherfeed.v1.KeyStateRequest.key_id",
    "cipherfeed.v1.RotateKeyRequest.key_id",
    "cipherfeed.v1.ScoreRequest.profile_ref",
    "cipherfeed.v1.ScoreRequest.model_version",
    "cipherfeed.v1.GetCatalogueManifestRequest.model_version",
    "cipherfeed.v1.UploadHistoryRequest.model_version",
    "cipherfeed.v1.GetReceiptRequest.receipt_id",
    "cipherfeed.v1.Receipt.query_sha256",
    "cipherfeed.v1.Receipt.response_sha256",
    "cipherfeed.v1.Receipt.model_version",
    "cipherfeed.v1.Receipt.key_id",
    "cipherfeed.v1.ModelRecord.model_version",
}
# Request byte fields that are text, scanned like strings.
TEXT_BYTES = {"cipherfeed.v1.SignRequest.message"}

_DIGITS = re.compile(rb"[0-9]+")
_LONG_DIGITS = re.compile(rb"[0-9]{12,}")
_LONG_HEX = re.compile(r"(0x)?[0-9a-fA-F]{16,}")
_PACKABLE = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_BOOL,
    FieldDescriptor.TYPE_ENUM,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_FLOAT,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
    FieldDescriptor.TYPE_DOUBLE,
}
_FIXED32 = {FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_FLOAT}
_FIXED64 = {FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64, FieldDescriptor.TYPE_DOUBLE}
_IMPORTED = (common_pb2, keyservice_pb2, ledger_pb2, recommender_pb2)  # registers every message


class WireError(ValueError):
    pass


@dataclass(frozen=True)
class Leaf:
    path: str  # e.g. cipherfeed.v1.ScoreRequest.key>cipherfeed.v1.KeyRef.version
    name: str  # the field's full name, or "<unknown N>"
    kind: str  # int | float | str | bytes
    value: object


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireError("truncated or overlong varint")
        b = data[pos]
        result |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return result, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int_views(value: int, bits: int) -> set[int]:
    signed = value - (1 << bits) if value >= 1 << (bits - 1) else value
    zigzag = (value >> 1) ^ -(value & 1)
    return {value, signed, -signed, zigzag, -zigzag}


def walk(data: bytes, descriptor: Descriptor | None, path: str = "") -> Iterator[Leaf]:
    """Every value in a serialized message, known fields by their descriptor, unknown ones by
    wire type (length-delimited unknowns are tried as a nested message and also yielded raw)."""
    pos = 0
    here = path + (descriptor.full_name if descriptor else "?")
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        fd = descriptor.fields_by_number.get(number) if descriptor else None
        name = fd.full_name if fd else f"<unknown {number}>"
        if wire_type == 0:
            value, pos = _varint(data, pos)
            yield Leaf(here, name, "int", _int_views(value, 64))
        elif wire_type == 1:
            raw = data[pos : pos + 8]
            if len(raw) < 8:
                raise WireError("truncated fixed64")
            pos += 8
            (u,) = struct.unpack("<Q", raw)
            (d,) = struct.unpack("<d", raw)
            yield Leaf(here, name, "int", _int_views(u, 64))
            yield Leaf(here, name, "float", d)
        elif wire_type == 5:
            raw = data[pos : pos + 4]
            if len(raw) < 4:
                raise WireError("truncated fixed32")
            pos += 4
            (u,) = struct.unpack("<I", raw)
            (f,) = struct.unpack("<f", raw)
            yield Leaf(here, name, "int", _int_views(u, 32))
            yield Leaf(here, name, "float", f)
        elif wire_type == 2:
            size, pos = _varint(data, pos)
            raw = data[pos : pos + size]
            if len(raw) < size:
                raise WireError("truncated length-delimited field")
            pos += size
            yield from _delimited(raw, fd, name, here)
        else:
            raise WireError(f"wire type {wire_type} (groups are not used by these protos)")


def _delimited(raw: bytes, fd: FieldDescriptor | None, name: str, here: str) -> Iterator[Leaf]:
    if fd is not None and fd.type == FieldDescriptor.TYPE_MESSAGE:
        yield from walk(raw, fd.message_type, here + ">")
    elif fd is not None and fd.type == FieldDescriptor.TYPE_STRING:
        yield Leaf(here, name, "str", raw.decode("utf-8", "replace"))
    elif fd is not None and fd.type in _PACKABLE:  # packed repeated
        yield from _packed(raw, fd, name, here)
    else:
        yield Leaf(here, name, "bytes", raw)
        if fd is None:  # an unknown field may hide a message or packed numbers: look inside
            with contextlib.suppress(WireError):
                yield from list(walk(raw, None, here + ">"))
            try:
                pos = 0
                while pos < len(raw):
                    value, pos = _varint(raw, pos)
                    yield Leaf(here, name, "int", _int_views(value, 64))
            except WireError:
                pass


def _packed(raw: bytes, fd: FieldDescriptor, name: str, here: str) -> Iterator[Leaf]:
    if fd.type in _FIXED32 or fd.type in _FIXED64:
        width = 4 if fd.type in _FIXED32 else 8
        if len(raw) % width:
            raise WireError("packed fixed field of the wrong length")
        for i in range(0, len(raw), width):
            chunk = raw[i : i + width]
            u = int.from_bytes(chunk, "little")
            yield Leaf(here, name, "int", _int_views(u, 8 * width))
            yield Leaf(here, name, "float", struct.unpack("<f" if width == 4 else "<d", chunk)[0])
        return
    pos = 0
    while pos < len(raw):
        value, pos = _varint(raw, pos)
        yield Leaf(here, name, "int", _int_views(value, 64))


def input_type(method: str) -> Descriptor | None:
    """The request message of a gRPC method path such as ``/cipherfeed.v1.Recommender/Score``."""
    service, _, rpc = method.lstrip("/").partition("/")
    try:
        return descriptor_pool.Default().FindMethodByName(f"{service}.{rpc}").input_type
    except KeyError:
        return None


def output_type(method: str) -> Descriptor | None:
    service, _, rpc = method.lstrip("/").partition("/")
    try:
        return descriptor_pool.Default().FindMethodByName(f"{service}.{rpc}").output_type
    except KeyError:
        return None


@dataclass
class Echoes:
    """What servers told clients (responses): numbers and tokens a request may send back."""

    ints: set[int] = field(default_factory=set)
    tokens: set[str] = field(default_factory=set)
    blobs: set[bytes] = field(default_factory=set)

    def add_response(self, method: str, data: bytes) -> None:
        for leaf in walk(data, output_type(method)):
            if leaf.kind == "int":
                self.ints |= leaf.value  # type: ignore[arg-type]
            elif leaf.kind == "str":
                self.tokens.add(str(leaf.value))
            elif leaf.kind == "bytes":
                b = bytes(leaf.value)  # type: ignore[arg-type]
                if len(b) <= 64:
                    self.blobs.add(b)
                    self.tokens.add(b.hex())


@dataclass(frozen=True)
class Secrets:
    """What must not reach a server: item ids and catalogue indices."""

    item_ids: frozenset[str]
    indices: frozenset[int]

    def __post_init__(self) -> None:
        numeric = [int(i) for i in self.item_ids if i.isdigit() and int(i) < 1 << 64]
        windows = set()
        for v in numeric:
            windows.add(v)  # fixed64 little-endian, read as <u8
            windows.add(int.from_bytes(v.to_bytes(8, "little"), "big"))  # big-endian
            varint = encode_varint(v)
            if len(varint) >= 8:
                windows.add(int.from_bytes(varint[:8], "little"))
        object.__setattr__(self, "_windows", np.array(sorted(windows), dtype=np.uint64))
        object.__setattr__(self, "_numeric", frozenset(numeric))


@dataclass(frozen=True)
class Finding:
    where: str
    what: str
    indices: frozenset[int] = frozenset()  # the catalogue indices found, for index findings

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def find_item_ids(data: bytes, secrets: Secrets, where: str) -> list[Finding]:
    """Item ids anywhere in ``data``: as digits (ASCII/UTF-8 and UTF-16LE) or as 8-byte windows
    (u64 little/big-endian, the first 8 bytes of the id's varint), at every byte offset."""
    found = []
    ids = {i.encode() for i in secrets.item_ids}
    for m in _LONG_DIGITS.finditer(data):
        run = m.group()
        for item in ids:
            if item in run:
                found.append(Finding(where, f"item id {item.decode()} as text"))
    if b"\x00" in data:
        utf16 = data[::2] if len(data) > 1 else b""
        for start in (0, 1):
            for m in _LONG_DIGITS.finditer(data[start::2]):
                for item in ids:
                    if item in m.group() and (item.decode().encode("utf-16-le") in data):
                        found.append(Finding(where, f"item id {item.decode()} as UTF-16"))
        del utf16
    windows = secrets._windows  # type: ignore[attr-defined]
    if len(windows) and len(data) >= 8:
        buf = np.frombuffer(data, dtype=np.uint8)
        for offset in range(8):
            usable = (len(data) - offset) // 8
            if usable <= 0:
                continue
            view = np.frombuffer(buf[offset : offset + 8 * usable].tobytes(), dtype="<u8")
            hits = np.flatnonzero(np.isin(view, windows))
            for h in hits[:5]:
                found.append(Finding(where, f"item id as 8 binary bytes at offset {offset + 8 * int(h)}"))
    return found


def _digit_runs(text: bytes) -> set[int]:
    return {int(m.group()) for m in _DIGITS.finditer(text) if len(m.group()) <= 12}


def scan_request(method: str, data: bytes, secrets: Secrets, echoes: Echoes) -> list[Finding]:
    """Every way ``data`` (a serialized request to ``method``) carries a secret item."""
    found = find_item_ids(data, secrets, method)
    descriptor = input_type(method)
    for leaf in walk(data, descriptor):
        where = f"{method} {leaf.name}"
        if leaf.kind == "int":
            values: set[int] = leaf.value  # type: ignore[assignment]
            hit = values & secrets.indices
            if hit and not (leaf.name in PROTOCOL_NUMBERS and hit <= echoes.ints):
                found.append(Finding(where, f"catalogue index {sorted(hit)} as an integer", frozenset(hit)))
            if values & secrets._numeric:  # type: ignore[attr-defined]
                found.append(Finding(where, "item id as an integer"))
        elif leaf.kind == "float":
            v = float(leaf.value)  # type: ignore[arg-type]
            if v == v and v.is_integer() and int(v) in secrets.indices:
                found.append(Finding(where, f"catalogue index {int(v)} as a float"))
        elif leaf.kind == "str":
            text = str(leaf.value)
            if leaf.name in TOKEN_FIELDS:
                if text and text not in echoes.tokens:
                    found.append(Finding(where, f"token {text[:24]!r} that no server issued"))
                continue
            if _LONG_HEX.fullmatch(text):  # an address or digest: its digits are not decimal numbers
                if int(text.removeprefix("0x"), 16) in secrets.indices:
                    found.append(Finding(where, "catalogue index as hex text"))
                continue
            hit = _digit_runs(text.encode()) & secrets.indices
            if hit:
                found.append(Finding(where, f"catalogue index {sorted(hit)} as decimal text"))
        elif leaf.kind == "bytes" and leaf.name in TEXT_BYTES:
            found.extend(_scan_note(bytes(leaf.value), secrets, echoes, where))  # type: ignore[arg-type]
        elif leaf.kind == "bytes" and leaf.name.startswith("<unknown"):
            hit = _digit_runs(bytes(leaf.value)) & secrets.indices  # type: ignore[arg-type]
            if hit:
                found.append(Finding(where, f"catalogue index {sorted(hit)} as decimal text in an unknown field"))
    return found


def _scan_note(note: bytes, secrets: Secrets, echoes: Echoes, where: str) -> list[Finding]:
    """A checkpoint body: origin, tree size, base64 root, then extension lines."""
    lines = note.decode("utf-8", "replace").split("\n")
    found = []
    for n, line in enumerate(lines):
        if n == 1 and line.isdigit() and int(line) in echoes.ints:
            continue  # the tree size, as the ledger reports it
        if n == 2:
            try:
                if base64.b64decode(line, validate=True) in echoes.blobs:
                    continue  # the root hash, as the ledger reports it
            except ValueError:
                pass
        hit = _digit_runs(line.encode()) & secrets.indices
        if hit:
            found.append(Finding(where, f"catalogue index {sorted(hit)} in line {n} of a signed note"))
    return found


def scan_text(name: str, text: Iterable[str], secrets: Secrets) -> list[Finding]:
    return [f for line in text for f in find_item_ids(line.encode(), secrets, name)]


# ---- the scanner finds what it claims to (no servers needed) ----------------------------------

ITEM = "7106153287283051782"
INDEX = 4321
SECRETS = Secrets(frozenset({ITEM}), frozenset({INDEX, 7}))
NONE = Echoes()
GET_ITEMS = "/cipherfeed.v1.Recommender/GetItems"
SCORE = "/cipherfeed.v1.Recommender/Score"
INFO = "/cipherfeed.v1.Recommender/GetModelInfo"


def _with_unknown(message, number: int, wire_type: int, payload: bytes) -> bytes:
    return message.SerializeToString() + encode_varint(number << 3 | wire_type) + payload


def test_every_encoding_of_an_index_or_id_is_found():
    key = common_pb2.KeyRef(key_id="k", version=1)
    cases = {
        "packed varint": (GET_ITEMS, recommender_pb2.GetItemsRequest(indices=[3, INDEX, 9]).SerializeToString()),
        "id string": (GET_ITEMS, recommender_pb2.GetItemsRequest(item_ids=[ITEM]).SerializeToString()),
        "id inside a ciphertext": (
            SCORE,
            recommender_pb2.ScoreRequest(key=key, query_ciphertext=b"\x91" * 999 + ITEM.encode()).SerializeToString(),
        ),
        "id as u64 inside bytes": (
            SCORE,
            recommender_pb2.ScoreRequest(
                key=key, query_ciphertext=b"\x13" * 77 + int(ITEM).to_bytes(8, "little")
            ).SerializeToString(),
        ),
        "id as a varint field": (
            INFO,
            _with_unknown(recommender_pb2.GetModelInfoRequest(), 9, 0, encode_varint(int(ITEM))),
        ),
        "unknown varint": (INFO, _with_unknown(recommender_pb2.GetModelInfoRequest(), 9, 0, encode_varint(INDEX))),
        "unknown fixed32": (INFO, _with_unknown(recommender_pb2.GetModelInfoRequest(), 9, 5, struct.pack("<I", INDEX))),
        "unknown fixed64": (INFO, _with_unknown(recommender_pb2.GetModelInfoRequest(), 9, 1, struct.pack("<q", INDEX))),
        "unknown double": (INFO, _with_unknown(recommender_pb2.GetModelInfoRequest(), 9, 1, struct.pack("<d", INDEX))),
        "unknown packed": (
            INFO,
            _with_unknown(recommender_pb2.GetModelInfoRequest(), 9, 2, b"\x03\x05" + encode_varint(INDEX)),
        ),
        "unknown decimal text": (INFO, _with_unknown(recommender_pb2.GetModelInfoRequest(), 9, 2, b"\x08seen4321")),
        "zigzag": (INFO, _with_unknown(recommender_pb2.GetModelInfoRequest(), 9, 0, encode_varint(2 * INDEX))),
        "negative int64": (INFO, _with_unknown(recommender_pb2.GetModelInfoRequest(), 9, 0, encode_varint(-INDEX))),
        "decimal in a string field": (
            SCORE,
            recommender_pb2.ScoreRequest(
                key=key, query_ciphertext=b"x", model_version="a" * 63 + "7"
            ).SerializeToString(),
        ),
        "a protocol number no server sent": (
            SCORE,
            recommender_pb2.ScoreRequest(key=common_pb2.KeyRef(key_id="k", version=INDEX)).SerializeToString(),
        ),
        "signed note": (
            "/cipherfeed.v1.KeyService/Sign",
            keyservice_pb2.SignRequest(key_name="ledger", message=b"origin\n4321\nAAAA\n").SerializeToString(),
        ),
    }
    for name, (method, data) in cases.items():
        assert scan_request(method, data, SECRETS, NONE), f"{name}: not found"


def test_innocent_requests_and_echoed_protocol_numbers_pass():
    echoes = Echoes(ints={INDEX, 1}, tokens={"k", "a" * 64})
    clean = recommender_pb2.ScoreRequest(
        key=common_pb2.KeyRef(key_id="k", version=INDEX),
        query_ciphertext=bytes(range(256)) * 40,
        model_version="a" * 64,
    )
    assert scan_request(SCORE, clean.SerializeToString(), SECRETS, echoes) == []
    assert scan_request(INFO, b"", SECRETS, NONE) == []
    # An owner's address (a known string field holding long hex): its digit runs are not numbers.
    address = keyservice_pb2.SignRequest(key_name="0x7e3F5a4321bB2c7d0E1f9A8b7C6d5E4f3A2b1C0d").SerializeToString()
    assert scan_request("/cipherfeed.v1.KeyService/Sign", address, SECRETS, NONE) == []
    note = b"origin\n4321\n" + base64.b64encode(b"r" * 32) + b"\n"
    echoes.blobs.add(b"r" * 32)
    sign = keyservice_pb2.SignRequest(key_name="ledger", message=note).SerializeToString()
    assert scan_request("/cipherfeed.v1.KeyService/Sign", sign, SECRETS, echoes) == []
