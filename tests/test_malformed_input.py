"""Bad input gets a precise status and the recommender keeps serving."""

import hashlib
import os

import grpc
import numpy as np
import openfhe
import pytest
from eth_account import Account

from cipherfeed import ownerauth
from cipherfeed.client.sdk import RECOMMENDER
from cipherfeed.config import GrpcLimits
from cipherfeed.he import globalkeys
from cipherfeed.he.codec import Kind, serialize
from cipherfeed.he.params import MESH_PARAMS, HEParams, build_context
from cipherfeed.v1 import (
    common_pb2,
    keyservice_pb2,
    keyservice_pb2_grpc,
    recommender_pb2,
    recommender_pb2_grpc,
)
from tests.conftest import mesh_pki

STATUS = grpc.StatusCode


def wide_channel(port: int, server: str, identity: str = "device") -> grpc.Channel:
    """A channel whose own limits are far above the servers', so that their limits are what is tested."""
    limit = 200 * 2**20
    return mesh_pki().channel(port, server, identity, GrpcLimits(max_message_bytes=limit))


@pytest.fixture(scope="module")
def stub(recommender):
    with wide_channel(recommender[0], "recommender") as ch:
        yield recommender_pb2_grpc.RecommenderStub(ch)


@pytest.fixture(scope="module")
def valid_query(client):
    return client.encrypt_query(np.eye(64)[0])


def score(stub, client, query, key_id=None, model_version=""):
    key = common_pb2.KeyRef(key_id=client.key_id if key_id is None else key_id, version=client.key_version)
    request = recommender_pb2.ScoreRequest(key=key, query_ciphertext=query, model_version=model_version)
    return stub.Score(client._authorize(RECOMMENDER, "Score", key.key_id, request), timeout=60)


def expect(code, fn, *args, match="", **kwargs):
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details()
    return info.value.details()


def assert_still_serving(stub, client, valid_query, core):
    reply = score(stub, client, valid_query)
    assert len(reply.score_ciphertexts) == core.scorer.block_count


def foreign_ciphertext(params: HEParams) -> bytes:
    cc = build_context(params)
    kp = cc.KeyGen()
    return serialize(cc.Encrypt(kp.publicKey, cc.MakeCKKSPackedPlaintext(np.zeros(params.slots, dtype=complex))))


def test_garbage_truncated_and_padded_queries(stub, client, valid_query, recommender):
    _, core = recommender
    cases = {
        "empty": b"",
        "random short": os.urandom(100),
        "random right length": os.urandom(len(valid_query)),
        "truncated": valid_query[:-1000],
        "header only": valid_query[:5000],
        "padded": valid_query + b"\x00" * 10_000,
    }
    for name, query in cases.items():
        details = expect(STATUS.INVALID_ARGUMENT, score, stub, client, query)
        assert "query" in details, name
    assert_still_serving(stub, client, valid_query, core)


def test_valid_header_with_random_body_is_refused_or_harmless(stub, client, valid_query, recommender):
    _, core = recommender
    template = core.codec.template(Kind.QUERY)
    body = os.urandom(len(valid_query) - len(template.header))
    try:
        score(stub, client, template.header + body)
    except grpc.RpcError as exc:
        assert exc.code() == STATUS.INVALID_ARGUMENT, exc.details()
    assert_still_serving(stub, client, valid_query, core)


def test_ciphertexts_from_other_contexts_never_reach_openfhe(stub, client, valid_query, recommender):
    _, core = recommender
    other_ring = foreign_ciphertext(HEParams(ring_dimension=16384))
    other_moduli = foreign_ciphertext(HEParams(scaling_mod_bits=50))
    contexts_before = len(openfhe.GetAllContexts())
    expect(STATUS.INVALID_ARGUMENT, score, stub, client, other_ring, match="bytes")
    expect(STATUS.INVALID_ARGUMENT, score, stub, client, other_moduli, match="crypto parameters")
    assert len(openfhe.GetAllContexts()) == contexts_before  # nothing foreign was registered
    assert_still_serving(stub, client, valid_query, core)


def test_wrong_level_and_wrong_slot_count(stub, client, valid_query, recommender):
    _, core = recommender
    keys = client.keys
    cc = keys.cc
    level1 = cc.Encrypt(keys.public_key, cc.MakeCKKSPackedPlaintext(np.zeros(4096, dtype=complex), 1, 1))
    expect(STATUS.INVALID_ARGUMENT, score, stub, client, serialize(level1), match="bytes")
    few_slots = cc.Encrypt(keys.public_key, cc.MakeCKKSPackedPlaintext(np.zeros(1024, dtype=complex), 1, 0, None, 1024))
    # The slot count is a field of the serialization: refused before OpenFHE parses it.
    expect(STATUS.INVALID_ARGUMENT, score, stub, client, serialize(few_slots), match="crypto parameters")
    assert_still_serving(stub, client, valid_query, core)


def test_oversize_messages(stub, client, valid_query, recommender):
    _, core = recommender
    expect(STATUS.RESOURCE_EXHAUSTED, score, stub, client, b"\x00" * (2 * 2**20), match="limit")
    # Above the transport limit (64 MiB): grpc refuses it before the servicer runs.
    expect(STATUS.RESOURCE_EXHAUSTED, score, stub, client, b"\x00" * (65 * 2**20))
    assert_still_serving(stub, client, valid_query, core)


