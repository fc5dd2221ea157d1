"""The transparency log: group-committed appends, RFC 6962 proofs, signed checkpoints.

* ``append_many`` returns once its entries are committed (one transaction and one fsync per batch
  of whatever is waiting: many concurrent callers share a commit).
* A checkpoint is signed only for a size larger than the last one, and only after checking that
  the last checkpoint's root is consistent with the new tree: the log never signs two inconsistent
  checkpoints. On start the latest checkpoint is checked against the tree rebuilt from the leaves.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from cipherfeed.checkpoint import Checkpoint, sign_note
from cipherfeed.errors import FailedPrecondition, NotFound, Reason, invalid
from cipherfeed.merkle import CompactTree, leaf_hash, verify_consistency
from services.ledger.known import KnownLeaves
from services.ledger.store import CheckpointRow, LedgerStore

log = logging.getLogger(__name__)
MAX_LEAF_BYTES = 16 * 1024


class NoteSigner:
    """Signs checkpoint bodies; ``name`` is the note key name, ``public_key`` the current key."""

    name: str

    def sign(self, message: bytes) -> tuple[bytes, bytes]:
        """Returns (public key that signed, signature)."""
        raise NotImplementedError

    def public_keys(self) -> list[bytes]:
        """Every public key this signer has signed with, oldest first (for verifiers)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Appended:
    index: int
    leaf_hash: bytes


