"""The key service on its own: registration, signing keys, audit, durability, secrets at rest."""

import hashlib
import os
import signal
import subprocess
import sys

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from eth_account import Account

from cipherfeed import ownerauth
from cipherfeed.client import keystore
from cipherfeed.config import REPO_ROOT
from cipherfeed.devprocess import start_service
from cipherfeed.devredis import free_port
from cipherfeed.he.keymap import KeyMaterial
from cipherfeed.he.params import MESH_PARAMS
from cipherfeed.v1 import keyservice_pb2, keyservice_pb2_grpc
from services.keyservice.envelope import EnvelopeError, MasterKey
from tests.conftest import mesh_pki


def keyservice_as(port: int, identity: str) -> keyservice_pb2_grpc.KeyServiceStub:
    return keyservice_pb2_grpc.KeyServiceStub(mesh_pki().channel(port, "keyservice", identity))


@pytest.fixture(scope="module")
def ks(keyservice):
    with mesh_pki().channel(keyservice[0], "keyservice", "device") as ch:
        yield keyservice_pb2_grpc.KeyServiceStub(ch)


@pytest.fixture(scope="module")
def ks_ledger(keyservice):
    return keyservice_as(keyservice[0], "ledger")


@pytest.fixture(scope="module")
def ks_operator(keyservice):
    return keyservice_as(keyservice[0], "operator")


@pytest.fixture(scope="module")
def material():
    keys = keystore.generate(MESH_PARAMS)
    return keys.public_key_bytes, keys.rotation_key_bytes


OWNER = Account.create()
KEYSERVICE = "cipherfeed.v1.KeyService"


def signed(method, key_id, request, account=OWNER):
    """``request`` with the owner's EIP-712 signature for ``method`` on ``key_id``."""
    ownerauth.sign_request(account, 31337, f"{KEYSERVICE}/{method}", key_id, request)
    return request


def register(ks, public_key, rotation_keys):
    request = keyservice_pb2.RegisterKeyRequest(
        public_key=public_key, rotation_key_map=rotation_keys, owner=OWNER.address
    )
    return ks.RegisterKey(signed("RegisterKey", hashlib.sha256(public_key).hexdigest(), request), timeout=60)


def set_state(ks, method, key_id):
    return getattr(ks, method)(signed(method, key_id, keyservice_pb2.KeyStateRequest(key_id=key_id)), timeout=5)


