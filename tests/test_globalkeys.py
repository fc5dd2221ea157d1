"""Removing one tag's rotation keys from OpenFHE's global map really removes them."""

import numpy as np
import openfhe
import pytest

from cipherfeed.client import keystore
from cipherfeed.he import globalkeys, packing
from cipherfeed.he.params import MESH_PARAMS


def test_drop_removes_one_tag_and_keeps_the_others():
    keys = keystore.generate(MESH_PARAMS)
    cc = keys.cc
    for tag in ("gk-a", "gk-b"):
        globalkeys.file(cc, openfhe.DeserializeEvalKeyMapString(keys.rotation_key_bytes, openfhe.BINARY), tag)
    q = packing.replicate_query(np.arange(64) / 64, 64, 4096)
    ct = cc.Encrypt(keys.public_key, cc.MakeCKKSPackedPlaintext(q))
    globalkeys.drop(cc, "gk-a")
    assert "gk-a" not in globalkeys.filed_tags() and "gk-b" in globalkeys.filed_tags()
    ct.SetKeyTag("gk-a")
    with pytest.raises(RuntimeError):
        cc.EvalRotate(ct, 1)
    ct.SetKeyTag("gk-b")
    rotated = cc.Decrypt(keys.secret_key, cc.EvalRotate(ct, 1))
    rotated.SetLength(4)
    np.testing.assert_allclose(np.real(rotated.GetCKKSPackedValue()), [1 / 64, 2 / 64, 3 / 64, 4 / 64], atol=1e-6)
    globalkeys.drop(cc, "gk-b")


def test_key_generation_leaves_nothing_in_the_map():
    keys = keystore.generate(MESH_PARAMS)
    ct = keys.cc.Encrypt(keys.public_key, keys.cc.MakeCKKSPackedPlaintext(np.zeros(4096, dtype=complex)))
    with pytest.raises(RuntimeError):
        keys.cc.EvalRotate(ct, 1)  # the client's own keys are serialized, not kept
