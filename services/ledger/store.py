"""Durable ledger storage on SQLite (``sqlite:///path``: WAL, synchronous=FULL) or PostgreSQL
(``postgresql://...``: a committed transaction is on disk, synchronous_commit on). Either way a
committed append survives a crash. On PostgreSQL the ledger holds a session advisory lock for as
long as it runs: the log's tree lives in the one process that appends, so a second ledger on the
same database is refused at start instead of writing a fork."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from cipherfeed.config import sqlite_path
from cipherfeed.sqlitedb import DurableDatabase

SQLITE_SCHEMA = """
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

POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS leaves (idx BIGINT PRIMARY KEY, hash BYTEA NOT NULL, data BYTEA NOT NULL);
CREATE INDEX IF NOT EXISTS leaves_by_hash ON leaves(hash);
CREATE TABLE IF NOT EXISTS checkpoints (
  size BIGINT PRIMARY KEY, root BYTEA NOT NULL, note TEXT NOT NULL, created_unix BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS anchors (
  size BIGINT PRIMARY KEY REFERENCES checkpoints(size),
  root BYTEA NOT NULL,
  confirmed INTEGER NOT NULL DEFAULT 0,
  chain_id TEXT, contract TEXT, tx_hash TEXT, block_number BIGINT,
  updated_unix BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

LEDGER_LOCK_ID = 0x63666C67  # "cflg": one ledger per database
LOOKUP_CHUNK = 500  # hashes per IN (...) query


def is_postgres(dsn: str) -> bool:
    return dsn.startswith(("postgresql://", "postgres://"))


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


class LedgerStore:
    """The leaves, checkpoints, anchors and a small key/value table, over either database. SQL is
    written once with ``?`` placeholders; both databases take it."""

    def __init__(self, dsn: str, serving: bool = True) -> None:
        """``serving=False``: a reader beside the serving ledger (integrity checks, operators),
        which does not take the one-ledger-per-database lock and must not write."""
        if is_postgres(dsn):
            from cipherfeed.pgdb import PostgresDatabase

            pg = PostgresDatabase(dsn, POSTGRES_SCHEMA)
            if serving and not pg.try_session_lock(LEDGER_LOCK_ID):
                pg.close()
                raise RuntimeError("another ledger is serving from this database: refusing to start")
            self.db: DurableDatabase | Any = pg
        else:
            self.db = DurableDatabase(sqlite_path(dsn, "CIPHERFEED_LEDGER_DSN"), SQLITE_SCHEMA)
        self.backend = "postgresql" if is_postgres(dsn) else "sqlite"

    def close(self) -> None:
        self.db.close()

    def transaction(self) -> AbstractContextManager[Any]:
        ctx: AbstractContextManager[Any] = self.db.transaction()
        return ctx

    def leaf_hashes(self) -> list[bytes]:
        return [bytes(r[0]) for r in self.db.query("SELECT hash FROM leaves ORDER BY idx")]

    def leaf_hashes_from(self, first_index: int) -> list[bytes]:
        return [
            bytes(r[0]) for r in self.db.query("SELECT hash FROM leaves WHERE idx >= ? ORDER BY idx", (first_index,))
        ]

    def append(self, db: Any, first_index: int, items: list[tuple[bytes, bytes]]) -> None:
        db.executemany(
            "INSERT INTO leaves (idx, hash, data) VALUES (?, ?, ?)",
            [(first_index + i, h, d) for i, (h, d) in enumerate(items)],
        )

    def indices_of(self, hashes: list[bytes], db: Any | None = None) -> dict[bytes, int]:
        """The first index of each of ``hashes`` that is in the log (inside ``db``'s transaction if given)."""
        found: dict[bytes, int] = {}
        for chunk in _chunks(sorted(set(hashes)), LOOKUP_CHUNK):
            sql = f"SELECT hash, MIN(idx) FROM leaves WHERE hash IN ({', '.join('?' * len(chunk))}) GROUP BY hash"
            rows = db.execute(sql, tuple(chunk)).fetchall() if db is not None else self.db.query(sql, tuple(chunk))
            found.update((bytes(h), int(i)) for h, i in rows)
        return found

    def leaf(self, index: int) -> bytes | None:
        rows = self.db.query("SELECT data FROM leaves WHERE idx = ?", (index,))
        return bytes(rows[0][0]) if rows else None

    def leaves(self, start: int, end: int) -> list[tuple[int, bytes]]:
        """The leaves with start <= index < end, in order."""
        rows = self.db.query("SELECT idx, data FROM leaves WHERE idx >= ? AND idx < ? ORDER BY idx", (start, end))
        return [(int(i), bytes(d)) for i, d in rows]

    def index_of(self, leaf_hash: bytes) -> int | None:
        return self.indices_of([leaf_hash]).get(leaf_hash)

    def latest_checkpoint(self) -> CheckpointRow | None:
        rows = self.db.query("SELECT size, root, note FROM checkpoints ORDER BY size DESC LIMIT 1")
        return CheckpointRow(int(rows[0][0]), bytes(rows[0][1]), rows[0][2]) if rows else None

    def checkpoint_covering(self, index: int) -> CheckpointRow | None:
        """The latest checkpoint (it covers every leaf below its size)."""
        latest = self.latest_checkpoint()
        return latest if latest is not None and latest.size > index else None

    def add_checkpoint(self, db: Any, size: int, root: bytes, note: str) -> None:
        now = int(time.time())
        db.execute(
            "INSERT INTO checkpoints (size, root, note, created_unix) VALUES (?, ?, ?, ?)", (size, root, note, now)
        )
        db.execute("INSERT INTO anchors (size, root, confirmed, updated_unix) VALUES (?, ?, 0, ?)", (size, root, now))

    def anchors(self, min_size: int = 0, pending_only: bool = False) -> list[AnchorRow]:
        query = "SELECT size, root, confirmed, chain_id, contract, tx_hash, block_number FROM anchors WHERE size >= ?"
        if pending_only:
            query += " AND confirmed = 0"
        rows = self.db.query(query + " ORDER BY size", (min_size,))
        return [AnchorRow(int(r[0]), bytes(r[1]), bool(r[2]), r[3], r[4], r[5], r[6]) for r in rows]

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
        rows = self.db.query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )


def _chunks(items: list[bytes], size: int) -> Iterator[list[bytes]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
