"""Durable key storage: SQLite (WAL, synchronous=FULL: an acknowledged change survives a crash;
secure_delete: destroyed material is zeroed) by default, or PostgreSQL for a server database
(``postgresql://`` DSN; destroyed material is scrubbed with VACUUM FULL). Both keep an audit table
that triggers make append-only, and every change commits with its audit entry in one transaction."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from cipherfeed.config import sqlite_path
from cipherfeed.errors import Reason, ResourceExhausted
from cipherfeed.he.keymap import KeyMaterial
from cipherfeed.keystate import KeyState
from cipherfeed.sqlitedb import DurableDatabase

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS he_keys (
  key_id TEXT PRIMARY KEY,
  state TEXT NOT NULL CHECK (state IN ('ENABLED', 'DISABLED', 'DESTROYED')),
  current_version INTEGER NOT NULL,
  min_version INTEGER NOT NULL,
  created_unix INTEGER NOT NULL,
  updated_unix INTEGER NOT NULL,
  owner TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS owner_nonces (
  signer TEXT NOT NULL,
  nonce BLOB NOT NULL,
  expires_unix INTEGER NOT NULL,
  PRIMARY KEY (signer, nonce)
);
CREATE INDEX IF NOT EXISTS owner_nonces_expiry ON owner_nonces(expires_unix);
CREATE TABLE IF NOT EXISTS he_key_versions (
  key_id TEXT NOT NULL REFERENCES he_keys(key_id),
  version INTEGER NOT NULL,
  public_key BLOB,
  rotation_keys BLOB,
  material_sha256 BLOB,
  material_bytes INTEGER NOT NULL,
  created_unix INTEGER NOT NULL,
  PRIMARY KEY (key_id, version)
);
CREATE TABLE IF NOT EXISTS signing_keys (
  name TEXT NOT NULL,
  version INTEGER NOT NULL,
  public_key BLOB NOT NULL,
  wrapped_private_key BLOB NOT NULL,
  created_unix INTEGER NOT NULL,
  PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS audit (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  unix_millis INTEGER NOT NULL,
  action TEXT NOT NULL,
  subject TEXT NOT NULL,
  version INTEGER NOT NULL,
  detail TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
  BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
  BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS he_keys (
  key_id TEXT PRIMARY KEY,
  state TEXT NOT NULL CHECK (state IN ('ENABLED', 'DISABLED', 'DESTROYED')),
  current_version INTEGER NOT NULL,
  min_version INTEGER NOT NULL,
  created_unix BIGINT NOT NULL,
  updated_unix BIGINT NOT NULL
);
ALTER TABLE he_keys ADD COLUMN IF NOT EXISTS owner TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS he_keys_owner ON he_keys(owner);
CREATE TABLE IF NOT EXISTS owner_nonces (
  signer TEXT NOT NULL,
  nonce BYTEA NOT NULL,
  expires_unix BIGINT NOT NULL,
  PRIMARY KEY (signer, nonce)
);
CREATE INDEX IF NOT EXISTS owner_nonces_expiry ON owner_nonces(expires_unix);
CREATE TABLE IF NOT EXISTS he_key_versions (
  key_id TEXT NOT NULL REFERENCES he_keys(key_id),
  version INTEGER NOT NULL,
  public_key BYTEA,
  rotation_keys BYTEA,
  material_sha256 BYTEA,
  material_bytes BIGINT NOT NULL,
  created_unix BIGINT NOT NULL,
  PRIMARY KEY (key_id, version)
);
CREATE TABLE IF NOT EXISTS signing_keys (
  name TEXT NOT NULL,
  version INTEGER NOT NULL,
  public_key BYTEA NOT NULL,
  wrapped_private_key BYTEA NOT NULL,
  created_unix BIGINT NOT NULL,
  PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS audit (
  seq BIGSERIAL PRIMARY KEY,
  unix_millis BIGINT NOT NULL,
  action TEXT NOT NULL,
  subject TEXT NOT NULL,
  version INTEGER NOT NULL,
  detail TEXT NOT NULL
);
CREATE OR REPLACE FUNCTION cipherfeed_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
  BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
DROP TRIGGER IF EXISTS audit_append_only ON audit;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
  FOR EACH ROW EXECUTE FUNCTION cipherfeed_audit_append_only();
DROP TRIGGER IF EXISTS audit_no_truncate ON audit;
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
  FOR EACH STATEMENT EXECUTE FUNCTION cipherfeed_audit_append_only();
"""


class NonceStoreFull(ResourceExhausted):
    """More unexpired signatures than the store keeps: refuse rather than forget one."""

    reason = Reason.COUNT_LIMIT


@dataclass(frozen=True)
class VersionRow:
    version: int
    material_sha256: bytes | None
    material_bytes: int
    created_unix: int


@dataclass(frozen=True)
class KeyRow:
    key_id: str
    state: KeyState
    current_version: int
    min_version: int
    created_unix: int
    updated_unix: int
    versions: tuple[VersionRow, ...]
    owner: str = ""  # checksummed Ethereum address; "" for keys registered before owners existed


@dataclass(frozen=True)
class SigningRow:
    name: str
    version: int
    public_key: bytes
    wrapped_private_key: bytes
    created_unix: int


@dataclass(frozen=True)
class AuditRow:
    seq: int
    unix_millis: int
    action: str
    subject: str
    version: int
    detail: str


