"""Secrets and artefacts are written whole or not at all, with their mode from the first byte."""

from __future__ import annotations

import os
import stat

import pytest

from cipherfeed import atomicfile
from cipherfeed.atomicfile import PRIVATE, PUBLIC, write_atomic
from cipherfeed.client import keystore


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_mode_is_exact_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        write_atomic(tmp_path / "secret", b"s")
        write_atomic(tmp_path / "public", b"p", PUBLIC)
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "secret") == PRIVATE
    assert mode_of(tmp_path / "public") == PUBLIC


def test_rewriting_a_world_readable_file_leaves_it_private(tmp_path):
    """O_CREAT would keep the old 0644: the secret is written to a new 0600 file instead."""
    path = tmp_path / "key"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and mode_of(path) == PRIVATE


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old model")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomicfile.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, b"new model" * 1000)
    assert path.read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_without_replace_an_existing_file_wins(tmp_path):
    path = tmp_path / "master.key"
    write_atomic(path, b"first", replace=False)
    with pytest.raises(FileExistsError):
        write_atomic(path, b"second", replace=False)
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["master.key"]


def test_missing_parent_directories_are_made(tmp_path):
    write_atomic(tmp_path / "a" / "b" / "c", b"x")
    assert (tmp_path / "a" / "b" / "c").read_bytes() == b"x"


def test_device_account_key_is_created_private_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        account = keystore.load_or_create_account(tmp_path / "device")
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "device" / keystore.ACCOUNT_FILE) == PRIVATE
    assert keystore.load_or_create_account(tmp_path / "device").address == account.address
