"""One fuzz target per parser of untrusted bytes. Each takes the fuzzer's bytes, feeds them to the
parser and lets only the parser's documented refusal through: any other exception is a finding.

The modules under test are imported by ``fuzz.run`` inside ``atheris.instrument_imports()``, so
these imports must stay inside the functions (a module-level import would run uninstrumented).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cipherfeed.checkpoint import Verifier


@dataclass(frozen=True)
class Target:
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    modules: tuple[str, ...]  # what to instrument for coverage


# --- signed notes and checkpoints (cipherfeed/checkpoint.py) ---------------------------------


def _note_key() -> tuple[Ed25519PrivateKey, Verifier]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cipherfeed.checkpoint import Verifier

    private = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"fuzz note key").digest())
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private, Verifier("fuzz.example/log", public)


def checkpoint_note(data: bytes) -> None:
    from cipherfeed.checkpoint import NoteError, Verifier, parse_checkpoint, verify_checkpoint

    _, verifier = _note_key()
    try:  # notes arrive as protobuf strings: valid UTF-8
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    for call in (
        lambda: verify_checkpoint(text, [verifier], "fuzz.example/log"),
        lambda: parse_checkpoint(text),
        lambda: Verifier.from_vkey(text),
    ):
        with contextlib.suppress(NoteError):
            call()


def checkpoint_seeds() -> list[bytes]:
    import base64

    from cipherfeed.checkpoint import sign_note, vkey

    private, verifier = _note_key()
    body = f"fuzz.example/log\n12\n{base64.b64encode(bytes(32)).decode()}\n"
    note = sign_note(body, verifier.name, verifier.public_key, private.sign)
    return [note.encode(), body.encode(), vkey(verifier.name, verifier.public_key).encode()]


# --- inclusion and consistency proofs (cipherfeed/merkle.py) ---------------------------------


def merkle_proofs(data: bytes) -> None:
    import atheris

    from cipherfeed.merkle import ProofError, verify_consistency, verify_inclusion

    fdp = atheris.FuzzedDataProvider(data)
    a, b = fdp.ConsumeIntInRange(0, 2**64), fdp.ConsumeIntInRange(0, 2**64)
    sizes = (fdp.ConsumeIntInRange(0, 40), fdp.ConsumeIntInRange(0, 40))
    h1, h2 = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 33)), fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 33))
    proof = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 33)) for _ in range(fdp.ConsumeIntInRange(0, 70))]
    for index, size in ((a, b), sizes):
        with contextlib.suppress(ProofError):
            verify_inclusion(index, size, h1, proof, h2)
        with contextlib.suppress(ProofError):
            verify_consistency(index, size, h1, h2, proof)


def merkle_seeds() -> list[bytes]:
    return [bytes(200), bytes(range(256))]


# --- the score wire format (cipherfeed/he/wire.py) -------------------------------------------


def wire_unpack(data: bytes) -> None:
    from cipherfeed.he.wire import WireError, unpack

    with contextlib.suppress(WireError):
        unpack(data)


def wire_seeds() -> list[bytes]:
    import numpy as np

    from cipherfeed.he.wire import pack

    rng = np.random.default_rng(11)
    words = rng.integers(0, 2**40, size=2 * 1024, dtype=np.uint64)
    blob = b"header" + words.astype("<u8").tobytes() + b"trailer"
    return [pack(blob, (1024,)), pack(b"short", (1024,))]


# --- ledger entries from the wire, and the client's saved receipts ---------------------------


def ledger_entries(data: bytes) -> None:
    """AppendBatch's body as the ledger parses it: protobuf, then each entry to its canonical leaf."""
    from google.protobuf.message import DecodeError

    from cipherfeed.errors import InvalidArgument
    from cipherfeed.v1 import ledger_pb2
    from services.ledger.servicer import entry_from_proto

    try:
        request = ledger_pb2.AppendBatchRequest.FromString(data)
    except DecodeError:
        return
    for entry in request.entries:
        try:
            leaf = entry_from_proto(entry).leaf()
        except InvalidArgument:
            continue
        json.loads(leaf)  # a leaf is canonical JSON that parses back


def ledger_entry_seeds() -> list[bytes]:
    from cipherfeed.v1 import ledger_pb2

    receipt = ledger_pb2.Receipt(
        query_sha256="a" * 64, response_sha256="b" * 64, model_version="m" * 64, key_id="k" * 64, key_version=1
    )
    model = ledger_pb2.ModelRecord(model_version="m" * 64, created_by="fuzz", item_count=3)
    request = ledger_pb2.AppendBatchRequest(
        entries=[ledger_pb2.AppendRequest(receipt=receipt), ledger_pb2.AppendRequest(model=model)]
    )
    return [request.SerializeToString()]


# --- HE material (cipherfeed/he/codec.py): queries and public keys ---------------------------

_CODEC: list[Any] = []


def _codec() -> Any:
    if not _CODEC:
        from cipherfeed.he.codec import MaterialCodec
        from cipherfeed.he.params import MESH_PARAMS

        codec = MaterialCodec(MESH_PARAMS)
        codec.warm_up()
        _CODEC.append(codec)
    return _CODEC[0]


def he_query(data: bytes) -> None:
    """A query as the recommender loads it; every accepted one is evaluated once (an addition)."""
    from cipherfeed.he.codec import MaterialError

    with contextlib.suppress(MaterialError):
        ct = _codec().load_query(data)
        _codec().cc.EvalAdd(ct, ct)


def he_public_key(data: bytes) -> None:
    """A public key as the key service loads it, then one encryption under it (as its validation does)."""
    import numpy as np

    from cipherfeed.he.codec import MaterialError

    codec = _codec()
    with contextlib.suppress(MaterialError):
        pk = codec.load_public_key(data)
        codec.cc.Encrypt(pk, codec.cc.MakeCKKSPackedPlaintext(np.zeros(codec.params.slots, dtype=np.complex128)))


def _he_pair() -> tuple[bytes, bytes]:
    import numpy as np

    from cipherfeed.he.codec import serialize

    cc = _codec().cc
    kp = cc.KeyGen()
    query = cc.Encrypt(kp.publicKey, cc.MakeCKKSPackedPlaintext(np.zeros(_codec().params.slots, dtype=np.complex128)))
    return serialize(query), serialize(kp.publicKey)


TARGETS: dict[str, Target] = {
    "checkpoint": Target(checkpoint_note, checkpoint_seeds, ("cipherfeed.checkpoint",)),
    "merkle": Target(merkle_proofs, merkle_seeds, ("cipherfeed.merkle",)),
    "wire": Target(wire_unpack, wire_seeds, ("cipherfeed.he.wire",)),
    "he_query": Target(he_query, lambda: [_he_pair()[0]], ("cipherfeed.he.codec",)),
    "he_public_key": Target(he_public_key, lambda: [_he_pair()[1]], ("cipherfeed.he.codec",)),
    "ledger_entries": Target(ledger_entries, ledger_entry_seeds, ("cipherfeed.receipts", "services.ledger.servicer")),
}
