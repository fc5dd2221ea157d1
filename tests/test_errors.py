"""Errors as data: every refusal carries a google.rpc.ErrorInfo with a stable reason, over real gRPC;
messages never echo unbounded input; refusals are logged once each, rate-limited."""

import hashlib
import logging
import os
from concurrent import futures

import grpc
import numpy as np
import pytest
from eth_account import Account

from cipherfeed import errors, grpcutil, ownerauth
from cipherfeed.client.sdk import KEYSERVICE, RECOMMENDER
from cipherfeed.errors import Reason
from cipherfeed.grpcutil import error_info_of, reason_of, retry_delay_of
from cipherfeed.v1 import (
    common_pb2,
    keyservice_pb2,
    keyservice_pb2_grpc,
    recommender_pb2,
    recommender_pb2_grpc,
)
from tests.test_malformed_input import wide_channel

MIB = 2**20
CODE = grpc.StatusCode

KIND = {
    Reason.FIELD_REQUIRED: errors.InvalidArgument,
    Reason.FIELD_INVALID: errors.InvalidArgument,
    Reason.REQUEST_MALFORMED: errors.InvalidArgument,
    Reason.HE_MATERIAL_INVALID: errors.InvalidArgument,
    Reason.PROFILE_KEY_MISMATCH: errors.InvalidArgument,
    Reason.PROOF_RANGE_INVALID: errors.InvalidArgument,
    Reason.NO_PEER_IDENTITY: errors.Unauthenticated,
    Reason.CALLER_NOT_ALLOWED: errors.PermissionDenied,
    Reason.KEY_NOT_FOUND: errors.NotFound,
    Reason.SIGNING_KEY_NOT_FOUND: errors.NotFound,
    Reason.ITEM_NOT_FOUND: errors.NotFound,
    Reason.PROFILE_NOT_FOUND: errors.NotFound,
    Reason.RECEIPT_NOT_FOUND: errors.NotFound,
    Reason.ROUTE_NOT_FOUND: errors.NotFound,
    Reason.KEY_MATERIAL_CONFLICT: errors.AlreadyExists,
    Reason.KEY_NOT_ENABLED: errors.FailedPrecondition,
    Reason.KEY_VERSION_UNAVAILABLE: errors.FailedPrecondition,
    Reason.KEY_VERSION_RETIRED: errors.FailedPrecondition,
    Reason.MODEL_MISMATCH: errors.FailedPrecondition,
    Reason.NOT_CHECKPOINTED: errors.FailedPrecondition,
    Reason.NO_CHECKPOINT: errors.FailedPrecondition,
    Reason.SHUTTING_DOWN: errors.FailedPrecondition,
    Reason.SIZE_LIMIT: errors.ResourceExhausted,
    Reason.COUNT_LIMIT: errors.ResourceExhausted,
    Reason.RATE_LIMITED: errors.ResourceExhausted,
    Reason.DEPENDENCY_UNAVAILABLE: errors.Unavailable,
    Reason.BACKLOG_FULL: errors.Unavailable,
    Reason.RETRY: errors.Unavailable,
    Reason.INTERNAL: errors.CipherfeedError,
    Reason.OWNER_AUTH_REQUIRED: errors.Unauthenticated,
    Reason.OWNER_AUTH_INVALID: errors.Unauthenticated,
    Reason.OWNER_AUTH_EXPIRED: errors.Unauthenticated,
    Reason.OWNER_AUTH_REPLAYED: errors.Unauthenticated,
    Reason.NOT_KEY_OWNER: errors.PermissionDenied,
    Reason.RESERVED_SIGNING_KEY: errors.PermissionDenied,
    Reason.OWNER_QUOTA: errors.ResourceExhausted,
}
CODE_OF = {
    errors.InvalidArgument: CODE.INVALID_ARGUMENT,
    errors.NotFound: CODE.NOT_FOUND,
    errors.AlreadyExists: CODE.ALREADY_EXISTS,
    errors.FailedPrecondition: CODE.FAILED_PRECONDITION,
    errors.ResourceExhausted: CODE.RESOURCE_EXHAUSTED,
    errors.Unavailable: CODE.UNAVAILABLE,
    errors.Unauthenticated: CODE.UNAUTHENTICATED,
    errors.PermissionDenied: CODE.PERMISSION_DENIED,
    errors.CipherfeedError: CODE.INTERNAL,
    errors.Unauthenticated: CODE.UNAUTHENTICATED,
    errors.PermissionDenied: CODE.PERMISSION_DENIED,
}


