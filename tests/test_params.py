"""The CKKS parameter set: security is enforced, the rotation tree is complete, contexts agree."""

import pytest

from cipherfeed.he.params import MESH_PARAMS, HEParams, ParameterError, build_context, context_fingerprint


def test_baby_and_giant_steps_reach_every_offset_exactly_once():
    reached = [0]
    for level in MESH_PARAMS.baby_levels():
        reached = [base + step for base in reached for step in [0, *level]]
    offsets = [g * MESH_PARAMS.baby_steps + b for g in range(MESH_PARAMS.giant_steps) for b in reached]
    assert sorted(offsets) == list(range(MESH_PARAMS.padded_dim))
    assert MESH_PARAMS.rotation_indices == [1, 2, 3, 4, 8, 12, 16, 64, 256, 1024]


def test_the_history_fold_sums_every_period_once():
    assert MESH_PARAMS.history_fold_levels() == [(64, 3), (256, 3), (1024, 3)]
    widths = [MESH_PARAMS.padded_dim]
    for step, rotations in HEParams(ring_dimension=16384).history_fold_levels():
        assert step == widths[-1]
        widths.append(step * (rotations + 1))
    assert widths[-1] == 8192  # 64 -> 256 -> 1024 -> 4096 -> 8192: the last level is binary
    assert MESH_PARAMS.conjugation_index == 16383


def test_radix_and_baby_steps_trade_keys_for_work():
    fold = [64, 256, 1024]
    assert HEParams(rotation_radix=64, baby_steps=64).rotation_indices == list(range(1, 64)) + fold
    assert HEParams(rotation_radix=2).rotation_indices == [1, 2, 4, 8, 16, *fold]
    assert HEParams(baby_steps=64).giant_steps == 1
    with pytest.raises(ParameterError, match="does not reach"):
        HEParams(rotation_radix=3)
    with pytest.raises(ParameterError, match="do not divide"):
        HEParams(baby_steps=24)


def test_mesh_context_is_128_bit_and_deterministic():
    cc = build_context(MESH_PARAMS)
    assert cc.GetRingDimension() == 8192
    assert context_fingerprint(cc) == context_fingerprint(build_context(HEParams()))


def test_unsafe_security_level_is_refused():
    with pytest.raises(ParameterError, match="not allowed"):
        HEParams(security_level="HEStd_NotSet")


def test_openfhe_refuses_a_ring_too_small_for_128_bits():
    # N = 4096 allows at most 109 bits of modulus at 128-bit security; this set needs 113.
    with pytest.raises(ParameterError, match="refused"):
        build_context(HEParams(ring_dimension=4096))


def test_layout_properties():
    assert MESH_PARAMS.slots == 4096
    assert MESH_PARAMS.items_per_ciphertext == 8192
    assert HEParams(embedding_dim=48).padded_dim == 64
    with pytest.raises(ParameterError):
        HEParams(ring_dimension=3000)


def test_byte_templates_end_before_the_key_tag():
    from cipherfeed.he.codec import Kind, MaterialCodec

    codec = MaterialCodec(MESH_PARAMS)
    for kind in Kind:
        template = codec.template(kind)
        # The header ends with the tag's 8-byte length (32) and holds nothing random.
        assert template.header.endswith((32).to_bytes(8, "little")), kind
    # Fresh key pairs always match, whatever their tags share with the references.
    for _ in range(20):
        kp = codec.cc.KeyGen()
        codec.load_public_key(codec_serialize(kp.publicKey))


def codec_serialize(obj):
    from cipherfeed.he.codec import serialize

    return serialize(obj)
