"""Envelope encryption of secrets at rest: each secret under its own AES-256-GCM data key, each
data key under the master key. The database alone reveals no secret; the master key lives outside
it (environment or file)."""

from __future__ import annotations

import base64
import binascii
import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cipherfeed.atomicfile import PRIVATE, write_atomic
from cipherfeed.config import ConfigError

log = logging.getLogger(__name__)
MAGIC = b"CFENV1"
NONCE = 12


class EnvelopeError(RuntimeError):
    """A wrapped secret does not open under this master key (wrong key or tampered data)."""


class MasterKey:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ConfigError("the master key must be 32 bytes (AES-256)")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "MasterKey(<redacted>)"

    @classmethod
    def load(cls, key_file: Path | None, state_dir: Path) -> MasterKey:
        """``CIPHERFEED_MASTER_KEY`` (base64), else ``key_file``, else a development key created
        once in ``state_dir`` (with a warning: production must supply its own)."""
        raw = os.environ.get("CIPHERFEED_MASTER_KEY")
        if raw:
            return cls(_decode(raw, "CIPHERFEED_MASTER_KEY"))
        if key_file is not None:
            try:
                data = key_file.read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read master key file {key_file}: {exc.strerror}") from exc
            return cls(data if len(data) == 32 else _decode(data.decode().strip(), str(key_file)))
        dev = state_dir / "master.key"
        if not dev.exists():
            try:
                write_atomic(dev, AESGCM.generate_key(bit_length=256), PRIVATE, replace=False)
            except FileExistsError:
                pass  # another process created it first: use that one
            else:
                log.warning(
                    "created a development master key at %s; set CIPHERFEED_MASTER_KEY(_FILE) in production", dev
                )
        return cls(dev.read_bytes())

    def wrap(self, secret: bytes, context: bytes) -> bytes:
        """``context`` (e.g. key name and version) is authenticated: a blob moved to another row fails."""
        dek = AESGCM.generate_key(bit_length=256)
        n1, n2 = os.urandom(NONCE), os.urandom(NONCE)
        sealed = AESGCM(dek).encrypt(n1, secret, context)
        wrapped_dek = self._aead.encrypt(n2, dek, b"cipherfeed-dek|" + context)
        return MAGIC + n2 + len(wrapped_dek).to_bytes(2, "big") + wrapped_dek + n1 + sealed

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        if not blob.startswith(MAGIC):
            raise EnvelopeError("not an envelope")
        pos = len(MAGIC)
        n2 = blob[pos : pos + NONCE]
        pos += NONCE
        size = int.from_bytes(blob[pos : pos + 2], "big")
        pos += 2
        wrapped_dek = blob[pos : pos + size]
        pos += size
        n1 = blob[pos : pos + NONCE]
        try:
            dek = self._aead.decrypt(n2, wrapped_dek, b"cipherfeed-dek|" + context)
            return AESGCM(dek).decrypt(n1, blob[pos + NONCE :], context)
        except (InvalidTag, ValueError) as exc:
            raise EnvelopeError("envelope does not open under this master key") from exc


def _decode(text: str | bytes, where: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{where} is not base64") from exc
    if len(key) != 32:
        raise ConfigError(f"{where} must decode to 32 bytes, got {len(key)}")
    return key
