"""Mutual TLS for the mesh: a development CA, certificate files, and gRPC credentials that pick up
renewed files without a restart.

Every identity is a SPIFFE ID in a URI SAN, ``spiffe://<trust-domain>/<name>``. A service's
certificate also carries its name as a DNS SAN: clients pin the server they mean to reach by that
name (``grpc.ssl_target_name_override``), so one mesh member cannot impersonate another.

Production mounts ``cert``/``key``/``ca`` files (cert-manager, Kubernetes Secrets) and replaces
them in place; servers re-read them at the next handshake after they change (a certificate
configuration fetcher), clients on their next call (a fresh channel, see ``RenewingChannel``).
A half-written pair (a key that does not match its certificate) is ignored until it is complete.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cipherfeed.atomicfile import PRIVATE, PUBLIC, write_atomic
from cipherfeed.config import ConfigError, TlsConfig

log = logging.getLogger(__name__)

MESH_SERVICES = ("keyservice", "recommender", "ledger", "gateway")
CLIENT_IDENTITIES = ("operator", "device")
DEFAULT_LEAF_VALIDITY = datetime.timedelta(hours=24)
DEFAULT_CA_VALIDITY = datetime.timedelta(days=7)


def spiffe_id(trust_domain: str, name: str) -> str:
    return f"spiffe://{trust_domain}/{name}"


def parse_spiffe_id(uri: str) -> tuple[str, str] | None:
    """``(trust domain, name)`` of ``spiffe://td/name`` with a one-segment name, else None."""
    prefix = "spiffe://"
    if not uri.startswith(prefix):
        return None
    trust_domain, sep, name = uri[len(prefix) :].partition("/")
    if not sep or not trust_domain or not name or "/" in name or "?" in name or "#" in name:
        return None
    return trust_domain, name


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    encoding, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, pkcs8, serialization.NoEncryption())


@dataclass(frozen=True)
class IssuedIdentity:
    name: str
    cert_pem: bytes
    key_pem: bytes = b""  # repr of a key is never wanted in a log

    def __repr__(self) -> str:
        return f"IssuedIdentity({self.name!r})"


