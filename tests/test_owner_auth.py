"""Owners of HE keys, over real gRPC: only the key's Ethereum account (by an EIP-712 signature over
the request, or a SIWE session token) may change, read the audit of, or score with its key."""

import hashlib
import time

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data

from cipherfeed import ownerauth, siwe
from cipherfeed.client import keystore
from cipherfeed.client.sdk import KEYSERVICE, RECOMMENDER
from cipherfeed.grpcutil import reason_of
from cipherfeed.v1 import common_pb2, keyservice_pb2, keyservice_pb2_grpc, recommender_pb2
from tests.conftest import client_for

STATUS = grpc.StatusCode
CHAIN = 31337


@pytest.fixture()
def owner(recommender, keyservice, tmp_path):
    c = client_for(recommender[0], keyservice[0], tmp_path / "owner")
    c.use_keys()
    c.register()
    yield c
    c.close()


@pytest.fixture(scope="module")
def attacker():
    return Account.create()


def refused(fn, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


def expect(code, fn, *args, match="", **kwargs):
    err = refused(fn, *args, **kwargs)
    assert err.code() == code, (err.code(), err.details())
    assert match in (err.details() or ""), err.details()
    return err


def signed(account, service, method, key_id, request, chain_id=CHAIN, lifetime=120):
    ownerauth.sign_request(account, chain_id, f"{service}/{method}", key_id, request, lifetime)
    return request


def state_request(key_id):
    return keyservice_pb2.KeyStateRequest(key_id=key_id)


def score_request(client):
    query = client.encrypt_query(keystore_unit())
    return recommender_pb2.ScoreRequest(key=client._key_ref(), query_ciphertext=query)


def keystore_unit():
    import numpy as np

    u = np.ones(64)
    return u / np.linalg.norm(u)


def state_of(client):
    return client.keyservice.GetKey(keyservice_pb2.GetKeyRequest(key_id=client.key_id), timeout=5).state


def test_anonymous_caller_with_only_a_key_id_cannot_touch_the_key(owner, attacker, tmp_path):
    """The attack from the issue: a key id alone disabled, rotated and destroyed a user's key."""
    ks, key_id = owner.keyservice, owner.key_id
    other = keystore.load_test_keys(owner.keys)
    rotate = keyservice_pb2.RotateKeyRequest(
        key_id=key_id, public_key=other.public_key_bytes, rotation_key_map=other.rotation_key_bytes, min_version=2
    )
    for method, request in (
        ("DisableKey", state_request(key_id)),
        ("DestroyKey", state_request(key_id)),
        ("EnableKey", state_request(key_id)),
        ("RotateKey", rotate),
    ):
        expect(STATUS.UNAUTHENTICATED, getattr(ks, method), request, timeout=30, match="authorization")
        forged = type(request)()
        forged.CopyFrom(request)
        signed(attacker, KEYSERVICE, method, key_id, forged)  # a valid signature, by someone else
        expect(STATUS.PERMISSION_DENIED, getattr(ks, method), forged, timeout=30, match="does not own")
    expect(STATUS.INVALID_ARGUMENT, ks.ListAudit, keyservice_pb2.ListAuditRequest(), timeout=5, match="operators")
    audit = signed(attacker, KEYSERVICE, "ListAudit", key_id, keyservice_pb2.ListAuditRequest(key_id=key_id))
    expect(STATUS.PERMISSION_DENIED, ks.ListAudit, audit, timeout=5)
    expect(STATUS.UNAUTHENTICATED, owner.stub.Score, score_request(owner), timeout=30)
    theirs = signed(attacker, RECOMMENDER, "Score", key_id, score_request(owner))
    expect(STATUS.PERMISSION_DENIED, owner.stub.Score, theirs, timeout=30)
    upload = recommender_pb2.UploadProfileRequest(key=owner._key_ref(), query_ciphertext=b"x")
    expect(STATUS.UNAUTHENTICATED, owner.stub.UploadProfile, upload, timeout=30)

    record = ks.GetKey(keyservice_pb2.GetKeyRequest(key_id=key_id), timeout=5)
    assert record.state == keyservice_pb2.ENABLED and record.key.version == 1
    assert record.owner == owner.account.address
    assert owner.score(keystore_unit()).scores.size  # the owner is unaffected
    assert [e.action for e in owner.audit()] == ["key.register"]
    # The owner can do all of it, and the audit says who did.
    owner.disable()
    owner.enable()
    entries = owner.audit()
    assert [e.action for e in entries] == ["key.register", "key.disabled", "key.enabled"]
    assert all(f'"by": "{owner.account.address}"' in e.detail for e in entries)


def test_a_tampered_request_or_another_method_is_refused(owner):
    ks, key_id = owner.keyservice, owner.key_id
    other = keystore.load_test_keys(owner.keys)
    rotate = keyservice_pb2.RotateKeyRequest(
        key_id=key_id, public_key=other.public_key_bytes, rotation_key_map=other.rotation_key_bytes
    )
    signed(owner.account, KEYSERVICE, "RotateKey", key_id, rotate)
    rotate.min_version = 2  # changed after signing: the digest no longer matches
    expect(STATUS.UNAUTHENTICATED, ks.RotateKey, rotate, timeout=30, match="does not match")
    disable = signed(owner.account, KEYSERVICE, "DisableKey", key_id, state_request(key_id))
    destroy = keyservice_pb2.KeyStateRequest(key_id=key_id, auth=disable.auth)  # same bytes, other method
    expect(STATUS.UNAUTHENTICATED, ks.DestroyKey, destroy, timeout=5, match="does not match")
    query = score_request(owner)
    signed(owner.account, RECOMMENDER, "Score", key_id, query)
    query.query_ciphertext = owner.encrypt_query(keystore_unit())  # another query under the signature
    expect(STATUS.UNAUTHENTICATED, owner.stub.Score, query, timeout=30)
    claimed = signed(owner.account, KEYSERVICE, "DisableKey", key_id, state_request(key_id))
    claimed.auth.signature.signer = Account.create().address  # the signature is not that signer's
    expect(STATUS.UNAUTHENTICATED, ks.DisableKey, claimed, timeout=5)
    assert state_of(owner) == keyservice_pb2.ENABLED


def test_a_replayed_signature_is_refused(owner):
    ks, key_id = owner.keyservice, owner.key_id
    disable = signed(owner.account, KEYSERVICE, "DisableKey", key_id, state_request(key_id))
    ks.DisableKey(disable, timeout=5)
    owner.enable()
    expect(STATUS.UNAUTHENTICATED, ks.DisableKey, disable, timeout=5, match="already used")
    assert state_of(owner) == keyservice_pb2.ENABLED
    score = signed(owner.account, RECOMMENDER, "Score", key_id, score_request(owner))
    assert owner.stub.Score(score, timeout=30).score_ciphertexts
    expect(STATUS.UNAUTHENTICATED, owner.stub.Score, score, timeout=30, match="already used")


def test_expired_and_far_future_signatures_are_refused(owner):
    ks, key_id = owner.keyservice, owner.key_id
    stale = signed(owner.account, KEYSERVICE, "DisableKey", key_id, state_request(key_id), lifetime=-1)
    expect(STATUS.UNAUTHENTICATED, ks.DisableKey, stale, timeout=5, match="expired")
    far = signed(owner.account, KEYSERVICE, "DisableKey", key_id, state_request(key_id), lifetime=10**6)
    expect(STATUS.UNAUTHENTICATED, ks.DisableKey, far, timeout=5, match="ahead")
    stale_score = signed(owner.account, RECOMMENDER, "Score", key_id, score_request(owner), lifetime=-1)
    expect(STATUS.UNAUTHENTICATED, owner.stub.Score, stale_score, timeout=30, match="expired")
    assert state_of(owner) == keyservice_pb2.ENABLED


def test_a_signature_in_another_eip712_domain_is_refused(owner):
    ks, key_id = owner.keyservice, owner.key_id
    other_chain = signed(owner.account, KEYSERVICE, "DisableKey", key_id, state_request(key_id), chain_id=1)
    expect(STATUS.UNAUTHENTICATED, ks.DisableKey, other_chain, timeout=5)
    request = state_request(key_id)
    nonce, expires = b"\x07" * 32, int(time.time()) + 60
    data = ownerauth.typed_data(
        CHAIN, f"{KEYSERVICE}/DisableKey", key_id, ownerauth.request_digest(request), nonce, expires
    )
    data["domain"] = {**data["domain"], "name": "another-app"}
    signature = owner.account.sign_message(encode_typed_data(full_message=data)).signature
    request.auth.signature.CopyFrom(
        common_pb2.Eip712Signature(
            signer=owner.account.address, nonce=nonce, expires_unix=expires, signature=bytes(signature)
        )
    )
    expect(STATUS.UNAUTHENTICATED, ks.DisableKey, request, timeout=5)
    # The same fields in the right domain are accepted: only the domain was wrong.
    data["domain"]["name"] = "cipherfeed"
    request.auth.signature.signature = bytes(owner.account.sign_message(encode_typed_data(full_message=data)).signature)
    assert ks.DisableKey(request, timeout=5).state == keyservice_pb2.DISABLED
    owner.enable()


def test_registration_proves_possession_of_the_owner_account(owner, attacker, keyservice):
    ks = owner.keyservice
    keys = keystore.load_test_keys(owner.keys)
    key_id = hashlib.sha256(keys.public_key_bytes).hexdigest()

    def request(owner_address):
        return keyservice_pb2.RegisterKeyRequest(
            public_key=keys.public_key_bytes, rotation_key_map=keys.rotation_key_bytes, owner=owner_address
        )

    expect(STATUS.INVALID_ARGUMENT, ks.RegisterKey, request(""), timeout=60, match="owner")
    expect(STATUS.UNAUTHENTICATED, ks.RegisterKey, request(owner.account.address), timeout=60)
    # Someone registering a key in another's name: their signature does not make them that owner.
    victim = signed(attacker, KEYSERVICE, "RegisterKey", key_id, request(owner.account.address))
    expect(STATUS.PERMISSION_DENIED, ks.RegisterKey, victim, timeout=60)
    assert keyservice[1].store.key(key_id) is None


def test_sign_in_with_ethereum_gives_a_session_for_the_owner_only(owner, attacker, keyservice):
    token = owner.sign_in()
    assert owner.session.address == owner.account.address and owner.session.audience == "cipherfeed"
    owner.disable()  # these now carry the token, not a signature
    owner.enable()
    assert owner.score(keystore_unit()).scores.size
    request = keyservice_pb2.KeyStateRequest(key_id=owner.key_id)
    request.auth.session_token = token
    assert owner.keyservice.DisableKey(request, timeout=5).state == keyservice_pb2.DISABLED
    owner.enable()
    # Another account's session does not own this key.
    other = client_for(0, keyservice[0], owner.config.home / "other")
    other.account = attacker
    theirs = other.sign_in()
    other.close()
    request.auth.session_token = theirs
    expect(STATUS.PERMISSION_DENIED, owner.keyservice.DisableKey, request, timeout=5)
    score = score_request(owner)
    score.auth.session_token = theirs
    expect(STATUS.PERMISSION_DENIED, owner.stub.Score, score, timeout=30)


def test_forged_and_expired_session_tokens_are_refused(owner, keyservice, pki):
    _, core = keyservice
    real = owner.sign_in()
    owner.session = None  # sign each request; the tokens below are sent by hand
    prefix, _, signature = real.split(".")
    claims = ownerauth.SessionClaims(Account.create().address, "cipherfeed", int(time.time()), 2**40, 1, "x")
    swapped = f"{prefix}.{ownerauth._b64(claims.payload())}.{signature}"  # someone else's claims
    stranger = Ed25519PrivateKey.generate()
    mine = ownerauth.SessionClaims(owner.account.address, "cipherfeed", int(time.time()), 2**40, 1, "y")
    self_signed = ownerauth.encode_session(mine, stranger.sign(ownerauth.session_signing_input(mine)))
    current = core.store.signing_keys("session")[-1]
    expired = ownerauth.SessionClaims(
        owner.account.address, "cipherfeed", int(time.time()) - 60, int(time.time()) - 1, current.version, "z"
    )
    expired_token = ownerauth.encode_session(
        expired, core._sign_with(current, ownerauth.session_signing_input(expired))
    )
    wrong_audience = ownerauth.SessionClaims(
        owner.account.address, "elsewhere", int(time.time()), int(time.time()) + 60, current.version, "w"
    )
    elsewhere = ownerauth.encode_session(
        wrong_audience, core._sign_with(current, ownerauth.session_signing_input(wrong_audience))
    )
    for token, why in (
        (swapped, "invalid"),
        (self_signed, "invalid"),
        (expired_token, "expired"),
        (elsewhere, "not 'cipherfeed'"),
        ("cfs1.garbage", "malformed"),
        ("x" * 5000, "too long"),
    ):
        request = keyservice_pb2.KeyStateRequest(key_id=owner.key_id)
        request.auth.session_token = token
        expect(STATUS.UNAUTHENTICATED, owner.keyservice.DisableKey, request, timeout=5, match=why)
        score = score_request(owner)
        score.auth.session_token = token
        expect(STATUS.UNAUTHENTICATED, owner.stub.Score, score, timeout=30, match=why)
    assert state_of(owner) == keyservice_pb2.ENABLED
    # Not even the ledger, which may Sign, gets the key service to sign with its session key.
    sign = keyservice_pb2.SignRequest(key_name="session", message=mine.payload())
    with pki.channel(keyservice[0], "keyservice", "ledger") as ch:
        err = expect(STATUS.PERMISSION_DENIED, keyservice_pb2_grpc.KeyServiceStub(ch).Sign, sign, timeout=5)
    assert reason_of(err) == "RESERVED_SIGNING_KEY"


def test_sign_in_messages_are_checked_strictly(owner):
    ks, account = owner.keyservice, owner.account

    def attempt(**changes):
        challenge = ks.GetSignInNonce(keyservice_pb2.GetSignInNonceRequest(), timeout=5)
        now = time.time()
        fields = dict(
            domain=challenge.domain,
            address=account.address,
            statement="Sign in",
            uri=challenge.uri,
            chain_id=challenge.chain_id,
            nonce=challenge.nonce,
            issued_at=siwe.format_time(_utc(now)),
            expiration_time=siwe.format_time(_utc(now + 300)),
        )
        signer = changes.pop("signer", account)
        fields.update(changes)
        text = siwe.SiweMessage(**fields).text()
        signature = bytes(signer.sign_message(encode_defunct(text=text)).signature)
        return keyservice_pb2.SignInRequest(message=text, signature=signature)

    good = attempt()
    assert ks.SignIn(good, timeout=5).address == account.address
    expect(STATUS.UNAUTHENTICATED, ks.SignIn, good, timeout=5, match="already used")
    for changes, why in (
        (dict(domain="evil.example"), "domain"),
        (dict(uri="https://evil.example"), "URI"),
        (dict(chain_id=1), "chain"),
        (dict(nonce="abcdefgh12345678"), "not issued"),
        (dict(expiration_time=siwe.format_time(_utc(time.time() - 5))), "expired"),
        (dict(expiration_time=None), "Expiration Time"),
        (dict(issued_at=siwe.format_time(_utc(time.time() + 3600))), "future"),
        (dict(signer=Account.create()), "not by the message's address"),
    ):
        expect(STATUS.UNAUTHENTICATED, ks.SignIn, attempt(**changes), timeout=5, match=why)
    bad = attempt()
    bad.message = bad.message.replace("Version: 1", "Version: 2")
    expect(STATUS.UNAUTHENTICATED, ks.SignIn, bad, timeout=5, match="version")


def _utc(t):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, timezone.utc)


