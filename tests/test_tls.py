"""Mutual TLS: certificates renewed on disk are used by new connections without a restart (server
and client side), half-written files are ignored, keys are 0600 and never logged, and plaintext
needs the explicit development setting."""

from __future__ import annotations

import logging
import socket
import ssl
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from cipherfeed.config import ConfigError, TlsConfig
from cipherfeed.grpcutil import RunningServer, channel, start_server
from cipherfeed.identity import peer_identity
from cipherfeed.tls import DevCertificateAuthority, RenewingChannel
from cipherfeed.v1 import keyservice_pb2, keyservice_pb2_grpc
from tests.conftest import TEST_LIMITS

SERVICE = keyservice_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name


class WhoAmI(keyservice_pb2_grpc.KeyServiceServicer):
    """Answers GetPublicKeys and records who asked, with which certificate."""

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, bytes]] = []

    def GetPublicKeys(self, request, context):
        self.seen.append((peer_identity(context), context.auth_context().get("x509_pem_cert", [b""])[0]))
        return keyservice_pb2.GetPublicKeysResponse()


def serve(tls: TlsConfig) -> tuple[RunningServer, WhoAmI]:
    servicer = WhoAmI()
    running = start_server(
        lambda s: keyservice_pb2_grpc.add_KeyServiceServicer_to_server(servicer, s),
        [SERVICE],
        "127.0.0.1:0",
        TEST_LIMITS,
        2,
        tls,
    )
    return running, servicer


def serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def presented_server_serial(port: int, client: TlsConfig) -> int:
    """The certificate the server presents to a brand-new connection (a plain TLS handshake)."""
    context = ssl.create_default_context(cafile=str(client.ca_file))
    context.check_hostname = False  # the name check is grpc's job; this only reads the certificate
    context.load_cert_chain(str(client.cert_file), str(client.key_file))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="keyservice") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def who(ch: grpc.Channel) -> None:
    keyservice_pb2_grpc.KeyServiceStub(ch).GetPublicKeys(keyservice_pb2.GetPublicKeysRequest(), timeout=10)


@pytest.fixture
def ca() -> DevCertificateAuthority:
    return DevCertificateAuthority("rotation.test")


def test_renewed_files_are_used_by_new_connections_without_a_restart(ca, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    server_tls, client_tls = ca.write(tmp_path, "keyservice"), ca.write(tmp_path, "operator")
    running, servicer = serve(server_tls)
    try:
        target = f"127.0.0.1:{running.port}"
        ch = RenewingChannel(target, TEST_LIMITS.channel_options(), client_tls, "keyservice", check_interval=0)
        who(ch)
        first_client_cert = servicer.seen[-1][1]
        assert servicer.seen[-1][0] == "operator"
        assert serial(first_client_cert) == serial(Path(client_tls.cert_file).read_bytes())
        first_server = presented_server_serial(running.port, client_tls)
        assert first_server == serial(Path(server_tls.cert_file).read_bytes())

        ca.write(tmp_path, "keyservice")  # both renewed in place, as cert-manager does
        ca.write(tmp_path, "operator")
        renewed_server = serial(Path(server_tls.cert_file).read_bytes())
        assert renewed_server != first_server
        assert presented_server_serial(running.port, client_tls) == renewed_server
        who(ch)  # the same client object, no restart on either side
        assert servicer.seen[-1][1] != first_client_cert
        assert serial(servicer.seen[-1][1]) == serial(Path(client_tls.cert_file).read_bytes())
        ch.close()
    finally:
        running.stop(grace=0)
    secrets = [Path(server_tls.key_file).read_bytes(), Path(client_tls.key_file).read_bytes()]
    logged = caplog.text
    assert "TLS certificate files changed" in logged
    assert not any(key.decode().splitlines()[1] in logged for key in secrets)


def test_a_half_written_pair_is_ignored_until_it_is_complete(ca, tmp_path):
    server_tls, client_tls = ca.write(tmp_path, "keyservice"), ca.write(tmp_path, "operator")
    running, _ = serve(server_tls)
    try:
        before = presented_server_serial(running.port, client_tls)
        old_cert = Path(server_tls.cert_file).read_bytes()
        ca.write(tmp_path, "keyservice")
        Path(server_tls.cert_file).write_bytes(old_cert)  # new key, old certificate: mid-rotation
        assert presented_server_serial(running.port, client_tls) == before  # keeps serving the old pair
        ca.write(tmp_path, "keyservice")  # the rotation completes
        assert presented_server_serial(running.port, client_tls) != before
    finally:
        running.stop(grace=0)


def test_keys_are_written_0600_and_services_need_tls_files_or_the_dev_setting(ca, tmp_path, monkeypatch):
    tls = ca.write(tmp_path / "pki", "recommender")
    assert stat.S_IMODE(Path(tls.key_file).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700
    with pytest.raises(ConfigError, match="CIPHERFEED_INSECURE_DEV"):
        serve(TlsConfig())
    with pytest.raises(ConfigError, match="not the private key"):
        serve(TlsConfig(cert_file=tls.cert_file, key_file=ca.write(tmp_path, "other").key_file, ca_file=tls.ca_file))
    monkeypatch.setenv("CIPHERFEED_INSECURE_DEV", "yes")
    with pytest.raises(ConfigError, match="CIPHERFEED_INSECURE_DEV"):
        TlsConfig.from_env()


def test_plaintext_only_behind_the_dev_setting_and_with_a_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("CIPHERFEED_INSECURE_DEV", "1")
    dev = TlsConfig.from_env()
    assert dev.insecure_dev
    with caplog.at_level(logging.WARNING):
        running, servicer = serve(dev)
    try:
        assert "PLAINTEXT" in caplog.text and "development only" in caplog.text
        with channel(f"127.0.0.1:{running.port}", TEST_LIMITS, dev, "keyservice") as ch:
            who(ch)
        assert servicer.seen[-1][0] is None  # no identities in plaintext
    finally:
        running.stop(grace=0)


def test_a_client_refuses_a_server_certificate_for_another_service(ca, tmp_path):
    server_tls, client_tls = ca.write(tmp_path, "ledger"), ca.write(tmp_path, "recommender")
    running, _ = serve(server_tls)  # a ledger's certificate where the key service should be
    try:
        with (
            channel(f"127.0.0.1:{running.port}", TEST_LIMITS, client_tls, "keyservice") as ch,
            pytest.raises(grpc.RpcError) as info,
        ):
            who(ch)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(grace=0)