class KeyStore:
    """Key storage over SQLite (``sqlite:///path``) or PostgreSQL (``postgresql://...``)."""

    def __init__(self, dsn: str) -> None:
        if dsn.startswith(("postgresql://", "postgres://")):
            from cipherfeed.pgdb import PostgresDatabase

            self.db: DurableDatabase | PostgresDatabase = PostgresDatabase(dsn, POSTGRES_SCHEMA)
        else:
            path = sqlite_path(dsn, "CIPHERFEED_KEYSERVICE_DSN")
            self.db = DurableDatabase(path, SQLITE_SCHEMA, ("secure_delete=ON",))
            # Databases made before keys had owners (SQLite has no ADD COLUMN IF NOT EXISTS).
            if "owner" not in {r[1] for r in self.db.query("PRAGMA table_info(he_keys)")}:
                with self.db.transaction() as db:
                    db.execute("ALTER TABLE he_keys ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
            with self.db.transaction() as db:
                db.execute("CREATE INDEX IF NOT EXISTS he_keys_owner ON he_keys(owner)")
        self.path = self.db.path

    def close(self) -> None:
        self.db.close()

    def transaction(self) -> Any:
        return self.db.transaction()

    def locked(self) -> Any:
        return self.db.locked()

    @staticmethod
    def audit(db: Any, action: str, subject: str, version: int, detail: dict[str, Any]) -> None:
        db.execute(
            "INSERT INTO audit (unix_millis, action, subject, version, detail) VALUES (?, ?, ?, ?, ?)",
            (int(time.time() * 1000), action, subject, version, json.dumps(detail, sort_keys=True)),
        )

    # --- client HE keys -------------------------------------------------------------------

    def key(self, key_id: str) -> KeyRow | None:
        with self.db.locked():
            rows = self.db.query(
                "SELECT key_id, state, current_version, min_version, created_unix, updated_unix, owner"
                " FROM he_keys WHERE key_id = ?",
                (key_id,),
            )
            if not rows:
                return None
            row = rows[0]
            versions = [
                (v[0], bytes(v[1]) if v[1] is not None else None, v[2], v[3])
                for v in self.db.query(
                    "SELECT version, material_sha256, material_bytes, created_unix FROM he_key_versions"
                    " WHERE key_id = ? ORDER BY version",
                    (key_id,),
                )
            ]
        return KeyRow(
            key_id=row[0],
            state=KeyState(row[1]),
            current_version=row[2],
            min_version=row[3],
            created_unix=row[4],
            updated_unix=row[5],
            versions=tuple(VersionRow(*v) for v in versions),
            owner=row[6],
        )

    def owner_usage(self, owner: str) -> tuple[int, int]:
        """(keys not destroyed, bytes of key material stored) of one owner."""
        rows = self.db.query(
            "SELECT COUNT(DISTINCT k.key_id), COALESCE(SUM(CASE WHEN v.public_key IS NULL THEN 0"
            " ELSE v.material_bytes END), 0) FROM he_keys k LEFT JOIN he_key_versions v ON v.key_id = k.key_id"
            " WHERE k.owner = ? AND k.state <> 'DESTROYED'",
            (owner,),
        )
        return int(rows[0][0]), int(rows[0][1])

    def claim_nonce(self, signer: str, nonce: bytes, expires_unix: int, max_rows: int) -> bool:
        """Records a signature's nonce until it expires; False if it is recorded (a replay)."""
        with self.db.transaction() as db:
            db.execute("DELETE FROM owner_nonces WHERE expires_unix < ?", (int(time.time()),))
            count = db.execute("SELECT COUNT(*) FROM owner_nonces").fetchone()[0]
            inserted = db.execute(
                "INSERT INTO owner_nonces (signer, nonce, expires_unix) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (signer, nonce, expires_unix),
            ).rowcount
            if inserted and count >= max_rows:
                raise NonceStoreFull("too many signed requests in flight; retry shortly")
        return inserted == 1

    def material(self, key_id: str, version: int) -> KeyMaterial | None:
        rows = self.db.query(
            "SELECT public_key, rotation_keys FROM he_key_versions WHERE key_id = ? AND version = ?",
            (key_id, version),
        )
        row = rows[0] if rows else None
        if row is None or row[0] is None:
            return None
        return KeyMaterial(public_key=bytes(row[0]), rotation_keys=bytes(row[1]))

    @staticmethod
    def insert_version(db: Any, key_id: str, version: int, material: KeyMaterial, now: int) -> None:
        db.execute(
            "INSERT INTO he_key_versions (key_id, version, public_key, rotation_keys, material_sha256,"
            " material_bytes, created_unix) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key_id,
                version,
                material.public_key,
                material.rotation_keys,
                material.sha256,
                material.size,
                now,
            ),
        )

    # --- signing keys ---------------------------------------------------------------------

    def signing_keys(self, name: str | None = None) -> list[SigningRow]:
        query = "SELECT name, version, public_key, wrapped_private_key, created_unix FROM signing_keys"
        rows = (
            self.db.query(query + " WHERE name = ? ORDER BY version", (name,))
            if name
            else self.db.query(query + " ORDER BY name, version")
        )
        return [SigningRow(r[0], r[1], bytes(r[2]), bytes(r[3]), r[4]) for r in rows]

    # --- audit ----------------------------------------------------------------------------

    def audit_entries(self, after_seq: int, limit: int, subject: str | None = None) -> list[AuditRow]:
        query = "SELECT seq, unix_millis, action, subject, version, detail FROM audit WHERE seq > ?"
        if subject is None:
            rows = self.db.query(query + " ORDER BY seq LIMIT ?", (after_seq, limit))
        else:
            rows = self.db.query(query + " AND subject = ? ORDER BY seq LIMIT ?", (after_seq, subject, limit))
        return [AuditRow(*r) for r in rows]