def test_the_device_keeps_its_account_key_private_beside_the_he_key(owner):
    directory = owner.config.home / "keys"
    path = directory / keystore.ACCOUNT_FILE
    assert path.stat().st_mode & 0o777 == 0o600 and directory.stat().st_mode & 0o777 == 0o700
    assert keystore.load_or_create_account(directory).address == owner.account.address  # stable
    path.chmod(0o644)
    with pytest.raises(keystore.KeyStoreError, match="readable by others"):
        keystore.load_or_create_account(directory)
    path.chmod(0o600)
    secret = owner.account.key.hex().removeprefix("0x")
    assert secret not in repr(owner.account) and secret not in str(owner.keyservice)


def test_spent_nonces_survive_a_key_service_restart_and_expire(tmp_path):
    from services.keyservice.store import KeyStore

    dsn = f"sqlite:///{tmp_path / 'ks.db'}"
    store = KeyStore(dsn)
    now = int(time.time())
    assert store.claim_nonce("0xA", b"n" * 32, now + 60, max_rows=10)
    assert not store.claim_nonce("0xA", b"n" * 32, now + 60, max_rows=10)
    assert store.claim_nonce("0xB", b"n" * 32, now + 60, max_rows=10)  # nonces are per signer
    assert store.claim_nonce("0xA", b"old" * 8, now - 1, max_rows=10)  # recorded, already expired
    store.close()
    store = KeyStore(dsn)  # a restart
    assert not store.claim_nonce("0xA", b"n" * 32, now + 60, max_rows=10)  # still a replay
    assert store.db.query("SELECT COUNT(*) FROM owner_nonces WHERE expires_unix < ?", (now,))[0][0] == 0
    store.close()


def test_nonce_stores_refuse_rather_than_forget_when_full(tmp_path):
    from cipherfeed.errors import ResourceExhausted
    from services.keyservice.store import KeyStore

    clock = [1000.0]
    memory = ownerauth.MemoryNonceStore(2, clock=lambda: clock[0])
    assert memory.claim("a", b"1", 1010) and memory.claim("a", b"2", 1010)
    with pytest.raises(ResourceExhausted):
        memory.claim("a", b"3", 1010)
    assert not memory.claim("a", b"1", 1010)  # full or not, a replay is a replay
    clock[0] = 1011.0  # both expired: room again
    assert memory.claim("a", b"3", 1020) and len(memory) == 1
    store = KeyStore(f"sqlite:///{tmp_path / 'ks.db'}")
    now = int(time.time())
    assert store.claim_nonce("a", b"1", now + 60, max_rows=1)
    with pytest.raises(ResourceExhausted):
        store.claim_nonce("a", b"2", now + 60, max_rows=1)
    assert store.claim_nonce("a", b"2", now + 60, max_rows=2)  # the refused one was not recorded
    store.close()
