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
    # Executions per fuzzer process in the long run (None: one process for the whole time). Under
    # atheris's instrumentation the HE targets' RSS grows ~40 KB per execution after the first few
    # thousand, whichever cipherfeed module is instrumented, while the same loop uninstrumented stays
    # flat (measured over 6,000 programs; the plain parsers he_query/he_public_key ~20 KB per execution
    # over 30,000 mutations, uninstrumented flat), so the long run restarts them with the corpus kept rather
    # than raising libFuzzer's 2 GB limit, which must still catch an input that allocates.
    runs_per_process: int | None = None


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


# --- the client's saved receipt (cipherfeed verify's input) -----------------------------------


def saved_receipt(data: bytes) -> None:
    """A saved receipt as ``cipherfeed verify`` reads it; an accepted one hashes to an id and a
    canonical leaf that parses back."""
    from cipherfeed.client.verify import VerificationError, parse_saved_receipt

    try:
        receipt = parse_saved_receipt(data, "fuzz.json")
    except VerificationError:
        return
    assert len(receipt.receipt_id) == 64
    json.loads(receipt.leaf())


def saved_receipt_seeds() -> list[bytes]:
    from dataclasses import asdict

    from cipherfeed.receipts import Receipt

    receipt = Receipt("aa" * 32, "bb" * 32, "cc" * 32, "dd" * 32, 1, 1_700_000_000_000)
    return [json.dumps(asdict(receipt), sort_keys=True, indent=2).encode() + b"\n", b"[" * 5000, b"1" * 5000]


# --- the catalogue manifest (cipherfeed/manifest.py): from the recommender, untrusted -----------


def manifest(data: bytes) -> None:
    """A manifest as the device decodes it; an accepted one is internally consistent: every item's
    creator exists and its display fields can be built."""
    from cipherfeed.manifest import ManifestError, decode

    try:
        m = decode(data)
    except ManifestError:
        return
    assert len(m.creator_of) == len(m.posted_unix) == len(m.popularity) == m.item_count
    for index in range(min(m.item_count, 64)):
        m.item(index)


def manifest_seeds() -> list[bytes]:
    import numpy as np

    from cipherfeed.manifest import encode

    ids = [str(7_000_000_000_000_000_000 + i) for i in range(5)]
    creators = ["alice", "bob"]
    small = encode("m1", ids, np.array([0, 1, 0, 1, 1]), creators, ["Alice", "Bob"], np.arange(5), np.ones(5))
    strings = encode("m2", ["a", "b"], np.array([0, 0]), ["c"], ["C"], np.arange(2), np.zeros(2))
    return [small, strings]


# --- sign-in messages (cipherfeed/siwe.py): EIP-4361 text from anyone who signs in --------------


def siwe_message(data: bytes) -> None:
    """A sign-in message as the key service parses it; an accepted one keeps its address checksum
    shape and a chain id in range."""
    from cipherfeed.siwe import SiweError, parse

    try:
        message = parse(data.decode("utf-8", "replace"))
    except SiweError:
        return
    assert message.address.startswith("0x") and len(message.address) == 42
    assert message.chain_id > 0


def siwe_seeds() -> list[bytes]:
    return [
        b"localhost wants you to sign in with your Ethereum account:\n"
        b"0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed\n\nSign in to cipherfeed.\n\n"
        b"URI: grpcs://localhost\nVersion: 1\nChain ID: 31337\nNonce: abcdefgh12345678\n"
        b"Issued At: 2026-12-02T07:00:00Z\nExpiration Time: 2026-12-02T07:05:00Z"
    ]


# --- valid HE material, mutated (bit flips, splices, length-field and coefficient edits) -----
#
# The input is a mutation program applied to a valid serialization, not the serialization itself:
# libFuzzer's own mutations rarely keep a 263 KB structure intact, and a 17 MB rotation-key map is
# far beyond what it can mutate at speed. Every accepted result is then used as a service uses it
# (a query added to the context's ciphertext; a public key and rotation keys validated as the key
# service does, which encrypts and rotates with them), in the fuzzer's process: a signal there is
# a crash libFuzzer reports, with the program that made it.

_MATERIAL: dict[str, tuple[bytes, bytes]] = {}  # kind -> two valid serializations under two key pairs
_LENGTHS = (0, 1, 8191, 8193, 16384, 1 << 29, 1 << 63, 2**64 - 1)


