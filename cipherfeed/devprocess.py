"""Starting a cipherfeed service as a child process for tests and benchmarks: it prints one
"<name> listening on port N" line once serving, which is read instead of polling.

The child's stderr (its log) goes to a file, never to an undrained pipe: a pipe holds 64 KiB, and a
service that logged more than that would block in its next log call (a key service stopped
answering after ~300 registrations this way). Its stdout is drained after the first line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO

from cipherfeed.config import REPO_ROOT


def _drain(stream: IO[bytes]) -> None:
    for _ in iter(lambda: stream.read(65536), b""):
        pass


def start_service(
    module: str, env: dict[str, str], args: list[str] | None = None, log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """Runs ``python -m module [args]`` with ``env`` added to this environment; returns once it
    serves. Its log is appended to ``log_path`` (default: an anonymous temporary file)."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    log = open(log_path, "ab+") if log_path is not None else tempfile.TemporaryFile()  # noqa: SIM115
    with log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *(args or [])],
            cwd=REPO_ROOT,
            env=full,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if "listening" not in line:
            proc.kill()
            proc.wait()
            log.seek(0)
            raise RuntimeError(f"{module} did not start: {log.read().decode(errors='replace')[-2000:]}")
    threading.Thread(target=_drain, args=(proc.stdout,), name=f"{module}-stdout", daemon=True).start()
    return proc
