"""Durable ledger storage: SQLite, WAL, synchronous=FULL (a committed append survives a crash)."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from cipherfeed.sqlitedb import DurableDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS leaves (idx INTEGER PRIMARY KEY, hash BLOB NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS leaves_by_hash ON leaves(hash);
CREATE TABLE IF NOT EXISTS checkpoints (
  size INTEGER PRIMARY KEY, root BLOB NOT NULL, note TEXT NOT NULL, created_unix INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS anchors (
  size INTEGER PRIMARY KEY REFERENCES checkpoints(size),
  root BLOB NOT NULL,
  confirmed INTEGER NOT NULL DEFAULT 0,
  chain_id TEXT, contract TEXT, tx_hash TEXT, block_number INTEGER,
  updated_unix INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class CheckpointRow:
    size: int
    root: bytes
    note: str


@dataclass(frozen=True)
class AnchorRow:
    size: int
    root: bytes
    confirmed: bool
    chain_id: str | None
    contract: str | None
    tx_hash: str | None
    block_number: int | None


class LedgerStore(DurableDatabase):
    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA, extra_pragmas=())

    def leaf_hashes(self) -> list[bytes]:
        with self._lock:
            return [bytes(r[0]) for r in self._db.execute("SELECT hash FROM leaves ORDER BY idx")]

    def append(self, db: sqlite3.Connection, first_index: int, items: list[tuple[bytes, bytes]]) -> None:
        db.executemany(
            "INSERT INTO leaves (idx, hash, data) VALUES (?, ?, ?)",
            [(first_index + i, h, d) for i, (h, d) in enumerate(items)],
        )

    def leaf(self, index: int) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM leaves WHERE idx = ?", (index,)).fetchone()
        return bytes(row[0]) if row else None

    def index_of(self, leaf_hash: bytes) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(idx) FROM leaves WHERE hash = ?", (leaf_hash,)).fetchone()
        return row[0] if row and row[0] is not None else None

    def latest_checkpoint(self) -> CheckpointRow | None:
        with self._lock:
            row = self._db.execute("SELECT size, root, note FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
        return CheckpointRow(row[0], bytes(row[1]), row[2]) if row else None

    def checkpoint_covering(self, index: int) -> CheckpointRow | None:
        """The latest checkpoint (it covers every leaf below its size)."""
        latest = self.latest_checkpoint()
        return latest if latest is not None and latest.size > index else None

    def add_checkpoint(self, db: sqlite3.Connection, size: int, root: bytes, note: str) -> None:
        now = int(time.time())
        db.execute(
            "INSERT INTO checkpoints (size, root, note, created_unix) VALUES (?, ?, ?, ?)", (size, root, note, now)
        )
        db.execute("INSERT INTO anchors (size, root, confirmed, updated_unix) VALUES (?, ?, 0, ?)", (size, root, now))

    def anchors(self, min_size: int = 0, pending_only: bool = False) -> list[AnchorRow]:
        query = "SELECT size, root, confirmed, chain_id, contract, tx_hash, block_number FROM anchors WHERE size >= ?"
        if pending_only:
            query += " AND confirmed = 0"
        with self._lock:
            rows = self._db.execute(query + " ORDER BY size", (min_size,)).fetchall()
        return [AnchorRow(r[0], bytes(r[1]), bool(r[2]), r[3], r[4], r[5], r[6]) for r in rows]

    def confirm_anchor(self, size: int, chain_id: str, contract: str, tx_hash: str, block: int) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE anchors SET confirmed = 1, chain_id = ?, contract = ?, tx_hash = ?, block_number = ?,"
                " updated_unix = ? WHERE size = ?",
                (chain_id, contract, tx_hash, block, int(time.time()), size),
            )

    def requeue_all_anchors(self) -> None:
        """Marks every checkpoint unanchored (used when the chain was replaced by a new one)."""
        with self.transaction() as db:
            db.execute("UPDATE anchors SET confirmed = 0, tx_hash = NULL, block_number = NULL")

    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