class TransparencyLog:
    def __init__(
        self,
        store: LedgerStore,
        origin: str,
        signer: NoteSigner,
        checkpoint_every: int,
        checkpoint_interval: float,
        on_checkpoint: Callable[[CheckpointRow], None] | None = None,
    ) -> None:
        self.store = store
        self.origin = origin
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self.on_checkpoint = on_checkpoint
        t0 = time.perf_counter()
        hashes = store.leaf_hashes()
        self.tree = CompactTree(hashes)
        self._known = KnownLeaves(hashes)
        del hashes
        latest = store.latest_checkpoint()
        if latest is not None and (latest.size > self.tree.size or self.tree.root(latest.size) != latest.root):
            raise RuntimeError("the stored checkpoint does not match the stored leaves: refusing to serve")
        log.info("log %s: %d leaves loaded in %.1f s", origin, self.tree.size, time.perf_counter() - t0)
        self._resync = False  # set when a commit failed: what it stored is read back before the next
        self._checkpointed = latest.size if latest else 0  # the latest signed size, kept by checkpoint()
        self._tree_lock = threading.RLock()
        self._checkpoint_lock = threading.Lock()
        self._queue: queue.Queue[tuple[list[bytes], Future[list[Appended]]] | None] = queue.Queue()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="ledger-writer", daemon=True)
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="ledger-checkpoints", daemon=True)
        self._writer.start()
        try:  # after a crash: sign what the stored leaves hold before serving
            self.checkpoint()
        except Exception as exc:
            log.warning("no checkpoint at start (%s); the checkpointer will retry", exc)
        self._checkpointer.start()

    # --- appends --------------------------------------------------------------------------

    def append_many(self, leaves: list[bytes], timeout: float = 30.0) -> list[Appended]:
        for data in leaves:
            if not data or len(data) > MAX_LEAF_BYTES:
                raise invalid("leaf", f"a leaf is 1..{MAX_LEAF_BYTES} bytes")
        if self._stop.is_set():
            raise FailedPrecondition("the log is shutting down", reason=Reason.SHUTTING_DOWN)
        done: Future[list[Appended]] = Future()
        self._queue.put((leaves, done))
        return done.result(timeout=timeout)

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < 512:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            try:
                results = self._commit([leaves for leaves, _ in batch])
            except Exception as exc:  # the database went away, a disk error
                log.warning("append of %d groups failed: %s", len(batch), exc)
                self._resync = True  # its COMMIT may have landed: read back what is stored first
                for _, done in batch:
                    done.set_exception(exc)
                continue
            for (_, done), appended in zip(batch, results, strict=True):
                done.set_result(appended)
            if self.tree.size - self._checkpointed >= self.checkpoint_every:
                self._wake.set()

    def _commit(self, groups: list[list[bytes]]) -> list[list[Appended]]:
        """One transaction for every waiting group. A leaf already in the log (or earlier in this
        commit) gets its existing index back instead of a second one: Append is idempotent, so a
        batch resent after a lost acknowledgement is not logged twice."""
        with self._tree_lock:
            if self._resync:
                self._catch_up()
            first = self.tree.size
            hashed = [[(leaf_hash(d), d) for d in group] for group in groups]
            out: list[list[Appended]] = []
            new: list[tuple[bytes, bytes]] = []
            with self.store.transaction() as db:
                maybe = self._known.candidates([h for group in hashed for h, _ in group])
                known = self.store.indices_of(maybe, db) if maybe else {}
                for group in hashed:
                    appended = []
                    for h, d in group:
                        index = known.get(h)
                        if index is None:
                            index = known[h] = first + len(new)
                            new.append((h, d))
                        appended.append(Appended(index, h))
                    out.append(appended)
                if new:
                    self.store.append(db, first, new)
            for h, _ in new:
                self.tree.append_hash(h)
            self._known.add(h for h, _ in new)
            return out

    def _catch_up(self) -> None:
        """Adds to the tree the leaves a failed commit stored after all (its acknowledgement was
        lost with the connection), so that indices continue after them and a resent leaf is found."""
        stored = self.store.leaf_hashes_from(self.tree.size)
        for h in stored:
            self.tree.append_hash(h)
        self._known.add(stored)
        if stored:
            log.warning("%d leaves of a commit whose acknowledgement was lost are in the store: kept", len(stored))
        self._resync = False

    # --- checkpoints ----------------------------------------------------------------------

    def _checkpoint_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self.checkpoint_interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.checkpoint()
            except Exception:
                log.exception("checkpoint failed; will retry")

    def checkpoint(self) -> CheckpointRow | None:
        """Signs a checkpoint for the current size if it grew; returns the latest checkpoint."""
        with self._checkpoint_lock:
            latest = self.store.latest_checkpoint()
            with self._tree_lock:
                size = self.tree.size
                if size == 0 or (latest is not None and latest.size >= size):
                    return latest
                root = self.tree.root(size)
                if latest is not None:  # never sign a checkpoint inconsistent with the last one
                    proof = self.tree.consistency_proof(latest.size, size)
                    verify_consistency(latest.size, size, latest.root, root, proof)
            body = Checkpoint(self.origin, size, root).body()
            public_key, signature = self.signer.sign(body.encode())
            note = sign_note(body, self.signer.name, public_key, lambda _: signature)
            with self.store.transaction() as db:
                self.store.add_checkpoint(db, size, root, note)
            self._checkpointed = size
            row = CheckpointRow(size, root, note)
        log.info("checkpoint %d signed", size)
        if self.on_checkpoint is not None:
            self.on_checkpoint(row)
        return row

    # --- proofs ---------------------------------------------------------------------------

    def inclusion(self, index: int, size: int) -> list[bytes]:
        with self._tree_lock:
            return self.tree.inclusion_proof(index, size)

    def consistency(self, old: int, new: int) -> list[bytes]:
        with self._tree_lock:
            return self.tree.consistency_proof(old, new)

    def locate(self, receipt_id: str) -> tuple[int, bytes]:
        try:
            h = bytes.fromhex(receipt_id)
        except ValueError:
            raise invalid("receipt_id", "a receipt id is 64 hex digits") from None
        if len(h) != 32:
            raise invalid("receipt_id", "a receipt id is 64 hex digits")
        index = self.store.index_of(h)
        if index is None:
            raise NotFound(f"no receipt {receipt_id[:16]} in the log (yet)", reason=Reason.RECEIPT_NOT_FOUND)
        data = self.store.leaf(index)
        assert data is not None
        return index, data

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._queue.put(None)
        self._writer.join(timeout=10)
        self._checkpointer.join(timeout=10)
