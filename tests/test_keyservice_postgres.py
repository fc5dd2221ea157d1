"""The key service on a server database: a real PostgreSQL (the pgserver wheel's binaries)."""

from pathlib import Path

import pytest

from cipherfeed.client import keystore
from cipherfeed.config import KeyServiceConfig, RedisConfig
from cipherfeed.devprocess import start_service
from cipherfeed.devredis import free_port
from cipherfeed.he.keymap import KeyMaterial
from cipherfeed.he.params import MESH_PARAMS
from cipherfeed.keystate import KeyState, KeyStateError
from cipherfeed.v1 import keyservice_pb2, keyservice_pb2_grpc
from services.keyservice.envelope import MasterKey
from services.keyservice.server import build_core
from tests.conftest import TEST_LIMITS, mesh_pki

OWNER = "0x" + "ab" * 20  # an owner address; these changes go through the core, not the servicer


def config_for(uri: str, state_dir: Path, master_key_file: Path) -> KeyServiceConfig:
    return KeyServiceConfig(
        listen="127.0.0.1:0", dsn=uri, master_key_file=master_key_file, state_dir=state_dir, limits=TEST_LIMITS,
        redis=RedisConfig(), tls=mesh_pki().tls("keyservice"),
    )  # fmt: skip


def test_lifecycle_audit_and_restart_on_postgresql(postgres, master_key_file, tmp_path):
    server, datadir = postgres
    uri = server.get_uri()
    keys = keystore.generate(MESH_PARAMS)
    material = KeyMaterial(keys.public_key_bytes, keys.rotation_key_bytes)
    core = build_core(config_for(uri, tmp_path, master_key_file))
    try:
        row = core.register(material, OWNER)
        assert core.register(material, OWNER).key_id == row.key_id  # idempotent
        core.rotate(
            row.key_id,
            KeyMaterial(*(lambda k: (k.public_key_bytes, k.rotation_key_bytes))(keystore.generate(MESH_PARAMS))),
            0,
            OWNER,
        )
        core.set_state(row.key_id, KeyState.DISABLED, OWNER)
        with pytest.raises(KeyStateError):
            core.eval_keys(row.key_id, 0)
        core.set_state(row.key_id, KeyState.ENABLED, OWNER)
        version, got = core.eval_keys(row.key_id, 1)
        assert (version, got) == (1, material)
        signed_version, _ = core.sign("ledger", b"m")
        with pytest.raises(Exception, match="append-only"), core.store.transaction() as db:
            db.execute("DELETE FROM audit")
        with pytest.raises(Exception, match="append-only"), core.store.transaction() as db:
            db.execute("UPDATE audit SET action = ?", ("x",))
        actions = [e.action for e in core.store.audit_entries(0, 1000) if e.subject == row.key_id]
        assert actions == ["key.register", "key.rotate", "key.disabled", "key.enabled"]
        core.set_state(row.key_id, KeyState.DESTROYED, OWNER)
        assert core.store.material(row.key_id, 1) is None
    finally:
        core.close()
    again = build_core(config_for(uri, tmp_path, master_key_file))  # a restart: a new process's view
    try:
        record = again.get(row.key_id)
        assert record.state is KeyState.DESTROYED and [v.version for v in record.versions] == [1, 2]
        assert again.sign("ledger", b"m")[0] == signed_version
        # No plaintext private key anywhere in the database's files, once flushed.
        server.psql("CHECKPOINT;")
        master = MasterKey(master_key_file.read_bytes())
        raw = b"".join(
            p.read_bytes() for p in Path(datadir).rglob("*") if p.is_file() and p.stat().st_size < 64 * 2**20
        )
        for signing in again.store.signing_keys():
            secret = master.unwrap(
                signing.wrapped_private_key, f"signing-key|{signing.name}|{signing.version}".encode()
            )
            assert secret not in raw
        # The destroyed rotation keys are gone from the table files (VACUUM FULL). PostgreSQL's
        # write-ahead log keeps inserted rows until it recycles its segments: acceptable for this
        # public material only; private keys (checked above, WAL included) are never in the clear.
        tables = b"".join(p.read_bytes() for p in Path(datadir).rglob("*") if p.is_file() and "pg_wal" not in p.parts)
        assert material.rotation_keys[1000:1064] not in tables
    finally:
        again.close()


def test_keyservice_process_on_a_postgresql_dsn(postgres, master_key_file, tmp_path):
    server, _ = postgres
    port = free_port()
    proc = start_service(
        "services.keyservice.server",
        {
            "CIPHERFEED_KEYSERVICE_LISTEN": f"127.0.0.1:{port}",
            "CIPHERFEED_KEYSERVICE_DSN": server.get_uri(),
            "CIPHERFEED_MASTER_KEY_FILE": str(master_key_file),
            "CIPHERFEED_STATE_DIR": str(tmp_path),
            "CIPHERFEED_REDIS_URL": "",
            **mesh_pki().env("keyservice"),
        },
    )
    try:
        with mesh_pki().channel(port, "keyservice", "device") as ch:
            keys = keyservice_pb2_grpc.KeyServiceStub(ch).GetPublicKeys(
                keyservice_pb2.GetPublicKeysRequest(), timeout=10
            )
            assert any(k.key_name == "ledger" for k in keys.keys)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
