"""RFC 6962 Merkle trees against spec test vectors, then exhaustively on random logs."""

import base64
import os
import random

import pytest

from cipherfeed.merkle import (
    EMPTY_ROOT,
    CompactTree,
    ProofError,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)

b64 = base64.b64decode

# C2SP CCTV merkle test vectors (c2sp.org/CCTV/merkle README): leaf data "0", "1".
C2SP_LEAF0 = b64("2zQm6HgGjSjSabbIcXIyLOU3K2V1bQeJAB00g19gHAM=")
C2SP_LEAF1 = b64("IhXorE4rhxwqSBieeXOMlWwIHiOsLyQVv3faGZ39kgw=")
C2SP_ROOT2 = b64("ywCYnZSlacCmeK4EK2Pc1GJduWRAUX83put5duok7Us=")

# The RFC 6962 reference dataset and tree heads (certificate-transparency reference tests).
RFC6962_LEAVES = [
    bytes.fromhex(x)
    for x in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
]
RFC6962_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# Inclusion of leaf 0 in the 8-leaf tree, and consistency 1 -> 8 (reference test cases).
RFC6962_INCLUSION_0_8 = [
    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
]


def test_c2sp_vectors():
    assert leaf_hash(b"0") == C2SP_LEAF0 and leaf_hash(b"1") == C2SP_LEAF1
    tree = CompactTree([C2SP_LEAF0, C2SP_LEAF1])
    assert tree.root() == C2SP_ROOT2
    assert tree.inclusion_proof(0, 2) == [C2SP_LEAF1]
    verify_inclusion(0, 2, C2SP_LEAF0, [C2SP_LEAF1], C2SP_ROOT2)
    assert tree.consistency_proof(1, 2) == [C2SP_LEAF1]
    verify_consistency(1, 2, C2SP_LEAF0, C2SP_ROOT2, [C2SP_LEAF1])


def test_rfc6962_reference_tree():
    tree = CompactTree([leaf_hash(d) for d in RFC6962_LEAVES])
    assert [tree.root(n).hex() for n in range(1, 9)] == RFC6962_ROOTS
    assert tree.root(0) == EMPTY_ROOT
    assert [p.hex() for p in tree.inclusion_proof(0, 8)] == RFC6962_INCLUSION_0_8
    assert tree.consistency_proof(1, 8) == tree.inclusion_proof(0, 8)  # from size 1 it is a path


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 64, 100, 257])
def test_every_inclusion_and_consistency_proof_verifies(size):
    rng = random.Random(size)
    tree = CompactTree([leaf_hash(rng.randbytes(rng.randrange(0, 40))) for _ in range(size)])
    roots = [tree.root(n) for n in range(size + 1)]
    for n in range(1, size + 1):
        for i in range(n):
            verify_inclusion(i, n, tree.leaf(i), tree.inclusion_proof(i, n), roots[n])
        for m in range(1, n + 1):
            verify_consistency(m, n, roots[m], roots[n], tree.consistency_proof(m, n))


def test_tampered_proofs_are_rejected():
    tree = CompactTree([leaf_hash(os.urandom(8)) for _ in range(23)])
    root = tree.root()
    proof = tree.inclusion_proof(9, 23)
    for bad in (
        lambda: verify_inclusion(9, 23, leaf_hash(b"other"), proof, root),
        lambda: verify_inclusion(8, 23, tree.leaf(9), proof, root),
        # A size with the same proof shape (22) would verify: the signed checkpoint binds the size.
        lambda: verify_inclusion(9, 12, tree.leaf(9), proof, root),
        lambda: verify_inclusion(9, 23, tree.leaf(9), proof[:-1], root),
        lambda: verify_inclusion(9, 23, tree.leaf(9), [*proof, proof[0]], root),
        lambda: verify_inclusion(9, 23, tree.leaf(9), [bytes(32), *proof[1:]], root),
        lambda: verify_inclusion(9, 23, tree.leaf(9), proof, bytes(32)),
        lambda: verify_inclusion(23, 23, tree.leaf(9), proof, root),
    ):
        with pytest.raises(ProofError):
            bad()
    old, new = tree.root(7), tree.root(23)
    cproof = tree.consistency_proof(7, 23)
    for bad in (
        lambda: verify_consistency(7, 23, bytes(32), new, cproof),
        lambda: verify_consistency(7, 23, old, bytes(32), cproof),
        lambda: verify_consistency(6, 23, old, new, cproof),
        lambda: verify_consistency(7, 23, old, new, cproof[:-1]),
        lambda: verify_consistency(7, 23, old, new, [*cproof, cproof[0]]),
        lambda: verify_consistency(7, 7, old, new, []),
        lambda: verify_consistency(0, 7, old, new, cproof),
    ):
        with pytest.raises(ProofError):
            bad()


def test_impossible_requests():
    tree = CompactTree([leaf_hash(b"x")] * 3)
    with pytest.raises(ProofError):
        tree.inclusion_proof(3, 3)
    with pytest.raises(ProofError):
        tree.consistency_proof(2, 4)
    with pytest.raises(ProofError):
        tree.root(4)


@pytest.mark.parametrize("length", [0, 1, 31, 33, 64])
def test_every_hash_an_inclusion_check_reads_is_32_bytes(length):
    """A size-1 tree's proof is empty and its root is the leaf hash: a short "hash" must not pass."""
    odd = b"\x07" * length
    with pytest.raises(ProofError, match="32 bytes"):
        verify_inclusion(0, 1, odd, [], odd)
    tree = CompactTree([leaf_hash(b"a"), leaf_hash(b"b")])
    with pytest.raises(ProofError, match="32 bytes"):
        verify_inclusion(0, 2, tree.leaf(0), [tree.leaf(1)], odd)
    with pytest.raises(ProofError, match="32 bytes"):
        verify_inclusion(0, 2, odd, [tree.leaf(1)], tree.root())
    verify_inclusion(0, 1, tree.leaf(0), [], tree.leaf(0))  # the real size-1 case still verifies