def _material(kind: str) -> tuple[bytes, bytes]:
    if not _MATERIAL:
        import numpy as np

        from cipherfeed.client import keystore
        from cipherfeed.he.codec import serialize

        codec = _codec()
        pairs = [keystore.generate(codec.params) for _ in range(2)]
        cc = codec.cc

        def query(keys: Any) -> bytes:
            return serialize(cc.Encrypt(keys.public_key, cc.MakeCKKSPackedPlaintext(np.full(codec.params.slots, 0.25))))

        _MATERIAL["query"] = (query(pairs[0]), query(pairs[1]))
        _MATERIAL["public_key"] = (pairs[0].public_key_bytes, pairs[1].public_key_bytes)
        _MATERIAL["rotation_keys"] = (pairs[0].rotation_key_bytes, pairs[1].rotation_key_bytes)
    return _MATERIAL[kind]


def mutate_material(data: bytes, blob: bytes, other: bytes, template: Any) -> bytes:
    """``blob`` changed by the program ``data``: up to 4 edits, each a bit flip anywhere, a structural
    byte XORed, a coefficient-vector length word or a coefficient set to an edge value, a range
    spliced in from ``other`` (same kind, another key pair) in place or shifted, a cut or an
    appendix, or one tag slot given the other key's tag."""
    import atheris

    fdp = atheris.FuzzedDataProvider(data)
    out = bytearray(blob)
    structure = template.structure_offsets
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        op, n = fdp.ConsumeIntInRange(0, 8), len(out)
        if n == 0:
            break
        if op == 0:
            i = fdp.ConsumeIntInRange(0, n - 1)
            out[i] ^= 1 << fdp.ConsumeIntInRange(0, 7)
        elif op == 1:
            i = int(structure[fdp.ConsumeIntInRange(0, len(structure) - 1)])
            if i < n:
                out[i] ^= fdp.ConsumeIntInRange(1, 255)
        elif op in (2, 3):
            run = template.runs[fdp.ConsumeIntInRange(0, len(template.runs) - 1)]
            if op == 2:  # the length word in front of the vector
                at, value = run.start - 8, _LENGTHS[fdp.ConsumeIntInRange(0, len(_LENGTHS) - 1)]
            else:
                at = run.start + 8 * fdp.ConsumeIntInRange(0, run.words - 1)
                value = (run.modulus - 1, run.modulus, run.modulus + 1, 2**64 - 1, 0)[fdp.ConsumeIntInRange(0, 4)]
            if at + 8 <= n:
                out[at : at + 8] = value.to_bytes(8, "little")
        elif op == 4:  # in place: same length
            a = fdp.ConsumeIntInRange(0, min(n, len(other)) - 1)
            b = min(n, len(other), a + fdp.ConsumeIntInRange(1, 4096))
            out[a:b] = other[a:b]
        elif op == 5:  # shifted: another length
            a, b = fdp.ConsumeIntInRange(0, n), fdp.ConsumeIntInRange(0, len(other))
            out = out[:a] + other[b:]
        elif op == 6:
            out = out[: fdp.ConsumeIntInRange(0, n - 1)]
        elif op == 7:
            out += fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64)) or b"\x00"
        else:
            t = template.tags[fdp.ConsumeIntInRange(0, len(template.tags) - 1)]
            out[t : t + template.tag_length] = other[template.tags[0] : template.tags[0] + template.tag_length]
    return bytes(out)


def _mutated_target(kind: str) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        from cipherfeed.he import keymap
        from cipherfeed.he.codec import Kind, MaterialError
        from cipherfeed.he.keymap import KeyMaterial

        codec = _codec()
        blob, other = _material(kind)
        codec_kind = {"query": Kind.QUERY, "public_key": Kind.PUBLIC_KEY, "rotation_keys": Kind.ROTATION_KEYS}[kind]
        mutated = mutate_material(data, blob, other, codec.check(codec_kind, blob))
        with contextlib.suppress(MaterialError):
            if kind == "query":
                ct = codec.load_query(mutated)
                codec.cc.EvalAdd(ct, ct)
            elif kind == "public_key":
                keymap.validate(codec, KeyMaterial(mutated, _material("rotation_keys")[0]))
            else:
                keymap.validate(codec, KeyMaterial(_material("public_key")[0], mutated))

    return run


# --- the device's check of score ciphertexts (cipherfeed/he/scorecheck.py) --------------------
#
# A hostile recommender's answer as the SDK reads it: the packed blob unpacked (bounded), checked
# against the score templates and, if accepted, deserialized and decrypted. The input is a mode
# byte and a mutation program: mode 0 takes the rest as the packed blob itself; mode 1 mutates a
# valid score serialization of either layout (``mutate_material``'s edits) and packs it as the
# server does; mode 2 packs first and flips, cuts or extends the packed bytes (its framing).

