"""The recommender's receipt spool: every Score answer's receipt is written to a local SQLite
spool (WAL, synchronous=NORMAL: survives a process crash, ~tens of microseconds, no fsync on the
hot path) and sent to the ledger in order, in batches, by a background thread. A receipt leaves
the spool only after the ledger acknowledged it durably; when the backlog reaches its bound,
Score is refused (UNAVAILABLE) instead of losing receipts.

The sender never dies of one bad row: a row that cannot be turned into an AppendRequest, or that
the ledger refuses as INVALID_ARGUMENT (found by halving the batch), is moved, in one transaction,
to the ``quarantine`` table (kept on disk for an operator, logged once) and delivery goes on; any
other failure backs off and retries. ``close`` cancels an AppendBatch in flight and waits for the
sender before closing the database: a cancelled batch stays spooled and is sent again later (the
ledger's append is idempotent, so a batch it had committed is not logged twice)."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from cipherfeed.errors import FailedPrecondition, Reason, Unavailable
from cipherfeed.receipts import ModelRecord, Receipt
from cipherfeed.v1 import ledger_pb2, ledger_pb2_grpc

log = logging.getLogger(__name__)
BATCH = 2000
SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
  seq INTEGER PRIMARY KEY, kind TEXT, payload BLOB, reason TEXT NOT NULL, unix_millis INTEGER NOT NULL
);
"""


def _to_proto(kind: Any, payload: Any) -> ledger_pb2.AppendRequest:
    """The AppendRequest of one spool row; raises if the row is not one."""
    fields = json.loads(payload)
    if not isinstance(fields, dict):
        raise ValueError("a spooled entry is a JSON object")
    if kind == "receipt":
        return ledger_pb2.AppendRequest(receipt=ledger_pb2.Receipt(**fields))
    if kind == "model":
        return ledger_pb2.AppendRequest(model=ledger_pb2.ModelRecord(**fields))
    raise ValueError(f"unknown spool entry kind {str(kind)[:32]!r}")


class ReceiptSpool:
    def __init__(
        self, path: Path, ledger: ledger_pb2_grpc.LedgerStub, max_pending: int, deadline: float = 30.0
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self.ledger = ledger
        self.max_pending = max_pending
        self.deadline = deadline
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pending = self._db.execute("SELECT COUNT(*) FROM spool").fetchone()[0]
        self.sent = 0
        self.quarantined = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._in_flight: grpc.Future | None = None
        self._limit = BATCH  # halved while the ledger refuses a batch, to find the row it refuses
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
            if self._stop.is_set():
                raise FailedPrecondition("the receipt spool is closed", reason=Reason.SHUTTING_DOWN)
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
            try:
                delivered = self._send_once()
            except Exception as exc:  # a spool or client failure: never let the sender die
                self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                log.exception("receipt delivery failed; %d receipts wait in the spool", self.pending)
                delivered = False
            if delivered:
                backoff = 0.1
            else:
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _next_batch(self) -> tuple[list[tuple[int, ledger_pb2.AppendRequest]], bool]:
        """Up to BATCH deliverable rows in order, after quarantining any bad row among them."""
        with self._lock:
            while self._pending == 0 and not self._stop.is_set():
                self._changed.wait(timeout=1.0)
            if self._stop.is_set():
                return [], False
            rows = self._db.execute(
                "SELECT seq, kind, payload FROM spool ORDER BY seq LIMIT ?", (self._limit,)
            ).fetchall()
            if not rows:  # the count drifted from the table: trust the table
                self._pending = self._db.execute("SELECT COUNT(*) FROM spool").fetchone()[0]
            good: list[tuple[int, ledger_pb2.AppendRequest]] = []
            bad: list[tuple[int, Any, Any, str]] = []
            for seq, kind, payload in rows:
                try:
                    good.append((seq, _to_proto(kind, payload)))
                except Exception as exc:  # JSON, field or type errors, deep nesting: never sendable
                    bad.append((seq, kind, payload, f"{type(exc).__name__}: {str(exc)[:200]}"))
            if bad:
                self._quarantine(bad)
            return good, bool(bad)

    def _quarantine(self, bad: list[tuple[int, Any, Any, str]]) -> None:
        """Moves rows that can never be sent out of the way, kept on disk (caller holds the lock)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT OR REPLACE INTO quarantine (seq, kind, payload, reason, unix_millis)"
                " VALUES (?, ?, ?, ?, CAST(strftime('%s', 'now') AS INTEGER) * 1000)",
                bad,
            )
            self._db.executemany("DELETE FROM spool WHERE seq = ?", [(seq,) for seq, *_ in bad])
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self._pending -= len(bad)
        self.quarantined += len(bad)
        self._changed.notify_all()
        for seq, _, _, reason in bad:
            log.error("spool row %d cannot be sent (%s): moved to the quarantine table", seq, reason)

    def _send_once(self) -> bool:
        """Sends one batch; True when something moved (delivered or quarantined)."""
        batch, quarantined = self._next_batch()
        if not batch:
            return quarantined or self._stop.is_set()
        request = ledger_pb2.AppendBatchRequest(entries=[entry for _, entry in batch])
        with self._lock:
            if self._stop.is_set():
                return True
            call = self.ledger.AppendBatch.future(request, timeout=self.deadline)
            self._in_flight = call
        try:
            call.result()
        except grpc.FutureCancelledError:
            return True  # cancelled by close(): the batch stays spooled
        except grpc.RpcError as exc:
            if self._stop.is_set():
                return True
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:  # permanent for this content
                return self._isolate_refused(batch, str(exc.details())[:200])
            self.last_error = f"{exc.code().name}: {str(exc.details())[:200]}"
            log.warning("ledger append failed (%s); %d receipts wait in the spool", self.last_error, self.pending)
            return False
        finally:
            with self._lock:
                self._in_flight = None
        self.last_error = None
        self._limit = min(BATCH, self._limit * 2)
        last_seq = batch[-1][0]
        with self._lock:
            removed = self._db.execute("DELETE FROM spool WHERE seq <= ?", (last_seq,)).rowcount
            self._pending -= removed
            self.sent += removed
            self._changed.notify_all()
        return True

    def _isolate_refused(self, batch: list[tuple[int, ledger_pb2.AppendRequest]], details: str) -> bool:
        """The ledger refused a batch as invalid: halve the batch until the refused row is alone,
        then quarantine it, so one row the ledger will never take does not block the rest."""
        if len(batch) > 1:
            self._limit = max(1, len(batch) // 2)
            return True
        seq = batch[0][0]
        with self._lock:
            rows = self._db.execute("SELECT seq, kind, payload FROM spool WHERE seq = ?", (seq,)).fetchall()
            if rows:
                self._quarantine([(seq, rows[0][1], rows[0][2], f"refused by the ledger: {details}")])
        return True

    def flush(self, timeout: float) -> bool:
        """Blocks until everything spooled so far reached the ledger (or ``timeout``); True if it did."""
        with self._lock:
            return self._changed.wait_for(lambda: self._pending == 0, timeout=timeout)

    def close(self) -> None:
        """Stops the sender (cancelling a batch in flight), waits for it, then closes the spool."""
        with self._lock:
            self._stop.set()
            if self._in_flight is not None:
                self._in_flight.cancel()
            self._changed.notify_all()
        self._thread.join()  # bounded: the only blocking call it makes was just cancelled
        with self._lock:
            self._db.close()