class DevCertificateAuthority:
    """The local mesh's certificate authority: an EC P-256 key made at start, held in memory.

    Development and tests only; production certificates come from the operator's own CA.
    """

    def __init__(
        self, trust_domain: str = "cipherfeed.local", validity: datetime.timedelta = DEFAULT_CA_VALIDITY
    ) -> None:
        self.trust_domain = trust_domain
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"cipherfeed development CA {trust_domain}")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, name: str, validity: datetime.timedelta = DEFAULT_LEAF_VALIDITY, uris: list[str] | None = None
    ) -> IssuedIdentity:
        """A leaf for ``spiffe://<td>/<name>``; mesh services also get ``name`` as a DNS SAN and
        may act as servers and clients, other identities are clients only. ``uris`` replaces the
        SPIFFE ID (tests: certificates this CA signed that name no identity, or another domain's)."""
        if parse_spiffe_id(spiffe_id(self.trust_domain, name)) is None:
            raise ValueError(f"{name!r} is not a one-segment SPIFFE path")
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        is_service = name in MESH_SERVICES
        uris = [spiffe_id(self.trust_domain, name)] if uris is None else uris
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        if is_service or not names:
            names.append(x509.DNSName(name))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH, *([ExtendedKeyUsageOID.SERVER_AUTH] if is_service else [])]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return IssuedIdentity(name, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def write(
        self,
        directory: Path,
        name: str,
        validity: datetime.timedelta = DEFAULT_LEAF_VALIDITY,
        uris: list[str] | None = None,
    ) -> TlsConfig:
        """Issues ``name`` into ``directory`` (``<name>.crt``, ``<name>.key`` 0600, ``ca.crt``)
        and returns the settings that use those files. Called again, it renews them in place."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        issued = self.issue(name, validity, uris)
        ca_file = directory / "ca.crt"
        if not ca_file.exists() or ca_file.read_bytes() != self.cert_pem:
            write_atomic(ca_file, self.cert_pem, PUBLIC)
        key_file, cert_file = directory / f"{name}.key", directory / f"{name}.crt"
        # Key first, then certificate: a reader that sees the new certificate also sees its key.
        write_atomic(key_file, issued.key_pem, PRIVATE)
        write_atomic(cert_file, issued.cert_pem, PUBLIC)
        return TlsConfig(cert_file=cert_file, key_file=key_file, ca_file=ca_file, trust_domain=self.trust_domain)


@dataclass(frozen=True)
class _Material:
    stamp: tuple[tuple[int, int, int], ...]
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes


def _stamp(paths: tuple[Path, ...]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for p in paths:
        st = os.stat(p)  # follows symlinks: a Kubernetes Secret swaps its ..data link
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _pair_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError:
        return False
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class CertificateFiles:
    """The cert, key and CA files of one identity, re-read when they change on disk."""

    def __init__(self, config: TlsConfig, min_check_interval: float = 1.0) -> None:
        if config.cert_file is None or config.key_file is None or config.ca_file is None:
            raise ConfigError(
                "TLS needs CIPHERFEED_TLS_CERT_FILE, CIPHERFEED_TLS_KEY_FILE and CIPHERFEED_TLS_CA_FILE "
                "(or CIPHERFEED_INSECURE_DEV=1 for plaintext, development only)"
            )
        self._paths = (config.cert_file, config.key_file, config.ca_file)
        self._interval = min_check_interval
        self._lock = threading.Lock()
        self._checked = 0.0
        try:
            material = self._read()
        except OSError as exc:
            raise ConfigError(f"cannot read TLS files: {exc}") from exc
        if material is None:
            raise ConfigError(f"{config.key_file} is not the private key of {config.cert_file}")
        self._material = material
        self.generation = 0

    def _read(self) -> _Material | None:
        stamp = _stamp(self._paths)
        cert_pem, key_pem, ca_pem = (p.read_bytes() for p in self._paths)
        if stamp != _stamp(self._paths) or not _pair_matches(cert_pem, key_pem):
            return None  # changing under us: keep what we have and look again next time
        return _Material(stamp, cert_pem, key_pem, ca_pem)

    @property
    def material(self) -> _Material:
        return self._material

    def refresh(self, force: bool = False) -> bool:
        """Re-reads the files if they changed (at most once per ``min_check_interval`` unless
        forced); True when new material was taken."""
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked < self._interval:
                return False
            self._checked = now
            try:
                if _stamp(self._paths) == self._material.stamp:
                    return False
                material = self._read()
            except OSError as exc:
                log.warning("TLS files unreadable, keeping the current certificate: %s", exc)
                return False
            if material is None or material == self._material:
                return False
            self._material = material
            self.generation += 1
        log.info("TLS certificate files changed: new connections use the renewed certificate")
        return True


def server_credentials(config: TlsConfig) -> grpc.ServerCredentials:
    """Mutual TLS: the client must present a certificate from the CA; renewed files are used from
    the next handshake on."""
    files = CertificateFiles(config, min_check_interval=0.0)  # a stat per handshake: negligible

    def configuration(m: _Material) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(m.key_pem, m.cert_pem)], root_certificates=m.ca_pem)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        return configuration(files.material) if files.refresh() else None

    # types-grpcio types the fetcher as never returning None; gRPC documents None as "no change".
    return grpc.dynamic_ssl_server_credentials(
        configuration(files.material),
        fetch,  # type: ignore[arg-type]
        require_client_authentication=True,
    )


_warned_clients = False


def warn_insecure(role: str) -> None:
    """Every plaintext server says so when it starts; clients once per process."""
    global _warned_clients
    if role == "client":
        if _warned_clients:
            return
        _warned_clients = True
    log.warning("CIPHERFEED_INSECURE_DEV=1: %s uses PLAINTEXT gRPC and no caller identities (development only)", role)


class RenewingChannel(grpc.Channel):
    """A mutual-TLS channel that moves to a fresh underlying channel when its certificate files
    change, so a long-running client presents its renewed certificate without a restart.

    Calls already in flight finish on the channel they started on; retired channels are closed
    after ``retire_grace`` seconds (or with this one).
    """

    def __init__(
        self,
        target: str,
        options: list[tuple[str, Any]],
        config: TlsConfig,
        server_name: str,
        retire_grace: float = 300.0,
        check_interval: float = 1.0,
    ) -> None:
        self._target = target
        self._options = [*options, ("grpc.ssl_target_name_override", server_name)]
        self._files = CertificateFiles(config, min_check_interval=check_interval)
        self._retire_grace = retire_grace
        self._lock = threading.Lock()
        self._retired: list[tuple[float, grpc.Channel]] = []
        self._current = self._open()
        self._generation = self._files.generation

    def _open(self) -> grpc.Channel:
        m = self._files.material
        credentials = grpc.ssl_channel_credentials(
            root_certificates=m.ca_pem, private_key=m.key_pem, certificate_chain=m.cert_pem
        )
        return grpc.secure_channel(self._target, credentials, options=self._options)

    def current(self) -> tuple[int, grpc.Channel]:
        if self._files.refresh():
            with self._lock:
                if self._generation != self._files.generation:
                    now = time.monotonic()
                    self._retired.append((now, self._current))
                    self._current = self._open()
                    self._generation = self._files.generation
                    expired = [c for t, c in self._retired if now - t > self._retire_grace]
                    self._retired = [(t, c) for t, c in self._retired if now - t <= self._retire_grace]
                    for old in expired:
                        old.close()
        return self._generation, self._current

    def _multicallable(self, kind: str, method: str, kwargs: dict[str, Any]) -> _RenewingCall:
        return _RenewingCall(self, kind, method, kwargs)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._multicallable("unary_unary", method, _call_kwargs(args, kwargs))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._multicallable("unary_stream", method, _call_kwargs(args, kwargs))

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._multicallable("stream_unary", method, _call_kwargs(args, kwargs))

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._multicallable("stream_stream", method, _call_kwargs(args, kwargs))

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False) -> None:
        self.current()[1].subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._current.unsubscribe(callback)

    def close(self) -> None:
        with self._lock:
            for _, old in self._retired:
                old.close()
            self._retired = []
            self._current.close()

    def __enter__(self) -> RenewingChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _call_kwargs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("request_serializer", "response_deserializer", "_registered_method")
    return {**dict(zip(names, args, strict=False)), **kwargs}


class _RenewingCall:
    """A multicallable bound to whichever underlying channel is current when it is invoked."""

    def __init__(self, owner: RenewingChannel, kind: str, method: str, kwargs: dict[str, Any]) -> None:
        self._owner, self._kind, self._method, self._kwargs = owner, kind, method, kwargs
        self._bound: tuple[int, Any] | None = None

    def _target(self) -> Any:
        generation, channel = self._owner.current()
        bound = self._bound
        if bound is None or bound[0] != generation:
            bound = (generation, getattr(channel, self._kind)(self._method, **self._kwargs))
            self._bound = bound
        return bound[1]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._target()(*args, **kwargs)

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        return self._target().with_call(*args, **kwargs)

    def future(self, *args: Any, **kwargs: Any) -> Any:
        return self._target().future(*args, **kwargs)
