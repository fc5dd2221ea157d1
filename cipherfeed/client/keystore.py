"""The client's CKKS key pair on disk, and beside it the Ethereum account that owns the registered
key. The secret key and account key files are 0600 in a 0700 directory and are never sent or
logged; only the public key, the rotation key map and the account's address are uploaded."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import openfhe
from eth_account import Account
from eth_account.signers.local import LocalAccount

from cipherfeed.atomicfile import write_atomic
from cipherfeed.he import globalkeys
from cipherfeed.he.codec import serialize
from cipherfeed.he.params import HEParams, build_context, context_fingerprint

SECRET_FILE = "secret.key"
PUBLIC_FILE = "public.key"
ROTATION_FILE = "rotation.keys"
META_FILE = "keys.json"
ACCOUNT_FILE = "owner.key"  # the owner account's secp256k1 private key, hex


class KeyStoreError(RuntimeError):
    """The key directory is missing, unsafe or made for other parameters."""


@dataclass
class ClientKeys:
    params: HEParams
    cc: openfhe.CryptoContext
    secret_key: openfhe.PrivateKey
    public_key: openfhe.PublicKey
    public_key_bytes: bytes
    rotation_key_bytes: bytes


def generate(params: HEParams) -> ClientKeys:
    cc = build_context(params)
    kp = cc.KeyGen()
    tag = kp.publicKey.GetKeyTag()
    # The client never rotates: the keys are serialized for upload and not kept in OpenFHE's map.
    rotation = globalkeys.generate_serialized(cc, kp.secretKey, params.rotation_indices, tag)
    return ClientKeys(params, cc, kp.secretKey, kp.publicKey, serialize(kp.publicKey), rotation)


def save(keys: ClientKeys, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    write_atomic(directory / SECRET_FILE, serialize(keys.secret_key))
    write_atomic(directory / PUBLIC_FILE, keys.public_key_bytes)
    write_atomic(directory / ROTATION_FILE, keys.rotation_key_bytes)
    meta = {"context_sha256": context_fingerprint(keys.cc).hex(), "params": keys.params.__dict__}
    write_atomic(directory / META_FILE, json.dumps(meta, sort_keys=True).encode())


def load(directory: Path, params: HEParams) -> ClientKeys:
    secret = directory / SECRET_FILE
    if not secret.is_file():
        raise KeyStoreError(f"no client keys in {directory}; run 'cipherfeed keys init'")
    mode = secret.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyStoreError(f"{secret} is readable by others (mode {mode:o}); chmod 600 it or make new keys")
    meta = json.loads((directory / META_FILE).read_text())
    cc = build_context(params)
    if meta["context_sha256"] != context_fingerprint(cc).hex():
        raise KeyStoreError(
            f"keys in {directory} were made for other HE parameters; run 'cipherfeed keys init --force'"
        )
    try:
        sk = openfhe.DeserializePrivateKeyString(secret.read_bytes(), openfhe.BINARY)
    except Exception as exc:
        raise KeyStoreError(f"{secret} is not a readable OpenFHE secret key") from exc
    public = (directory / PUBLIC_FILE).read_bytes()
    return ClientKeys(
        params=params,
        cc=cc,
        secret_key=sk,
        public_key=openfhe.DeserializePublicKeyString(public, openfhe.BINARY),
        public_key_bytes=public,
        rotation_key_bytes=(directory / ROTATION_FILE).read_bytes(),
    )


def load_or_create_account(directory: Path) -> LocalAccount:
    """The account that owns this device's keys: read from ``directory``, or made and saved there."""
    path = directory / ACCOUNT_FILE
    if path.is_file():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise KeyStoreError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
        try:
            return Account.from_key(bytes.fromhex(path.read_text().strip().removeprefix("0x")))
        except ValueError:
            raise KeyStoreError(f"{path} is not a secp256k1 private key in hex") from None
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    account = Account.create()
    write_atomic(path, account.key.hex().removeprefix("0x").encode())
    return account


def load_or_generate(directory: Path, params: HEParams) -> tuple[ClientKeys, bool]:
    """Existing keys for these parameters, or new ones saved to ``directory``; True if new."""
    if (directory / SECRET_FILE).is_file():
        return load(directory, params), False
    keys = generate(params)
    save(keys, directory)
    return keys, True


def load_test_keys(shared: ClientKeys) -> ClientKeys:
    """For load and memory tests only: a fresh key pair that reuses ``shared``'s rotation keys, so
    that many distinct users cost one rotation-key generation. Its scores decrypt to noise (the
    rotation keys belong to another secret key); its bytes and memory behave like a real user's."""
    kp = shared.cc.KeyGen()
    return ClientKeys(
        shared.params, shared.cc, kp.secretKey, kp.publicKey, serialize(kp.publicKey), shared.rotation_key_bytes
    )
