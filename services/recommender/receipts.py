"""The recommender's receipt spool: every Score answer's receipt is written to a local SQLite
spool (WAL, synchronous=NORMAL: survives a process crash, ~tens of microseconds, no fsync on the
hot path) and sent to the ledger in order, in batches, by a background thread. A receipt leaves
the spool only after the ledger acknowledged it durably; when the backlog reaches its bound,
Score is refused (UNAVAILABLE) instead of losing receipts."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from dataclasses import asdict
from pathlib import Path

import grpc

from cipherfeed.errors import Reason, Unavailable
from cipherfeed.receipts import ModelRecord, Receipt
from cipherfeed.v1 import ledger_pb2, ledger_pb2_grpc

log = logging.getLogger(__name__)
BATCH = 2000


def _to_proto(kind: str, payload: bytes) -> ledger_pb2.AppendRequest:
    fields = json.loads(payload)
    if kind == "receipt":
        return ledger_pb2.AppendRequest(receipt=ledger_pb2.Receipt(**fields))
    return ledger_pb2.AppendRequest(model=ledger_pb2.ModelRecord(**fields))


class ReceiptSpool:
    def __init__(
        self, path: Path, ledger: ledger_pb2_grpc.LedgerStub, max_pending: int, deadline: float = 30.0
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,"
            " payload BLOB NOT NULL)"
        )
        self.ledger = ledger
        self.max_pending = max_pending
        self.deadline = deadline
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pending = self._db.execute("SELECT COUNT(*) FROM spool").fetchone()[0]
        self.sent = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send_loop, name="receipt-sender", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def put(self, entry: Receipt | ModelRecord) -> None:
        kind = "receipt" if isinstance(entry, Receipt) else "model"
        payload = json.dumps(asdict(entry), sort_keys=True).encode()
        with self._lock:
            if self._pending >= self.max_pending:
                raise Unavailable(
                    "the ledger is behind and the receipt backlog is full; retry later", reason=Reason.BACKLOG_FULL
                )
            self._db.execute("INSERT INTO spool (kind, payload) VALUES (?, ?)", (kind, payload))
            self._pending += 1
            self._changed.notify_all()

    def _send_loop(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            with self._lock:
                while self._pending == 0 and not self._stop.is_set():
                    self._changed.wait(timeout=1.0)
                rows = self._db.execute(
                    "SELECT seq, kind, payload FROM spool ORDER BY seq LIMIT ?", (BATCH,)
                ).fetchall()
            if not rows:
                continue
            request = ledger_pb2.AppendBatchRequest(entries=[_to_proto(kind, payload) for _, kind, payload in rows])
            try:
                self.ledger.AppendBatch(request, timeout=self.deadline)
            except grpc.RpcError as exc:
                self.last_error = f"{exc.code().name}: {exc.details()}"
                log.warning("ledger append failed (%s); %d receipts wait in the spool", self.last_error, self.pending)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            self.last_error = None
            with self._lock:
                self._db.execute("DELETE FROM spool WHERE seq <= ?", (rows[-1][0],))
                self._pending -= len(rows)
                self.sent += len(rows)
                self._changed.notify_all()

    def flush(self, timeout: float) -> bool:
        """Blocks until everything spooled so far reached the ledger (or ``timeout``); True if it did."""
        with self._lock:
            return self._changed.wait_for(lambda: self._pending == 0, timeout=timeout)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._changed.notify_all()
        self._thread.join(timeout=10)
        self._db.close()