_SCORES: list[Any] = []  # (checker, secret key, tag, [(serialization, other key pair's)] per layout)
_SCORE_TAG = "5e" * 32 + ":1"  # the tag a recommender scores under (keymap.installed_tag)


def _scores() -> Any:
    if not _SCORES:
        from cipherfeed.he import scorecheck
        from cipherfeed.he.params import MESH_PARAMS

        checker = scorecheck.for_params(MESH_PARAMS)
        mine, other = (scorecheck.score_layouts(checker.codec, _SCORE_TAG) for _ in range(2))
        _SCORES.append((checker, mine[0], list(zip(mine[1], other[1], strict=True))))
    return _SCORES[0]


def he_scores(data: bytes) -> None:
    import atheris

    from cipherfeed.he import wire
    from cipherfeed.he.codec import MaterialError

    checker, secret, layouts = _scores()
    if not data:
        return
    mode, program = data[0] % 3, data[1:]
    if mode == 0:
        packed = program
    else:
        fdp = atheris.FuzzedDataProvider(program[:2])
        blob, other = layouts[fdp.ConsumeIntInRange(0, len(layouts) - 1)]
        template = checker.templates(len(_SCORE_TAG)).check(blob, _SCORE_TAG.encode())
        if mode == 1:
            packed = wire.pack(mutate_material(program[2:], blob, other, template), (checker.params.ring_dimension,))
        else:
            packed = bytearray(wire.pack(blob, (checker.params.ring_dimension,)))
            edits = atheris.FuzzedDataProvider(program[2:])
            for _ in range(edits.ConsumeIntInRange(1, 4)):
                op = edits.ConsumeIntInRange(0, 2)
                if op == 0 and packed:
                    packed[edits.ConsumeIntInRange(0, min(len(packed), 64) - 1)] ^= edits.ConsumeIntInRange(1, 255)
                elif op == 1:
                    del packed[edits.ConsumeIntInRange(0, len(packed)) :]
                else:
                    packed += edits.ConsumeBytes(edits.ConsumeIntInRange(1, 64)) or b"\x00"
            packed = bytes(packed)
    with contextlib.suppress(MaterialError):
        ct = checker.load(packed, _SCORE_TAG)
        checker.codec.cc.Decrypt(secret, ct)  # as the SDK does with what it accepts


def he_scores_seeds() -> list[bytes]:
    from cipherfeed.he import wire

    checker, _, layouts = _scores()
    programs = [bytes([mode]) + p for mode in (1, 2) for p in _program_seeds()]
    return programs + [b"\x00" + wire.pack(blob, (checker.params.ring_dimension,)) for blob, _ in layouts]


def _program_seeds() -> list[bytes]:
    return [bytes(range(i, i + 64)) for i in range(0, 192, 32)] + [bytes(64)]


TARGETS: dict[str, Target] = {
    "saved_receipt": Target(saved_receipt, saved_receipt_seeds, ("cipherfeed.client.verify", "cipherfeed.receipts")),
    "he_mutated_query": Target(_mutated_target("query"), _program_seeds, ("cipherfeed.he.codec",), 2000),
    "he_mutated_public_key": Target(_mutated_target("public_key"), _program_seeds, ("cipherfeed.he.codec",), 400),
    "he_rotation_keys": Target(
        _mutated_target("rotation_keys"), _program_seeds, ("cipherfeed.he.codec", "cipherfeed.he.keymap"), 60
    ),
    "checkpoint": Target(checkpoint_note, checkpoint_seeds, ("cipherfeed.checkpoint",)),
    "merkle": Target(merkle_proofs, merkle_seeds, ("cipherfeed.merkle",)),
    "wire": Target(wire_unpack, wire_seeds, ("cipherfeed.he.wire",)),
    "he_query": Target(he_query, lambda: [_he_pair()[0]], ("cipherfeed.he.codec",), 50_000),
    "he_public_key": Target(he_public_key, lambda: [_he_pair()[1]], ("cipherfeed.he.codec",), 50_000),
    "he_scores": Target(he_scores, he_scores_seeds, ("cipherfeed.he.scorecheck", "cipherfeed.he.wire"), 50_000),
    "manifest": Target(manifest, manifest_seeds, ("cipherfeed.manifest",)),
    "siwe_message": Target(siwe_message, siwe_seeds, ("cipherfeed.siwe",)),
    "ledger_entries": Target(ledger_entries, ledger_entry_seeds, ("cipherfeed.receipts", "services.ledger.servicer")),
}
