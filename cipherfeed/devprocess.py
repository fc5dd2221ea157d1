"""Starting a cipherfeed service as a child process for tests and benchmarks: it prints one
"<name> listening on port N" line once serving, which is read instead of polling."""

from __future__ import annotations

import os
import subprocess
import sys

from cipherfeed.config import REPO_ROOT


def start_service(module: str, env: dict[str, str], args: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Runs ``python -m module [args]`` with ``env`` added to this environment; returns once it serves."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *(args or [])],
        cwd=REPO_ROOT,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline().decode()
    if "listening" not in line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{module} did not start: {proc.stderr.read().decode()[-2000:]}")
    return proc
