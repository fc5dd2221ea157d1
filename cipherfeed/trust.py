"""The trust a device pins: what the operator publishes once, and the only thing ``verify`` believes.

A trust file is JSON with exactly these fields:

* ``format``: ``"cipherfeed-trust/v1"``;
* ``log_origin``: the transparency log's name (the first line of every checkpoint);
* ``checkpoint_vkeys``: the C2SP verifier keys (``<name>+<hex id>+<base64>``) whose signatures on a
  checkpoint are accepted; a new checkpoint key is accepted only once a trust file lists it;
* ``chain_id``: the EIP-155 chain id of the chain holding the anchors;
* ``anchor_contract``: the address of the ``CheckpointAnchor`` contract on that chain;
* ``mesh_ca_pem``: the mesh's CA certificate (PEM), or null while the mesh runs without TLS.

The ledger and the key service are what is being verified, so nothing they say (the origin they
serve, the keys they list, the contract they point at) replaces anything here. The pinned copy lives
in the client home as ``trust.json`` (mode 0644: public, but writable by its owner only); its
fingerprint, the SHA-256 of its canonical JSON, lets a user compare it with the operator's.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cipherfeed.atomicfile import PUBLIC, write_atomic
from cipherfeed.checkpoint import NoteError, Verifier

FORMAT = "cipherfeed-trust/v1"
PINNED_FILE = "trust.json"
MAX_TRUST_FILE_BYTES = 256 * 1024
_FIELDS = frozenset({"format", "log_origin", "checkpoint_vkeys", "chain_id", "anchor_contract", "mesh_ca_pem"})
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


class TrustError(ValueError):
    """A trust file is missing, unsafe or malformed."""


@dataclass(frozen=True)
class TrustAnchors:
    log_origin: str
    checkpoint_vkeys: tuple[str, ...]
    chain_id: int
    anchor_contract: str  # EIP-55 checksummed
    mesh_ca_pem: str | None = None

    @property
    def verifiers(self) -> list[Verifier]:
        return [Verifier.from_vkey(v) for v in self.checkpoint_vkeys]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "log_origin": self.log_origin,
            "checkpoint_vkeys": list(self.checkpoint_vkeys),
            "chain_id": self.chain_id,
            "anchor_contract": self.anchor_contract,
            "mesh_ca_pem": self.mesh_ca_pem,
        }

    def canonical(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    def same_contract(self, address: str) -> bool:
        return address.lower() == self.anchor_contract.lower()


def checksum_address(address: str) -> str:
    """The EIP-55 form of ``address``; TrustError if it is not one, or a mixed-case one that fails
    its checksum (a typo'd address must not silently become another contract)."""
    from eth_utils.address import to_checksum_address

    if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
        raise TrustError(f"anchor_contract {str(address)[:60]!r} is not a 0x-prefixed 20-byte address")
    checksummed: str = to_checksum_address(address)
    body = address[2:]
    if body != body.lower() and body != body.upper() and address != checksummed:
        raise TrustError(f"anchor_contract {address} fails its EIP-55 checksum")
    return checksummed


def parse(data: bytes) -> TrustAnchors:
    if len(data) > MAX_TRUST_FILE_BYTES:
        raise TrustError(f"a trust file is at most {MAX_TRUST_FILE_BYTES} bytes")
    try:
        d = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrustError(f"not JSON: {exc}") from None
    except RecursionError:
        raise TrustError("not a trust file: nested too deeply") from None
    if not isinstance(d, dict):
        raise TrustError("a trust file is a JSON object")
    keys = set(d)
    if keys != _FIELDS:
        missing, extra = sorted(_FIELDS - keys), sorted(keys - _FIELDS)
        raise TrustError(f"trust file fields: missing {missing}, unknown {extra}")
    if d["format"] != FORMAT:
        raise TrustError(f"format {str(d['format'])[:40]!r} is not {FORMAT!r}")
    origin = d["log_origin"]
    if not isinstance(origin, str) or not origin or "\n" in origin or len(origin) > 255:
        raise TrustError("log_origin is a non-empty single-line string")
    vkeys = d["checkpoint_vkeys"]
    if not isinstance(vkeys, list) or not vkeys or not all(isinstance(v, str) for v in vkeys):
        raise TrustError("checkpoint_vkeys is a non-empty list of C2SP verifier keys")
    for v in vkeys:
        try:
            Verifier.from_vkey(v)
        except NoteError as exc:
            raise TrustError(f"checkpoint_vkeys: {exc}") from None
    chain_id = d["chain_id"]
    if not isinstance(chain_id, int) or isinstance(chain_id, bool) or not 0 < chain_id < 2**64:
        raise TrustError("chain_id is a positive integer")
    ca = d["mesh_ca_pem"]
    if ca is not None and (not isinstance(ca, str) or "-----BEGIN CERTIFICATE-----" not in ca):
        raise TrustError("mesh_ca_pem is a PEM certificate or null")
    return TrustAnchors(origin, tuple(vkeys), chain_id, checksum_address(d["anchor_contract"]), ca)


def read(path: Path) -> TrustAnchors:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_TRUST_FILE_BYTES + 1)
    except OSError as exc:
        raise TrustError(f"cannot read trust file {path}: {exc.strerror}") from None
    try:
        return parse(data)
    except TrustError as exc:
        raise TrustError(f"{path}: {exc}") from None


def write(trust: TrustAnchors, path: Path) -> None:
    """Writes ``trust`` as a trust file an operator publishes (pretty JSON, mode 0644)."""
    write_atomic(path, (json.dumps(trust.to_json(), indent=2, sort_keys=True) + "\n").encode(), PUBLIC)


def pinned_path(home: Path) -> Path:
    return home / PINNED_FILE


def pin(source: Path, home: Path, force: bool = False, expect_fingerprint: str | None = None) -> TrustAnchors:
    """Checks ``source`` completely and copies it into ``home``; refuses to replace a pinned file
    unless ``force``, and one whose fingerprint differs from ``expect_fingerprint`` if given."""
    trust = read(source)
    if expect_fingerprint is not None and expect_fingerprint.lower().removeprefix("sha256:") != trust.fingerprint:
        raise TrustError(f"{source} has fingerprint {trust.fingerprint}, not the expected {expect_fingerprint}")
    return pin_anchors(trust, home, force)


def pin_anchors(trust: TrustAnchors, home: Path, force: bool = False) -> TrustAnchors:
    target = pinned_path(home)
    if target.exists() and not force:
        raise TrustError(f"{target} is already pinned (fingerprint {load_pinned(home).fingerprint}); pass --force")
    home.mkdir(parents=True, exist_ok=True)
    write(trust, target)
    return trust


def load_pinned(home: Path) -> TrustAnchors:
    """The pinned trust; TrustError if there is none or others may have changed it."""
    path = pinned_path(home)
    if not path.exists():
        raise TrustError(f"no trust pinned in {home}: run 'cipherfeed trust init <operator trust file>'")
    mode = path.stat().st_mode & 0o777
    if mode & 0o022:
        raise TrustError(f"{path} is writable by others (mode {mode:o}); pin it again with 'cipherfeed trust init'")
    return read(path)
