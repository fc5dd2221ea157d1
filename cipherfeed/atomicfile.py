"""Files written whole or not at all, with their mode from the first byte.

Keys, certificates, trust files, models and manifests are read back by later processes; a crash
mid-write must leave either the old file or the new one, never a truncated key, and a secret must
never be readable by others, not even between ``open`` and ``chmod`` (``O_CREAT`` keeps the mode of a
file that already exists, so rewriting in place would inherit a wider one).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PRIVATE = 0o600
PUBLIC = 0o644


def write_atomic(path: Path, data: bytes, mode: int = PRIVATE, *, replace: bool = True) -> None:
    """Writes ``data`` to a new file beside ``path`` with exactly ``mode`` (the umask does not
    apply), fsyncs it, then renames it over ``path`` and fsyncs the directory.

    With ``replace=False`` the file is linked into place instead, so an existing ``path`` is never
    overwritten: ``FileExistsError`` is raised and the existing file is left as it is (two processes
    creating the same development key at once: exactly one wins, the other reads the winner's)."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # before any byte is written
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Makes the rename itself durable (the new name is an entry in the directory)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
