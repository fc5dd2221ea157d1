"""The device's engagement history: one JSON-lines file per local user under the client home.

What a user watched, liked or commented on never leaves the device in the clear; this store is
where it lives. Files are mode 0600 in a 0700 directory and refused if others can read them
(like the secret key). Entries name items by id, which is stable across model versions; the
catalogue index an id maps to comes from the manifest of whichever model serves.

Each ``add`` is appended and fsynced before it returns. A line cut short by a crash (no final
newline) is ignored on read; any other malformed line is an error, not silently skipped.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from cipherfeed.client.interest import COMMENT_WEIGHT, LIKE_WEIGHT, WATCH_WEIGHT, Engagement

KIND_WEIGHT = {"watch": WATCH_WEIGHT, "like": WATCH_WEIGHT + LIKE_WEIGHT, "comment": WATCH_WEIGHT + COMMENT_WEIGHT}
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
MAX_LINE_BYTES = 4096
MAX_ENTRIES = 100_000  # a user's lifetime of engagements stays a few MB; older ones are dropped on read


class HistoryError(ValueError):
    """The history store is unreadable, unsafe, or asked for something it does not hold."""


@dataclass(frozen=True)
class HistoryEntry:
    item_id: str
    kind: str  # watch | like | comment
    unix: int  # when it happened (seconds)

    def __post_init__(self) -> None:
        if self.kind not in KIND_WEIGHT:
            raise HistoryError(f"engagement kind {self.kind!r} is not one of {sorted(KIND_WEIGHT)}")
        if not self.item_id or len(self.item_id) > 256:
            raise HistoryError("an engagement needs an item id of at most 256 characters")


class HistoryStore:
    """Per-user engagement logs in ``directory`` (normally ``<client home>/history``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, user: str) -> Path:
        if not _USER.match(user):
            raise HistoryError(f"local user name {user[:80]!r}: 1-128 of [A-Za-z0-9_.-], not starting with . or -")
        return self.directory / f"{user}.jsonl"

    def _checked(self, path: Path) -> None:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise HistoryError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")

    def add(self, user: str, entries: Iterable[HistoryEntry]) -> int:
        """Appends ``entries`` durably; returns how many were written."""
        path = self.path(user)
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        lines = [json.dumps(asdict(e), sort_keys=True, separators=(",", ":")) + "\n" for e in entries]
        if any(len(line.encode()) > MAX_LINE_BYTES for line in lines):
            raise HistoryError("an engagement record is too long")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # two writers append whole lines, one after the other
            if os.fstat(fd).st_mode & 0o077:
                raise HistoryError(f"{path} is readable by others; chmod 600 it")
            _drop_cut_short_tail(fd, path)
            os.write(fd, "".join(lines).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return len(lines)

    def entries(self, user: str) -> list[HistoryEntry]:
        """Every stored engagement, oldest first (at most the last ``MAX_ENTRIES``)."""
        path = self.path(user)
        if not path.exists():
            return []
        self._checked(path)
        data = path.read_bytes()
        out = []
        # The piece after the last newline is "" or a line an interrupted append cut short (that
        # add never returned): it is not part of the history.
        for number, raw in enumerate(data.split(b"\n")[:-1], 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                out.append(HistoryEntry(str(record["item_id"]), str(record["kind"]), int(record["unix"])))
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                raise HistoryError(f"{path}:{number}: malformed engagement record ({exc})") from None
        out.sort(key=lambda e: e.unix)  # stable: same-time entries keep their order
        return out[-MAX_ENTRIES:]

    def clear(self, user: str) -> bool:
        path = self.path(user)
        if not path.exists():
            return False
        path.unlink()
        return True

    def users(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.jsonl"))


def _drop_cut_short_tail(fd: int, path: Path) -> None:
    """Truncates a line an interrupted append left without its newline, so appends stay whole."""
    size = os.fstat(fd).st_size
    if not size:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        os.ftruncate(fd, data.rfind(b"\n") + 1)


def now() -> int:
    return int(time.time())


def engagements(entries: list[HistoryEntry]) -> list[Engagement]:
    """The stored history as weighted engagements, newest first (recency rank 0 = latest)."""
    ordered = sorted(entries, key=lambda e: e.unix, reverse=True)
    # Liking or commenting implies watching: a like weighs watch + like, as it always has.
    return [
        Engagement(
            item_id=e.item_id,
            watched=1.0,
            liked=e.kind == "like",
            commented=e.kind == "comment",
            recency_rank=rank,
        )
        for rank, e in enumerate(ordered)
    ]
