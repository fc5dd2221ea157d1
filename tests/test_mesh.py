"""`cipherfeed mesh up` as a user runs it: separate processes with development certificates, a
device that gets a correct private feed and a verified receipt from them, JSON logs with no secret
in them, a crashed service started again, and Ctrl-C stopping every child with exit status 0."""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from cipherfeed import trust as trustfile
from cipherfeed.cli import creator_history
from cipherfeed.client.interest import history_interest, history_weights
from cipherfeed.client.sdk import RecommenderClient
from cipherfeed.client.verify import fetch_and_verify
from cipherfeed.config import REPO_ROOT, ClientConfig
from cipherfeed.he.packing import plaintext_scores
from cipherfeed.v1 import ledger_pb2_grpc
from services.keyservice.core import _signing_context
from services.keyservice.envelope import MasterKey
from services.keyservice.store import KeyStore
from services.recommender import artifact

SERVICES = ("keyservice", "ledger", "recommender")
SUMMARY = re.compile(r"^\s+(\w+)\s+127\.0\.0\.1:(\d+)\s+pid (\d+)")


class Supervisor:
    """``cipherfeed mesh up`` in a child process; its output read line by line."""

    def __init__(self, state: Path, *args: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cipherfeed.cli", "mesh", "up", "--ephemeral-ports", "--state-dir", str(state),
             *args],
            cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 300.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in {timeout} s:\n" + "\n".join(self.seen)) from None
            if line is None:
                raise AssertionError(
                    f"mesh up exited ({self.proc.wait()}) before {pattern!r}:\n" + "\n".join(self.seen)
                )
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def eventually(check, timeout: float = 60.0):
    """``check()``'s value once it stops raising, within ``timeout`` (a condition, not a sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def device_config(env_file: Path, monkeypatch) -> ClientConfig:
    for line in env_file.read_text().splitlines():
        key, _, value = line.partition("=")
        monkeypatch.setenv(key, value)
    return ClientConfig.from_env()


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def secrets_of_mesh(state: Path, pids: dict[str, int], client_home: Path) -> dict[str, bytes]:
    """Every secret the mesh and the device hold, read where they live."""
    found: dict[str, bytes] = {}
    master = (state / "keyservice" / "master.key").read_bytes()
    found["master key"] = master
    store = KeyStore(f"sqlite:///{state / 'keyservice' / 'keyservice.db'}")
    try:
        for row in store.signing_keys():
            found[f"signing key {row.name}"] = MasterKey(master).unwrap(
                row.wrapped_private_key, _signing_context(row.name, row.version)
            )
    finally:
        store.close()
    for name in SERVICES:
        environ = dict(
            item.split("=", 1) for item in Path(f"/proc/{pids[name]}/environ").read_text().split("\0") if "=" in item
        )
        if "CIPHERFEED_REDIS_PASSWORD_FILE" in environ:
            found[f"{name} Redis password"] = Path(environ["CIPHERFEED_REDIS_PASSWORD_FILE"]).read_bytes().strip()
            found["cache MAC key"] = Path(environ["CIPHERFEED_REDIS_MAC_KEY_FILE"]).read_bytes().strip()
    for key_file in (state / "mesh" / "pki").glob("*.key"):
        found[f"TLS key {key_file.name}"] = key_file.read_bytes()
    for path in (client_home / "keys").iterdir():
        if "secret" in path.name or "account" in path.name:
            found[f"device {path.name}"] = path.read_bytes()
    return found


def forms(secret: bytes) -> list[bytes]:
    """What a leaked secret would look like in a log line: raw, hex, base64, or a PEM body line
    (for long material, 48-byte windows of each)."""
    out = []
    for text in (secret, secret.hex().encode(), base64.b64encode(secret)):
        out += [text] if len(text) <= 96 else [text[i : i + 48] for i in range(0, len(text) - 48, 997)]
    if secret.startswith(b"-----BEGIN"):
        out += [line for line in secret.splitlines() if line and not line.startswith(b"-----")]
    return out


def test_mesh_up_serves_a_device_logs_json_without_secrets_restarts_a_crash_and_stops_on_sigint(tmp_path, monkeypatch):
    state = tmp_path / "var"
    mesh = Supervisor(state, "--log-format", "json", "--no-gateway")
    try:
        mesh.wait_for(r"Ctrl-C stops the mesh")
        pids = {m[1]: int(m[3]) for m in map(SUMMARY.match, mesh.seen) if m}
        assert set(SERVICES) <= set(pids) and "redis" in pids
        assert any("recommender starting" in line or "recommender ready" in line for line in mesh.seen)
        trust_file = state / "mesh" / "trust.json"
        config = device_config(state / "mesh" / "device.env", monkeypatch)
        pinned = trustfile.pin(trust_file, config.home)
        with RecommenderClient(config) as client:
            client.wait_ready(timeout=30)
            client.use_keys()
            client.register()
            user = "a.r.m.y664"
            history = creator_history(client, user)
            from cipherfeed.client import history as history_store

            engagements = history_store.engagements(history)
            secrets = secrets_of_mesh(state, pids, config.home)
            assert {"master key", "signing key ledger", "cache MAC key", "recommender Redis password"} <= secrets.keys()
            feed, scored = client.recommend(engagements, k=10)
            # The answer is the right one: plaintext scoring with the model the recommender trained.
            (model_file,) = (state / "recommender" / "models").glob("*.cfmodel")
            model = artifact.load(model_file)
            manifest = client.manifest()
            u = history_interest(model.embeddings, history_weights(engagements, manifest.index_of, manifest.item_count))
            clear = plaintext_scores(model.embeddings, u, model.popularity, model.popularity_weight)
            assert np.max(np.abs(scored.scores - clear)) < 1e-4 and len(feed) == 10
            # ...and its receipt is in the log, signed and anchored, against the pinned trust alone.
            ledger = ledger_pb2_grpc.LedgerStub(client.ledger_channel())

            def verified():
                return fetch_and_verify(scored.receipt_id, ledger, pinned, None, 10, scored.receipt)

            assert eventually(verified, 60).receipt == scored.receipt

            # A crashed recommender is started again on its port and serves the same device.
            os.kill(pids["recommender"], signal.SIGKILL)
            mesh.wait_for(r"recommender exited .*starting it again", 30)
            mesh.wait_for(r"recommender ready again", 300)
            again = client.score_history(history_weights(engagements, manifest.index_of, manifest.item_count))
            assert np.max(np.abs(again.scores - clear)) < 1e-4

        # Ctrl-C: every child stopped in reverse order, exit status 0, no process left behind.
        mesh.proc.send_signal(signal.SIGINT)
        assert mesh.proc.wait(timeout=120) == 0
        mesh.wait_for(r"stopped redis", 5)
        stopped = [m[1] for m in (re.match(r"\s+stopped (\w+)", line) for line in mesh.seen) if m]
        assert stopped == ["recommender", "ledger", "keyservice", "redis"]
        children = [pid for name, pid in pids.items() if name != "recommender"]  # its first pid was killed
        for pid in children:
            assert process_gone(pid), f"pid {pid} outlived mesh up"
        assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_child_of_state(p, state)]

        # Logs: one JSON object per line, per service; no secret in any of them, in any form.
        for name in SERVICES:
            lines = (state / "mesh" / "logs" / f"{name}.log").read_text().splitlines()
            assert lines
            for line in lines:
                record = json.loads(line)
                assert {"ts", "level", "service", "logger", "msg"} <= record.keys()
                assert record["service"] == name
        everything = b"".join((state / "mesh" / "logs" / f"{n}.log").read_bytes() for n in SERVICES)
        assert b"checkpoint" in everything and b"anchored" in everything
        for what, secret in secrets.items():
            for form in forms(secret):
                assert form not in everything, f"the {what} is in a service log"
    finally:
        mesh.stop()


def _is_child_of_state(proc_dir: Path, state: Path) -> bool:
    """A live process whose environment names this mesh's state dir (a service of it)."""
    try:
        return f"CIPHERFEED_STATE_DIR={state}".encode() in (proc_dir / "environ").read_bytes()
    except OSError:
        return False
