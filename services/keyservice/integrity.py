"""An offline integrity check of the key service's store under its master key: every stored key
version's material digest and size are those of its material; every signing key's envelope opens
under the master key (AES-GCM: its tag is the record's MAC, bound to the key's name and version)
and holds the private half of the public key stored beside it; key versions run 1..current without
a gap."""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cipherfeed.he.keymap import KeyMaterial
from services.keyservice.core import _signing_context
from services.keyservice.envelope import EnvelopeError, MasterKey
from services.keyservice.store import KeyStore


@dataclass
class KeyStoreIntegrity:
    keys: int = 0
    versions: int = 0
    signing_keys: int = 0
    audit_entries: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_key_store(store: KeyStore, master: MasterKey) -> KeyStoreIntegrity:
    report = KeyStoreIntegrity()
    versions: dict[str, list[int]] = {}
    rows = store.db.query(
        "SELECT key_id, version, public_key, rotation_keys, material_sha256, material_bytes FROM he_key_versions"
        " ORDER BY key_id, version"
    )
    for key_id, version, public, rotation, digest, size in rows:
        versions.setdefault(key_id, []).append(int(version))
        if public is None:  # destroyed: the material is gone, its digest stays as a record
            continue
        material = KeyMaterial(bytes(public), bytes(rotation))
        if digest is None or material.sha256 != bytes(digest) or material.size != int(size):
            report.problems.append(f"key {key_id[:16]} version {version}: material does not match its digest")
    report.versions = len(rows)
    for key_id, current in store.db.query("SELECT key_id, current_version FROM he_keys"):
        report.keys += 1
        if versions.get(key_id, []) != list(range(1, int(current) + 1)):
            report.problems.append(f"key {key_id[:16]}: versions {versions.get(key_id)} for current {current}")
    for row in store.signing_keys():
        report.signing_keys += 1
        try:
            raw = master.unwrap(row.wrapped_private_key, _signing_context(row.name, row.version))
        except EnvelopeError:
            report.problems.append(f"signing key {row.name} v{row.version}: its envelope does not open (MAC)")
            continue
        public = (
            Ed25519PrivateKey.from_private_bytes(raw)
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        if public != row.public_key:
            report.problems.append(f"signing key {row.name} v{row.version}: the stored public key is not its own")
    report.audit_entries = int(store.db.query("SELECT COUNT(*) FROM audit")[0][0])
    return report
