"""The whole authorization table over real mutual TLS on loopback: every method every server
serves (found by reflection, described by the descriptor pool, so a new RPC without a policy entry
fails here) x every identity, a stranger, certificates naming no identity of this mesh, and none."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cipherfeed import errors, policy
from cipherfeed.config import TlsConfig
from cipherfeed.grpcutil import channel, reason_of
from cipherfeed.v1 import keyservice_pb2, keyservice_pb2_grpc
from services.ledger.server import serve as serve_ledger
from services.ledger.signers import LocalSigner
from tests.conftest import TEST_LIMITS, MeshPki
from tests.test_ledger import ORIGIN, ledger_config

DENIALS = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
STRANGER = "stranger"  # a certificate the CA issued to a name the table does not know
NO_ID = "no-spiffe-id"  # signed by the CA, no SPIFFE URI SAN
FOREIGN = "foreign-domain"  # signed by the CA, spiffe://another.domain/operator
NO_CERT = "no-certificate"


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("policy-ledger")
    running, core = serve_ledger(ledger_config(tmp), signer=LocalSigner(ORIGIN), background_anchoring=False)
    yield running.port
    running.stop(grace=1)
    core.close()


@pytest.fixture(scope="module")
def servers(keyservice, recommender, ledger):
    return {"keyservice": keyservice[0], "recommender": recommender[0], "ledger": ledger}


@pytest.fixture(scope="module")
def caller_tls(pki: MeshPki) -> dict[str, TlsConfig | None]:
    callers: dict[str, TlsConfig | None] = {name: pki.tls(name) for name in policy.IDENTITIES}
    callers[STRANGER] = pki.tls(STRANGER)
    callers[NO_ID] = pki.ca.write(pki.directory, NO_ID, uris=[])
    callers[FOREIGN] = pki.ca.write(pki.directory, FOREIGN, uris=["spiffe://another.domain/operator"])
    callers[NO_CERT] = None
    return callers


def open_channel(port: int, server: str, tls: TlsConfig | None, pki: MeshPki) -> grpc.Channel:
    target = f"127.0.0.1:{port}"
    if tls is None:  # trusts the server, presents nothing
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem)
        return grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", server)])
    return channel(target, TEST_LIMITS, tls, server)


def served_methods(port: int, server: str, pki: MeshPki) -> list[str]:
    """Every method the server serves, as ``/package.Service/Method``, asked of the server itself."""
    with open_channel(port, server, pki.tls(policy.OPERATOR), pki) as ch:
        names = ProtoReflectionDescriptorDatabase(ch).get_services()
    pool = descriptor_pool.Default()
    return [f"/{name}/{m.name}" for name in names for m in pool.FindServiceByName(name).methods]


def call(ch: grpc.Channel, method: str) -> grpc.StatusCode:
    """Calls ``method`` with an empty request; the status (OK, or the refusal or error)."""
    return call_with_reason(ch, method)[0]


def call_with_reason(ch: grpc.Channel, method: str) -> tuple[grpc.StatusCode, str | None]:
    service_name, _, method_name = method[1:].partition("/")
    desc = descriptor_pool.Default().FindServiceByName(service_name).methods_by_name[method_name]
    request_type = message_factory.GetMessageClass(desc.input_type)
    response_type = message_factory.GetMessageClass(desc.output_type)
    codec = {"request_serializer": request_type.SerializeToString, "response_deserializer": response_type.FromString}
    request = request_type()
    if desc.full_name == "grpc.reflection.v1alpha.ServerReflection.ServerReflectionInfo":
        request = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        if desc.client_streaming and desc.server_streaming:
            next(iter(ch.stream_stream(method, **codec)(iter([request]), timeout=10)))
        elif desc.server_streaming:
            stream = ch.unary_stream(method, **codec)(request, timeout=10)
            next(iter(stream))
            stream.cancel()
        elif desc.client_streaming:
            ch.stream_unary(method, **codec)(iter([request]), timeout=10)
        else:
            ch.unary_unary(method, **codec)(request, timeout=10)
    except grpc.RpcError as exc:
        return exc.code(), reason_of(exc)
    return grpc.StatusCode.OK, None


def expected(method: str, caller: str) -> set[grpc.StatusCode] | None:
    """The refusal a caller must get, or None when the table lets it through to the handler."""
    if caller == NO_CERT:
        return {grpc.StatusCode.UNAVAILABLE}  # the TLS handshake refuses a peer without a certificate
    if caller in (NO_ID, FOREIGN):
        return {grpc.StatusCode.UNAUTHENTICATED}
    if policy.allowed(method, caller):
        return None
    return {grpc.StatusCode.PERMISSION_DENIED}


def test_the_policy_names_only_methods_that_exist_and_identities_it_knows(servers, pki):
    served = {m for server, port in servers.items() for m in served_methods(port, server, pki)}
    assert set(policy.POLICY) == served
    for method, identities in policy.POLICY.items():
        assert identities and identities <= set(policy.IDENTITIES), method


def test_every_method_of_every_service_for_every_caller(servers, pki, caller_tls):
    walked = 0
    outcomes: dict[tuple[str, str], grpc.StatusCode] = {}
    reasons = {grpc.StatusCode.UNAUTHENTICATED: set(), grpc.StatusCode.PERMISSION_DENIED: set()}
    for server, port in servers.items():
        methods = served_methods(port, server, pki)
        for method in methods:
            assert method in policy.POLICY, f"{method} is served but has no policy entry (deny by default)"
        for caller, tls in caller_tls.items():
            with open_channel(port, server, tls, pki) as ch:
                for method in methods:
                    code, reason = call_with_reason(ch, method)
                    outcomes[(method, caller)] = code
                    reasons.get(code, set()).add(reason)
                    walked += 1
    failures = []
    for (method, caller), got in outcomes.items():
        want = expected(method, caller)
        if (want is None and got in DENIALS) or (want is not None and got not in want):
            failures.append(f"{caller} -> {method}: {got.name}, expected {'through' if want is None else want}")
    assert not failures, "\n".join(failures)
    assert reasons[grpc.StatusCode.UNAUTHENTICATED] == {errors.Reason.NO_PEER_IDENTITY.value}
    assert reasons[grpc.StatusCode.PERMISSION_DENIED] == {errors.Reason.CALLER_NOT_ALLOWED.value}
    assert walked == len(caller_tls) * sum(len(served_methods(p, s, pki)) for s, p in servers.items())
    # The table is not vacuous: each identity is let through somewhere and refused somewhere.
    for identity in policy.IDENTITIES:
        assert any(expected(m, identity) is None for m, c in outcomes if c == identity)
        assert any(expected(m, identity) is not None for m, c in outcomes if c == identity)


def test_a_refused_call_never_reaches_its_handler(keyservice, pki):
    port, core = keyservice
    before = [(k.name, k.version) for k in core.public_keys()]
    as_device = keyservice_pb2_grpc.KeyServiceStub(pki.channel(port, "keyservice", policy.DEVICE))
    as_ledger = keyservice_pb2_grpc.KeyServiceStub(pki.channel(port, "keyservice", policy.LEDGER))
    with pytest.raises(grpc.RpcError) as info:
        as_device.RotateSigningKey(keyservice_pb2.RotateSigningKeyRequest(key_name="ledger"), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "device" in info.value.details() and "RotateSigningKey" in info.value.details()
    assert reason_of(info.value) == errors.Reason.CALLER_NOT_ALLOWED.value
    assert [(k.name, k.version) for k in core.public_keys()] == before  # nothing rotated
    with pytest.raises(grpc.RpcError) as info:
        as_device.Sign(keyservice_pb2.SignRequest(key_name="ledger", message=b"forged checkpoint"), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    signed = as_ledger.Sign(keyservice_pb2.SignRequest(key_name="ledger", message=b"checkpoint"), timeout=5)
    current = [k for k in core.public_keys() if k.name == "ledger"][-1]
    Ed25519PublicKey.from_public_bytes(current.public_key).verify(signed.signature, b"checkpoint")


def test_a_certificate_of_another_ca_is_refused_in_the_handshake(keyservice, pki, tmp_path):
    from cipherfeed.tls import DevCertificateAuthority

    other = DevCertificateAuthority(pki.ca.trust_domain)  # same trust domain, other CA: an impostor
    impostor = dataclasses.replace(other.write(tmp_path, policy.OPERATOR), ca_file=pki.tls("operator").ca_file)
    with channel(f"127.0.0.1:{keyservice[0]}", TEST_LIMITS, impostor, "keyservice") as ch:
        code = call(ch, "/cipherfeed.v1.KeyService/RotateSigningKey")
    assert code == grpc.StatusCode.UNAVAILABLE
    with pki.channel(keyservice[0], "keyservice", policy.OPERATOR) as ch:  # and the service still serves
        assert call(ch, "/grpc.health.v1.Health/Check") == grpc.StatusCode.OK


def test_reflection_lists_the_services_to_an_authenticated_caller(servers, pki):
    with open_channel(servers["ledger"], "ledger", pki.tls(policy.DEVICE), pki) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
    assert "cipherfeed.v1.Ledger" in {s.name for s in reply.list_services_response.service}
