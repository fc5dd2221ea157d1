"""One child process of the local mesh (``cipherfeed mesh up``, the fault tests): started, waited
for until its output says it is ready, stopped gently or killed, and started again on the same port.

Children never outlive the supervisor: each is started through this module's ``__main__``, which
asks the kernel (``PR_SET_PDEATHSIG``) to send it SIGTERM when the supervisor dies, even by SIGKILL,
and then ``exec``s the real program. Each runs in its own session, so a Ctrl-C in the terminal
reaches the supervisor only, and the supervisor stops the mesh in dependency order.

The child's stderr (its log) goes to a file, never to an undrained pipe; its stdout is read line by
line by a thread that records the port from the ready line and drains the rest.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cipherfeed.config import REPO_ROOT

PR_SET_PDEATHSIG = 1
READY_SERVICE = re.compile(r"listening on port (\d+)")
READY_ANVIL = re.compile(r"Listening on [\d.]+:(\d+)")


class ChildFailed(RuntimeError):
    """A child exited, or did not become ready, before its deadline."""


def last_log_line(path: Path, limit: int = 4096) -> str:
    """The last complete line of a log file (for progress lines); JSON lines give their message."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            import json

            try:
                return str(json.loads(line).get("msg", line))
            except ValueError:
                pass
        return line
    return ""


class Child:
    """A program of the mesh. ``argv`` may contain ``{port}``, replaced by the port it should
    listen on (0 the first time for an ephemeral port, then the port it reported)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        ready: re.Pattern[str] = READY_SERVICE,
        port: int = 0,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.ready = ready
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(
        self, timeout: float = 600.0, progress: Callable[[str, float, str], None] | None = None, every: float = 5.0
    ) -> int:
        """Starts the program and returns its port once its ready line appeared; ``progress(name,
        seconds, last log line)`` is called every ``every`` seconds meanwhile."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            **{k: v.replace("{port}", str(self.port)) for k, v in self.env.items()},
        }
        with open(self.log_path, "ab") as log:
            proc = self.proc = subprocess.Popen(
                [sys.executable, "-m", "cipherfeed.meshproc", str(os.getpid()), *argv],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        self.starts += 1
        # One event and one result per start: the reader of an earlier process may reach its EOF
        # only now, and must not wake this start.
        ready = threading.Event()
        found: list[int] = []
        reader = threading.Thread(target=self._read, args=(proc, ready, found), name=f"{self.name}-stdout", daemon=True)
        reader.start()
        t0 = time.monotonic()
        deadline = t0 + timeout
        while not ready.wait(timeout=min(every, max(0.0, deadline - time.monotonic()))):
            if proc.poll() is not None:
                raise ChildFailed(f"{self.name} exited with status {proc.returncode}: {last_log_line(self.log_path)}")
            if time.monotonic() >= deadline:
                self.kill()
                raise ChildFailed(f"{self.name} was not ready within {timeout:.0f} s: {last_log_line(self.log_path)}")
            if progress is not None:
                progress(self.name, time.monotonic() - t0, last_log_line(self.log_path))
        if not found:  # its output ended before a ready line: it is exiting
            try:
                code: int | None = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
                code = proc.returncode
            raise ChildFailed(f"{self.name} exited with status {code}: {last_log_line(self.log_path)}")
        self.port = found[0]
        return self.port

    def _read(self, proc: subprocess.Popen[bytes], ready: threading.Event, found: list[int]) -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            if not ready.is_set():
                match = self.ready.search(raw.decode(errors="replace"))
                if match:
                    found.append(int(match.group(1)))
                    ready.set()
        ready.set()  # end of output: start() then sees the exit

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (the services drain and close their stores), SIGKILL after ``timeout``."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed or closed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the process hangs (connections stay open, nothing answers)."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)


def _guarded_exec(parent: int, argv: list[str]) -> None:
    """Dies with the supervisor, then becomes ``argv`` (a module name runs with this Python)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the supervisor died before the request took effect
        raise SystemExit(1)
    program = argv[0]
    if not os.path.isabs(program) and "/" not in program:  # a Python module
        argv = [sys.executable, "-m", *argv]
    os.execv(argv[0], argv)


if __name__ == "__main__":
    _guarded_exec(int(sys.argv[1]), sys.argv[2:])