def test_every_reason_has_a_kind():
    assert set(KIND) == set(Reason)


class Raiser:
    """A loopback service whose one method raises whatever domain error the test hands it."""

    def __init__(self):
        self.error: Exception | None = None

    @grpcutil.grpc_errors
    def Raise(self, request, context):
        raise self.error


@pytest.fixture(scope="module")
def raiser():
    target = Raiser()
    handler = grpc.method_handlers_generic_handler(
        "cipherfeed.test.Errors",
        {"Raise": grpc.unary_unary_rpc_method_handler(target.Raise, lambda b: b, lambda b: b)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary("/cipherfeed.test.Errors/Raise", lambda b: b, lambda b: b)

        def raise_remotely(error):
            target.error = error
            with pytest.raises(grpc.RpcError) as info:
                call(b"", timeout=10)
            return info.value

        yield raise_remotely
    server.stop(grace=0)


@pytest.mark.parametrize("reason", list(Reason), ids=lambda r: r.value)
def test_each_reason_travels_as_error_info_with_its_status_code(raiser, reason):
    kind = KIND[reason]
    err = raiser(kind("what happened", reason=reason, metadata={"field": "key_id", "limit": 64}))
    assert err.code() == CODE_OF[kind]
    info = error_info_of(err)
    assert info is not None and info.domain == errors.DOMAIN
    if kind is errors.CipherfeedError:  # an untyped domain error is a bug: INTERNAL, nothing echoed
        assert info.reason == "INTERNAL" and err.details() == "internal error" and not info.metadata
    else:
        assert reason_of(err) == reason.value
        assert dict(info.metadata) == {"field": "key_id", "limit": "64"}
        assert err.details() == "what happened"
        assert retry_delay_of(err) is None


def test_unexpected_exceptions_are_internal_with_a_reason_and_no_details(raiser):
    err = raiser(KeyError("secret-ish detail"))
    assert err.code() == CODE.INTERNAL and err.details() == "internal error"
    assert reason_of(err) == "INTERNAL"


def test_rate_limits_can_carry_retry_info(raiser):
    err = raiser(errors.rate_limited("too many scores for this owner", retry_after=2.5, owner="abc"))
    assert err.code() == CODE.RESOURCE_EXHAUSTED and reason_of(err) == "RATE_LIMITED"
    assert retry_delay_of(err) == 2.5
    assert dict(error_info_of(err).metadata) == {"owner": "abc"}


def test_huge_messages_and_metadata_are_capped(raiser):
    err = raiser(errors.InvalidArgument("x" * MIB, metadata={f"k{i}": "v" * MIB for i in range(100)}))
    assert err.code() == CODE.INVALID_ARGUMENT  # not UNAVAILABLE: the trailers fit gRPC's limit
    assert len(err.details()) <= grpcutil.MAX_MESSAGE_CHARS
    info = error_info_of(err)
    assert len(info.metadata) <= grpcutil.MAX_METADATA_ENTRIES
    assert all(len(v) <= grpcutil.MAX_METADATA_CHARS for v in info.metadata.values())


def test_reason_of_is_none_without_a_rich_status():
    # nothing listens on port 1
    with grpc.insecure_channel("127.0.0.1:1") as ch, pytest.raises(grpc.RpcError) as info:
        keyservice_pb2_grpc.KeyServiceStub(ch).GetKey(keyservice_pb2.GetKeyRequest(key_id="ab"), timeout=2)
    assert info.value.code() == CODE.UNAVAILABLE
    assert reason_of(info.value) is None and retry_delay_of(info.value) is None


# --- the services' own refusals -----------------------------------------------------------------


@pytest.fixture(scope="module")
def ks(keyservice):
    with wide_channel(keyservice[0], "keyservice") as ch:
        yield keyservice_pb2_grpc.KeyServiceStub(ch)


@pytest.fixture(scope="module")
def ks_as(keyservice):
    """Key service stubs for the identities its signing and rotation-key RPCs allow."""
    with (
        wide_channel(keyservice[0], "keyservice", "ledger") as ledger,
        wide_channel(keyservice[0], "keyservice", "operator") as operator,
        wide_channel(keyservice[0], "keyservice", "recommender") as recommender,
    ):
        yield {
            name: keyservice_pb2_grpc.KeyServiceStub(ch)
            for name, ch in (("ledger", ledger), ("operator", operator), ("recommender", recommender))
        }


@pytest.fixture(scope="module")
def rec(recommender):
    with wide_channel(recommender[0], "recommender") as ch:
        yield recommender_pb2_grpc.RecommenderStub(ch)


def refused(call, request):
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=60)
    return info.value


def expect_reason(err, code, reason, **metadata):
    assert err.code() == code, err.details()
    assert reason_of(err) == reason.value, err.details()
    assert len(err.details()) <= grpcutil.MAX_MESSAGE_CHARS
    info = error_info_of(err)
    for k, v in metadata.items():
        assert info.metadata[k] == str(v)


def test_key_service_refusals_carry_their_reasons(ks, ks_as):
    get = ks.GetKey
    expect_reason(refused(get, keyservice_pb2.GetKeyRequest()), CODE.INVALID_ARGUMENT, Reason.FIELD_REQUIRED)
    expect_reason(
        refused(get, keyservice_pb2.GetKeyRequest(key_id="AB" * 32)),
        CODE.INVALID_ARGUMENT,
        Reason.FIELD_INVALID,
        field="key_id",
    )
    expect_reason(refused(get, keyservice_pb2.GetKeyRequest(key_id="ab" * 32)), CODE.NOT_FOUND, Reason.KEY_NOT_FOUND)
    expect_reason(
        refused(ks_as["ledger"].Sign, keyservice_pb2.SignRequest(key_name="nobody", message=b"m")),
        CODE.NOT_FOUND,
        Reason.SIGNING_KEY_NOT_FOUND,
    )
    expect_reason(
        refused(ks_as["ledger"].Sign, keyservice_pb2.SignRequest(key_name="ledger", message=bytes(65 * 1024))),
        CODE.RESOURCE_EXHAUSTED,
        Reason.SIZE_LIMIT,
        field="message",
        limit=64 * 1024,
    )
    owner = Account.create()
    junk = keyservice_pb2.RegisterKeyRequest(public_key=os.urandom(100), owner=owner.address)
    key_id = hashlib.sha256(junk.public_key).hexdigest()
    ownerauth.sign_request(owner, 31337, f"{KEYSERVICE}/RegisterKey", key_id, junk)
    expect_reason(refused(ks.RegisterKey, junk), CODE.INVALID_ARGUMENT, Reason.HE_MATERIAL_INVALID)
    expect_reason(
        refused(ks_as["operator"].RotateSigningKey, keyservice_pb2.RotateSigningKeyRequest(key_name="bad name!")),
        CODE.INVALID_ARGUMENT,
        Reason.FIELD_INVALID,
        field="key_name",
    )


def test_a_one_mib_key_id_or_name_is_refused_with_a_bounded_message(ks, ks_as, rec, client):
    huge = "a" * MIB
    for call, request in [
        (ks.GetKey, keyservice_pb2.GetKeyRequest(key_id=huge)),
        (ks_as["recommender"].GetEvalKeys, keyservice_pb2.GetKeyRequest(key_id=huge)),
        (ks.DisableKey, keyservice_pb2.GetKeyRequest(key_id=huge)),
    ]:
        expect_reason(refused(call, request), CODE.INVALID_ARGUMENT, Reason.FIELD_INVALID, field="key_id")
    score = recommender_pb2.ScoreRequest(key=common_pb2.KeyRef(key_id=huge), query_ciphertext=b"q")
    expect_reason(refused(rec.Score, score), CODE.INVALID_ARGUMENT, Reason.FIELD_INVALID, field="key.key_id")
    err = refused(ks_as["ledger"].Sign, keyservice_pb2.SignRequest(key_name=huge, message=b"m"))
    expect_reason(err, CODE.INVALID_ARGUMENT, Reason.FIELD_INVALID, field="key_name")
    assert len(err.details()) < 200
    # Ids that are not validated by shape are still never echoed whole.
    err = refused(rec.GetItems, recommender_pb2.GetItemsRequest(item_ids=[huge]))
    expect_reason(err, CODE.NOT_FOUND, Reason.ITEM_NOT_FOUND)
    assert len(err.details()) < 200


def test_recommender_refusals_carry_their_reasons(rec, client, recommender):
    _, core = recommender
    key = common_pb2.KeyRef(key_id=client.key_id, version=client.key_version)
    query = client.encrypt_query(np.eye(64)[0])

    def signed(request):
        return client._authorize(RECOMMENDER, "Score", request.key.key_id, request)

    def score(**kw):
        return refused(rec.Score, signed(recommender_pb2.ScoreRequest(**{"key": key, **kw})))

    expect_reason(
        score(query_ciphertext=query, model_version="0" * 64),
        CODE.FAILED_PRECONDITION,
        Reason.MODEL_MISMATCH,
        serving_model=core.model_version,
    )
    expect_reason(score(query_ciphertext=b"garbage"), CODE.INVALID_ARGUMENT, Reason.HE_MATERIAL_INVALID)
    expect_reason(
        score(query_ciphertext=bytes(2 * MIB)),
        CODE.RESOURCE_EXHAUSTED,
        Reason.SIZE_LIMIT,
        field="query_ciphertext",
        limit=core.limits.max_query_bytes,
    )
    expect_reason(score(profile_ref="no-such-profile"), CODE.NOT_FOUND, Reason.PROFILE_NOT_FOUND)
    expect_reason(
        refused(
            rec.Score, recommender_pb2.ScoreRequest(key=common_pb2.KeyRef(key_id="ab" * 32), query_ciphertext=query)
        ),
        CODE.NOT_FOUND,
        Reason.KEY_NOT_FOUND,
    )
    expect_reason(
        refused(rec.Score, recommender_pb2.ScoreRequest(query_ciphertext=query)),
        CODE.INVALID_ARGUMENT,
        Reason.FIELD_REQUIRED,
        field="key.key_id",
    )
    expect_reason(
        score(query_ciphertext=query, key=common_pb2.KeyRef(key_id=client.key_id, version=99)),
        CODE.FAILED_PRECONDITION,
        Reason.KEY_VERSION_UNAVAILABLE,
    )
    get = rec.GetItems
    expect_reason(refused(get, recommender_pb2.GetItemsRequest(indices=[10**9])), CODE.NOT_FOUND, Reason.ITEM_NOT_FOUND)
    expect_reason(
        refused(get, recommender_pb2.GetItemsRequest(indices=list(range(1001)))),
        CODE.RESOURCE_EXHAUSTED,
        Reason.COUNT_LIMIT,
        limit=1000,
    )
    # ... and it keeps serving.
    ok = rec.Score(signed(recommender_pb2.ScoreRequest(key=key, query_ciphertext=query)), timeout=60)
    assert len(ok.score_ciphertexts) == core.scorer.block_count


def test_refusals_are_logged_once_each_and_rate_limited(ks, caplog, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(grpcutil, "refusals", grpcutil.RefusalLog(burst=5, per_second=1.0, clock=lambda: now[0]))
    request = keyservice_pb2.GetKeyRequest(key_id="cd" * 32)
    with caplog.at_level(logging.INFO, logger="cipherfeed.refused"):
        for _ in range(50):
            refused(ks.GetKey, request)
        lines = [r for r in caplog.records if r.name == "cipherfeed.refused"]
        assert len(lines) == 5  # the burst, then silence while the clock stands still
        assert all("KEY_NOT_FOUND" in r.getMessage() and "GetKey" in r.getMessage() for r in lines)
        now[0] += 2.0  # two tokens back
        for _ in range(3):
            refused(ks.GetKey, request)
        lines = [r for r in caplog.records if r.name == "cipherfeed.refused"]
        assert len(lines) == 7
        assert "+45 more KEY_NOT_FOUND" in lines[5].getMessage()
        refused(ks.GetKey, keyservice_pb2.GetKeyRequest())  # another reason has its own bucket
        lines = [r for r in caplog.records if r.name == "cipherfeed.refused"]
        assert len(lines) == 8 and "FIELD_REQUIRED" in lines[-1].getMessage()
    assert grpcutil.refusals.counts == {"KEY_NOT_FOUND": 53, "FIELD_REQUIRED": 1}


def test_echo_shortens_caller_input():
    assert errors.echo("abc") == "'abc'"
    shortened = errors.echo("z" * MIB)
    assert len(shortened) < 100 and shortened.endswith(f"({MIB} chars)")
