"""A removal decided earlier never deletes a newer install of the same user's keys.

The recommender's eviction drops a tag from its LRU, then waits for the write lock while scorings
hold the read lock; the same user's keys can be installed again in that gap. The removal is held
back here exactly there (between the LRU and OpenFHE's map) and released after the new install.
"""

import numpy as np
import openfhe
import pytest

from cipherfeed.client import keystore
from cipherfeed.he import globalkeys, keymap
from cipherfeed.he.codec import MaterialCodec
from cipherfeed.he.params import MESH_PARAMS
from services.recommender.evalkeys import InstalledKeys


@pytest.fixture(scope="module")
def keys():
    return keystore.generate(MESH_PARAMS)


def rotates_under(keys, tag: str) -> bool:
    cc = keys.cc
    ct = cc.Encrypt(keys.public_key, cc.MakeCKKSPackedPlaintext(np.zeros(MESH_PARAMS.slots, dtype=complex)))
    ct.SetKeyTag(tag)
    with globalkeys.EVAL_KEY_LOCK.read():
        try:
            cc.EvalRotate(ct, 1)
        except RuntimeError:
            return False
    return True


def test_a_delayed_eviction_never_removes_a_newer_install(keys, monkeypatch):
    codec = MaterialCodec(MESH_PARAMS)
    installed = InstalledKeys(codec, max_count=1, max_bytes=1 << 40)
    held_back: list[tuple[tuple, dict]] = []
    real_remove = keymap.remove
    monkeypatch.setattr(keymap, "remove", lambda *args, **kwargs: held_back.append((args, kwargs)))
    installed.install("race-user:1", keys.rotation_key_bytes)
    installed.install("race-other:1", keys.rotation_key_bytes)  # evicts race-user:1; its removal waits
    installed.install("race-user:1", keys.rotation_key_bytes)  # the same user again, evicting the other
    assert len(held_back) == 2
    for args, kwargs in held_back:  # the delayed removals now get the write lock
        real_remove(*args, **kwargs)
    monkeypatch.setattr(keymap, "remove", real_remove)
    assert installed.touch("race-user:1")
    assert "race-user:1" in globalkeys.filed_tags() and "race-other:1" not in globalkeys.filed_tags()
    assert rotates_under(keys, "race-user:1")
    installed.remove("race-user:1")
    assert "race-user:1" not in globalkeys.filed_tags() and not rotates_under(keys, "race-user:1")


def test_a_stale_generation_does_not_drop_a_refiled_tag(keys):
    cc = keys.cc

    def key_map() -> openfhe.EvalKeyMap:
        return openfhe.DeserializeEvalKeyMapString(keys.rotation_key_bytes, openfhe.BINARY)

    first = globalkeys.file(cc, key_map(), "gen-tag")
    second = globalkeys.file(cc, key_map(), "gen-tag")
    assert second != first and globalkeys.generation_of("gen-tag") == second
    assert not globalkeys.drop(cc, "gen-tag", first)
    assert rotates_under(keys, "gen-tag")
    assert globalkeys.drop(cc, "gen-tag", second)
    assert not rotates_under(keys, "gen-tag") and "gen-tag" not in globalkeys.filed_tags()