def test_unknown_and_missing_key_ids_and_pinned_model(stub, client, valid_query, recommender):
    _, core = recommender
    expect(STATUS.NOT_FOUND, score, stub, client, valid_query, key_id="ab" * 32, match="no key")
    expect(STATUS.INVALID_ARGUMENT, score, stub, client, valid_query, key_id="", match="key_id")
    expect(STATUS.FAILED_PRECONDITION, score, stub, client, valid_query, model_version="0" * 64, match="serves")
    assert_still_serving(stub, client, valid_query, core)


def test_unknown_items(stub, tiktok_model):
    get = stub.GetItems
    expect(
        STATUS.NOT_FOUND,
        get,
        recommender_pb2.GetItemsRequest(item_ids=["no-such-video"]),
        timeout=5,
        match="no-such-video",
    )
    expect(
        STATUS.NOT_FOUND,
        get,
        recommender_pb2.GetItemsRequest(indices=[tiktok_model.item_count]),
        timeout=5,
        match="outside",
    )
    expect(STATUS.RESOURCE_EXHAUSTED, get, recommender_pb2.GetItemsRequest(indices=list(range(1001))), timeout=5)
    ok = get(recommender_pb2.GetItemsRequest(indices=[0], item_ids=[tiktok_model.item_ids[1]]), timeout=5)
    assert [i.index for i in ok.items] == [0, 1] and "embedding" not in recommender_pb2.Item.DESCRIPTOR.fields_by_name


REGISTRANT = Account.create()


def register(stub, public_key, rotation_keys):
    request = keyservice_pb2.RegisterKeyRequest(
        public_key=public_key, rotation_key_map=rotation_keys, owner=REGISTRANT.address
    )
    key_id = hashlib.sha256(public_key).hexdigest()
    ownerauth.sign_request(REGISTRANT, 31337, "cipherfeed.v1.KeyService/RegisterKey", key_id, request)
    return stub.RegisterKey(request, timeout=60)


@pytest.fixture(scope="module")
def keyservice_stub(keyservice):
    with wide_channel(keyservice[0], "keyservice") as ch:
        yield keyservice_pb2_grpc.KeyServiceStub(ch)


def test_invalid_key_material_is_refused_by_the_key_service(keyservice_stub, stub, client, valid_query, recommender):
    _, core = recommender
    ks = keyservice_stub
    keys = client.keys
    expect(STATUS.INVALID_ARGUMENT, register, ks, os.urandom(1000), keys.rotation_key_bytes, match="public key")
    expect(
        STATUS.INVALID_ARGUMENT,
        register,
        ks,
        keys.public_key_bytes,
        os.urandom(5000),
        match="rotation key map",
    )
    truncated = keys.rotation_key_bytes[: len(keys.rotation_key_bytes) // 2]
    expect(STATUS.INVALID_ARGUMENT, register, ks, keys.public_key_bytes, truncated, match="rotation key map")
    # Same size as a valid map but the wrong rotations (16 replaced by 5): the automorphism indices
    # are fixed bytes of the map's serialization (and the trial rotation would fail next).
    cc = keys.cc
    kp = cc.KeyGen()
    indices = [5 if i == 16 else i for i in MESH_PARAMS.rotation_indices]
    wrong = globalkeys.generate_serialized(cc, kp.secretKey, indices, kp.publicKey.GetKeyTag())
    expect(STATUS.INVALID_ARGUMENT, register, ks, serialize(kp.publicKey), wrong, match="rotation key map")
    # Keys for another ring size (a few rotations: the whole set would exceed the size limit).
    other_cc = build_context(HEParams(ring_dimension=16384))
    other = other_cc.KeyGen()
    other_map = globalkeys.generate_serialized(other_cc, other.secretKey, [1, 2, 3, 4], other.publicKey.GetKeyTag())
    expect(
        STATUS.INVALID_ARGUMENT,
        register,
        ks,
        serialize(other.publicKey),
        keys.rotation_key_bytes,
        match="public key",
    )
    expect(
        STATUS.INVALID_ARGUMENT,
        register,
        ks,
        keys.public_key_bytes,
        other_map,
        match="rotation key map",
    )
    # Oversize material: above the gRPC limit of the channel's peer or the service's own limit.
    expect(STATUS.RESOURCE_EXHAUSTED, register, ks, keys.public_key_bytes, b"\x00" * (65 * 2**20))
    assert 16 in MESH_PARAMS.rotation_indices
    assert_still_serving(stub, client, valid_query, core)


@pytest.mark.parametrize("raw", [b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05abc"], ids=["tag", "length", "short"])
def test_bytes_that_are_no_request_message_are_invalid_argument(recommender, keyservice, client, valid_query, raw):
    """Found by the protocol fuzzer on every RPC: gRPC's own deserializer answered INTERNAL
    ("Exception deserializing request!") for bytes that are no protobuf message. They are refused
    as INVALID_ARGUMENT with REQUEST_MALFORMED, the refusal is counted, and both services keep serving."""
    from cipherfeed.grpcutil import reason_of, refusals

    before = refusals.counts["REQUEST_MALFORMED"]
    for port, server, path in (
        (recommender[0], "recommender", "/cipherfeed.v1.Recommender/Score"),
        (keyservice[0], "keyservice", "/cipherfeed.v1.KeyService/GetKey"),
    ):
        with wide_channel(port, server) as ch, pytest.raises(grpc.RpcError) as info:
            ch.unary_unary(path)(raw, timeout=30)
        assert info.value.code() == STATUS.INVALID_ARGUMENT, info.value.details()
        assert reason_of(info.value) == "REQUEST_MALFORMED"
    assert refusals.counts["REQUEST_MALFORMED"] == before + 2
    assert len(client.score_ciphertext(valid_query).scores) > 0
