"""The offline integrity checks the fault tests rely on find what they are there to find: a
tampered leaf, a checkpoint whose root or note is not the tree's, a leaf logged twice, an anchor
of another root; a key version whose material is not its digest, a signing key whose envelope
does not open or belongs to another public key."""

import os
import sqlite3
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cipherfeed.checkpoint import Verifier
from cipherfeed.he.keymap import KeyMaterial
from services.keyservice.core import _signing_context
from services.keyservice.envelope import MasterKey
from services.keyservice.integrity import check_key_store
from services.keyservice.store import KeyStore
from services.ledger.integrity import check_store, unique_leaves
from services.ledger.server import build_core
from services.ledger.signers import LocalSigner
from services.ledger.store import LedgerStore
from tests.test_ledger import ORIGIN, ledger_config


@pytest.fixture
def ledger_db(tmp_path):
    signer = LocalSigner(ORIGIN)
    core = build_core(ledger_config(tmp_path), signer, anchoring=False)
    try:
        core.log.append_many([b"one", b"two", b"three"])
        core.log.checkpoint()
        core.log.append_many([b"four", b"five"])
        core.log.checkpoint()
    finally:
        core.close()
    return tmp_path / "ledger.db", [Verifier(ORIGIN, k) for k in signer.public_keys()]


def report_of(path, verifiers):
    store = LedgerStore(f"sqlite:///{path}", serving=False)
    try:
        return check_store(store, verifiers, ORIGIN)
    finally:
        store.close()


def tamper(path, sql, params=()):
    db = sqlite3.connect(path)
    with db:
        db.execute(sql, params)
    db.close()


def test_an_untouched_ledger_passes(ledger_db):
    path, verifiers = ledger_db
    report = report_of(path, verifiers)
    assert report.ok, report.problems
    assert (report.leaves, report.checkpoints, report.anchors_pending) == (5, 2, 2)


@pytest.mark.parametrize(
    ("sql", "params", "found"),
    [
        ("UPDATE leaves SET data = ? WHERE idx = 1", (b"tw0",), "stored hash is not the hash of its data"),
        ("UPDATE checkpoints SET root = ? WHERE size = 3", (b"\0" * 32,), "checkpoint 3"),
        ("UPDATE anchors SET root = ? WHERE size = 5", (b"\1" * 32,), "anchor 5"),
        ("DELETE FROM leaves WHERE idx = 2", (), "leaf index"),
        ("UPDATE checkpoints SET note = replace(note, 'cipherfeed', 'c1pherfeed') WHERE size = 5", (), "note"),
    ],
)
def test_each_kind_of_tampering_is_reported(ledger_db, sql, params, found):
    path, verifiers = ledger_db
    tamper(path, sql, params)
    report = report_of(path, verifiers)
    assert not report.ok and any(found in p for p in report.problems), report.problems


def test_a_leaf_logged_twice_is_reported_and_counted(ledger_db):
    path, verifiers = ledger_db
    db = sqlite3.connect(path)
    with db:
        h, d = db.execute("SELECT hash, data FROM leaves WHERE idx = 0").fetchone()
        db.execute("INSERT INTO leaves (idx, hash, data) VALUES (5, ?, ?)", (h, d))
    db.close()
    report = report_of(path, verifiers)
    assert any("logged twice" in p for p in report.problems)
    store = LedgerStore(f"sqlite:///{path}", serving=False)
    try:
        assert unique_leaves(store, [bytes(h)]) == {bytes(h): 2}
    finally:
        store.close()


def key_store_with_records(tmp_path):
    master = MasterKey(os.urandom(32))
    store = KeyStore(f"sqlite:///{tmp_path / 'keyservice.db'}")
    material = KeyMaterial(b"public key bytes", os.urandom(256))
    private = Ed25519PrivateKey.generate()
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    now = int(time.time())
    with store.transaction() as db:
        db.execute(
            "INSERT INTO he_keys (key_id, state, current_version, min_version, created_unix, updated_unix)"
            " VALUES ('k1', 'ENABLED', 1, 1, ?, ?)",
            (now, now),
        )
        store.insert_version(db, "k1", 1, material, now)
        db.execute(
            "INSERT INTO signing_keys (name, version, public_key, wrapped_private_key, created_unix)"
            " VALUES ('ledger', 1, ?, ?, ?)",
            (public, master.wrap(raw, _signing_context("ledger", 1)), now),
        )
    return store, master


def test_key_store_records_are_checked_under_the_master_key(tmp_path):
    store, master = key_store_with_records(tmp_path)
    try:
        assert check_key_store(store, master).ok
        assert not check_key_store(store, MasterKey(os.urandom(32))).ok  # another master key: no MAC opens
        with store.transaction() as db:
            db.execute("UPDATE he_key_versions SET rotation_keys = ? WHERE key_id = 'k1'", (os.urandom(256),))
            db.execute("UPDATE signing_keys SET public_key = ? WHERE name = 'ledger'", (os.urandom(32),))
        problems = check_key_store(store, master).problems
    finally:
        store.close()
    assert any("does not match its digest" in p for p in problems)
    assert any("not its own" in p for p in problems)