def test_register_is_idempotent_and_conflicts_are_refused(ks, material):
    pk, rk = material
    first = register(ks, pk, rk)
    assert first.state == keyservice_pb2.ENABLED and first.key.version == 1
    assert first.versions[0].material_sha256 == KeyMaterial(pk, rk).sha256
    again = register(ks, pk, rk)
    assert again.key.key_id == first.key.key_id
    other = keystore.generate(MESH_PARAMS)
    with pytest.raises(grpc.RpcError) as info:
        register(ks, pk, other.rotation_key_bytes)  # same public key, other rotation keys
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as info:
        ks.GetKey(keyservice_pb2.GetKeyRequest(key_id="ff" * 32), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_signing_keys_sign_verify_and_rotate(ks, ks_ledger, ks_operator):
    message = b"checkpoint body"
    signed = ks_ledger.Sign(keyservice_pb2.SignRequest(key_name="ledger", message=message), timeout=5)
    keys = {
        (k.key_name, k.key_version): k for k in ks.GetPublicKeys(keyservice_pb2.GetPublicKeysRequest(), timeout=5).keys
    }
    old = keys[("ledger", signed.key_version)]
    Ed25519PublicKey.from_public_bytes(old.ed25519_public_key).verify(signed.signature, message)
    rotated = ks_operator.RotateSigningKey(keyservice_pb2.RotateSigningKeyRequest(key_name="ledger"), timeout=5)
    assert rotated.key_version == signed.key_version + 1 and rotated.current
    signed2 = ks_ledger.Sign(keyservice_pb2.SignRequest(key_name="ledger", message=message), timeout=5)
    assert signed2.key_version == rotated.key_version
    Ed25519PublicKey.from_public_bytes(rotated.ed25519_public_key).verify(signed2.signature, message)
    listed = ks.GetPublicKeys(keyservice_pb2.GetPublicKeysRequest(), timeout=5).keys
    assert [k.current for k in listed if k.key_name == "ledger"][-1] is True
    assert sum(k.current for k in listed if k.key_name == "ledger") == 1
    for bad, code in (("nope", grpc.StatusCode.NOT_FOUND),):
        with pytest.raises(grpc.RpcError) as info:
            ks_ledger.Sign(keyservice_pb2.SignRequest(key_name=bad, message=b"x"), timeout=5)
        assert info.value.code() == code
    with pytest.raises(grpc.RpcError) as info:
        ks_ledger.Sign(keyservice_pb2.SignRequest(key_name="ledger", message=b"x" * (64 * 1024 + 1)), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_audit_records_every_change_and_no_key_material(ks, material, keyservice):
    pk, rk = material
    record = register(ks, pk, rk)
    set_state(ks, "DisableKey", record.key.key_id)
    set_state(ks, "EnableKey", record.key.key_id)
    audit = keyservice_pb2.ListAuditRequest(limit=1000, key_id=record.key.key_id)
    entries = ks.ListAudit(signed("ListAudit", record.key.key_id, audit), timeout=5).entries
    mine = [e.action for e in entries if e.subject == record.key.key_id]
    assert mine[:1] == ["key.register"] and mine[-2:] == ["key.disabled", "key.enabled"]
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)
    text = "".join(e.detail + e.subject for e in entries)
    assert pk[600:632].hex() not in text and rk[700:732].hex() not in text
    _, core = keyservice
    with pytest.raises(Exception, match="append-only"), core.store.transaction() as db:
        db.execute("DELETE FROM audit")
    with pytest.raises(Exception, match="append-only"), core.store.transaction() as db:
        db.execute("UPDATE audit SET action = 'x'")


def test_store_file_holds_no_plaintext_private_key(keyservice, master_key_file):
    _, core = keyservice
    master = MasterKey(master_key_file.read_bytes())
    raw_files = b"".join(p.read_bytes() for p in core.store.path.parent.glob(core.store.path.name + "*"))
    rows = core.store.signing_keys()
    assert rows
    for row in rows:
        private = master.unwrap(row.wrapped_private_key, f"signing-key|{row.name}|{row.version}".encode())
        assert len(private) == 32
        assert private not in raw_files
    # A blob moved to another row, or opened with another master key, does not open.
    with pytest.raises(EnvelopeError):
        master.unwrap(rows[0].wrapped_private_key, b"signing-key|other|1")
    with pytest.raises(EnvelopeError):
        MasterKey(os.urandom(32)).unwrap(
            rows[0].wrapped_private_key, f"signing-key|{rows[0].name}|{rows[0].version}".encode()
        )


def run_keyservice(tmp_path, port, master_key_file):
    return start_service(
        "services.keyservice.server",
        {
            "CIPHERFEED_KEYSERVICE_LISTEN": f"127.0.0.1:{port}",
            "CIPHERFEED_KEYSERVICE_DSN": f"sqlite:///{tmp_path / 'ks.db'}",
            "CIPHERFEED_MASTER_KEY_FILE": str(master_key_file),
            "CIPHERFEED_STATE_DIR": str(tmp_path),
            "CIPHERFEED_REDIS_URL": "",
            **mesh_pki().env("keyservice"),
        },
    )


def test_restart_after_a_crash_loses_nothing(tmp_path, master_key_file, material):
    port = free_port()
    proc = run_keyservice(tmp_path, port, master_key_file)
    try:
        with mesh_pki().channel(port, "keyservice", "device") as ch:
            stub = keyservice_pb2_grpc.KeyServiceStub(ch)
            record = register(stub, *material)
            set_state(stub, "DisableKey", record.key.key_id)
            public = stub.GetPublicKeys(keyservice_pb2.GetPublicKeysRequest(), timeout=5)
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash, not a clean shutdown
        proc.wait(timeout=10)
    proc = run_keyservice(tmp_path, port, master_key_file)
    try:
        with (
            mesh_pki().channel(port, "keyservice", "device") as ch,
            mesh_pki().channel(port, "keyservice", "recommender") as rec_ch,
            mesh_pki().channel(port, "keyservice", "ledger") as ledger_ch,
        ):
            stub = keyservice_pb2_grpc.KeyServiceStub(ch)
            again = stub.GetKey(keyservice_pb2.GetKeyRequest(key_id=record.key.key_id), timeout=5)
            assert again.state == keyservice_pb2.DISABLED
            assert again.versions[0].material_sha256 == KeyMaterial(*material).sha256
            set_state(stub, "EnableKey", record.key.key_id)
            as_recommender = keyservice_pb2_grpc.KeyServiceStub(rec_ch)
            keys = as_recommender.GetEvalKeys(keyservice_pb2.GetKeyRequest(key_id=record.key.key_id), timeout=30)
            assert (keys.public_key, keys.rotation_key_map) == material
            assert stub.GetPublicKeys(keyservice_pb2.GetPublicKeysRequest(), timeout=5) == public
            signed = keyservice_pb2_grpc.KeyServiceStub(ledger_ch).Sign(
                keyservice_pb2.SignRequest(key_name="ledger", message=b"m"), timeout=5
            )
            ledger_key = [k for k in public.keys if k.key_name == "ledger"][-1]
            Ed25519PublicKey.from_public_bytes(ledger_key.ed25519_public_key).verify(signed.signature, b"m")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_unsupported_or_unreachable_databases_fail_clearly(tmp_path):
    for dsn, message in (
        ("mysql://db/keys", "expected sqlite:///<path> or postgresql://"),
        ("postgresql://user:secret@127.0.0.1:1/keys", "cannot reach the database at 127.0.0.1:1/keys"),
    ):
        env = {**os.environ, "CIPHERFEED_KEYSERVICE_DSN": dsn, "CIPHERFEED_STATE_DIR": str(tmp_path)}
        done = subprocess.run(
            [sys.executable, "-m", "services.keyservice.server"], cwd=REPO_ROOT, env=env,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 2 and message in done.stderr, done.stderr[-500:]
        assert "secret" not in done.stderr
