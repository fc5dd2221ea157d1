"""C2SP tlog-checkpoint bodies in C2SP signed notes, with Ed25519 signatures.

Body: ``<origin>\\n<tree size>\\n<base64 root hash>\\n``. A signed note is the body, a blank line,
then one line per signature: ``— <key name> <base64(key id || signature)>``, where the key id of an
Ed25519 key is ``SHA-256(name || 0x0A || 0x01 || public key)[:4]`` and the signature covers the body.
Verifier keys are written ``<name>+<hex key id>+<base64(0x01 || public key)>`` (a "vkey").
Shared by the ledger (which signs) and the client (which verifies).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ED25519 = 0x01
DASH = "\u2014"


class NoteError(ValueError):
    """A checkpoint or signed note is malformed or carries no valid signature by a trusted key."""


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes

    def body(self) -> str:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"


def key_id(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ED25519]) + public_key).digest()[:4]


def vkey(name: str, public_key: bytes) -> str:
    return f"{name}+{key_id(name, public_key).hex()}+{base64.b64encode(bytes([ED25519]) + public_key).decode()}"


@dataclass(frozen=True)
class Verifier:
    name: str
    public_key: bytes

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public_key)

    @classmethod
    def from_vkey(cls, text: str) -> Verifier:
        try:
            name, kid, key = text.strip().split("+", 2)  # the base64 key may itself contain "+"
            raw = base64.b64decode(key, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise NoteError(f"not a verifier key: {text!r}") from exc
        if len(raw) != 33 or raw[0] != ED25519:
            raise NoteError("only Ed25519 verifier keys are supported")
        verifier = cls(name, raw[1:])
        if verifier.key_id.hex() != kid:
            raise NoteError("verifier key id does not match its name and key")
        return verifier


def sign_note(body: str, name: str, public_key: bytes, sign: Callable[[bytes], bytes]) -> str:
    """The signed note for ``body`` with one signature line by ``name``."""
    if not body.endswith("\n") or "\n\n" in body:
        raise NoteError("a note body ends with a newline and has no blank line")
    signature = sign(body.encode())
    if len(signature) != 64:
        raise NoteError("an Ed25519 signature is 64 bytes")
    blob = base64.b64encode(key_id(name, public_key) + signature).decode()
    return f"{body}\n{DASH} {name} {blob}\n"


def open_note(note: str, verifiers: Iterable[Verifier]) -> tuple[str, list[Verifier]]:
    """The body of ``note`` and the trusted keys that signed it; NoteError if none did."""
    body, sep, sigs = note.rpartition("\n\n")
    if not sep:
        raise NoteError("signed note has no signature block")
    body += "\n"
    by_id: dict[tuple[str, bytes], Verifier] = {(v.name, v.key_id): v for v in verifiers}
    signed_by = []
    for line in sigs.splitlines():
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != DASH:
            raise NoteError(f"malformed signature line {line!r}")
        try:
            blob = base64.b64decode(parts[2], validate=True)
        except (ValueError, binascii.Error) as exc:
            raise NoteError("signature is not base64") from exc
        verifier = by_id.get((parts[1], blob[:4]))
        if verifier is None or len(blob) != 68:
            continue  # unknown keys are ignored, as the spec says
        try:
            Ed25519PublicKey.from_public_bytes(verifier.public_key).verify(blob[4:], body.encode())
        except InvalidSignature as exc:
            raise NoteError(f"signature by {verifier.name} does not verify") from exc
        signed_by.append(verifier)
    if not signed_by:
        raise NoteError("no signature by a trusted key")
    return body, signed_by


MAX_TREE_SIZE = 2**64 - 1  # C2SP sizes are uint64
_SIZE_DIGITS = len(str(MAX_TREE_SIZE))


def parse_tree_size(text: str) -> int:
    """A C2SP tree size: ASCII decimal digits, no sign, no leading zero (except "0"), a uint64.
    (``str.isdigit`` and ``int`` also take other scripts' digits, superscripts and underscores.)"""
    if (
        not 0 < len(text) <= _SIZE_DIGITS
        or not all("0" <= c <= "9" for c in text)
        or (len(text) > 1 and text[0] == "0")
    ):
        raise NoteError("a checkpoint size is ASCII decimal without leading zeros")
    size = int(text)
    if size > MAX_TREE_SIZE:
        raise NoteError("a checkpoint size is at most 2**64 - 1")
    return size


def parse_checkpoint(body: str) -> Checkpoint:
    lines = body.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise NoteError("a checkpoint body has origin, size and root lines")
    origin, size_text, root_text = lines[0], lines[1], lines[2]
    if not origin:
        raise NoteError("a checkpoint names its origin")
    size = parse_tree_size(size_text)
    try:
        root = base64.b64decode(root_text, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise NoteError("checkpoint root is not base64") from exc
    if len(root) != 32:
        raise NoteError("checkpoint root is not 32 bytes")
    return Checkpoint(origin=origin, size=size, root=root)


def verify_checkpoint(note: str, verifiers: Iterable[Verifier], origin: str | None = None) -> Checkpoint:
    body, _ = open_note(note, verifiers)
    checkpoint = parse_checkpoint(body)
    if origin is not None and checkpoint.origin != origin:
        raise NoteError(f"checkpoint is for log {checkpoint.origin!r}, not {origin!r}")
    return checkpoint
