"""RFC 6962 / RFC 9162 Merkle trees: hashing, an append-only tree with O(log n) proofs, and proof
verification (RFC 9162 sections 2.1.3.2 and 2.1.4.2). Pure functions, no I/O.

The tree keeps every perfect subtree's hash by level (``levels[k][j]`` covers leaves
``[j * 2**k, (j + 1) * 2**k)``): 64 bytes per leaf in all, so an inclusion or consistency proof at
any size needs only O(log n) lookups plus hashing of the right edge.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE = 32


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof does not verify, or was asked for impossible sizes."""


def _largest_power_of_two_below(n: int) -> int:
    """The k of RFC 6962: the largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


class CompactTree:
    """An append-only Merkle tree over leaf hashes."""

    def __init__(self, leaf_hashes: Sequence[bytes] = ()) -> None:
        self.levels: list[list[bytes]] = [[]]
        for h in leaf_hashes:
            self.append_hash(h)

    @property
    def size(self) -> int:
        return len(self.levels[0])

    def append_hash(self, h: bytes) -> int:
        index = self.size
        self.levels[0].append(h)
        level, i = 0, index
        while i & 1:  # this leaf completes perfect subtrees: hash them up
            right = self.levels[level][i]
            left = self.levels[level][i - 1]
            level += 1
            if len(self.levels) == level:
                self.levels.append([])
            self.levels[level].append(node_hash(left, right))
            i >>= 1
        return index

    def leaf(self, index: int) -> bytes:
        return self.levels[0][index]

    def _subtree(self, start: int, end: int) -> bytes:
        """MTH of leaves [start, end); start is a multiple of the largest power of two <= end - start."""
        n = end - start
        if n & (n - 1) == 0:
            level = n.bit_length() - 1
            return self.levels[level][start >> level]
        k = _largest_power_of_two_below(n)
        return node_hash(self._subtree(start, start + k), self._subtree(start + k, end))

    def root(self, size: int | None = None) -> bytes:
        size = self.size if size is None else size
        if not 0 <= size <= self.size:
            raise ProofError(f"no tree of size {size} (the log has {self.size} leaves)")
        return EMPTY_ROOT if size == 0 else self._subtree(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """PATH(m, D[n]) of RFC 6962 section 2.1.1, leaf-to-root order."""
        if not 0 <= index < size <= self.size:
            raise ProofError(f"no leaf {index} in a tree of size {size} (the log has {self.size})")
        proof: list[bytes] = []
        start, end, m = 0, size, index
        while end - start > 1:
            k = _largest_power_of_two_below(end - start)
            if m < k:
                proof.append(self._subtree(start + k, end))
                end = start + k
            else:
                proof.append(self._subtree(start, start + k))
                start, m = start + k, m - k
        return proof[::-1]

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """PROOF(m, D[n]) of RFC 6962 section 2.1.2."""
        if not 0 < old_size <= new_size <= self.size:
            raise ProofError(f"no consistency proof from {old_size} to {new_size} (the log has {self.size})")
        if old_size == new_size:
            return []
        proof: list[bytes] = []
        start, end, m, complete = 0, new_size, old_size, True
        while True:
            n = end - start
            if m == n:
                if not complete:
                    proof.append(self._subtree(start, end))
                break
            k = _largest_power_of_two_below(n)
            if m <= k:
                proof.append(self._subtree(start + k, end))
                end = start + k
            else:
                proof.append(self._subtree(start, start + k))
                start, m, complete = start + k, m - k, False
        return proof[::-1]


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """RFC 9162 section 2.1.3.2; raises ProofError unless ``proof`` proves ``leaf`` at ``index``."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    # In a size-1 tree the root is the leaf hash itself: without these checks two equal byte
    # strings of any length (even empty) would "verify".
    if len(leaf) != HASH_SIZE or len(root) != HASH_SIZE:
        raise ProofError(f"a leaf hash and a root are {HASH_SIZE} bytes")
    if any(len(p) != HASH_SIZE for p in proof):
        raise ProofError(f"every proof hash is {HASH_SIZE} bytes")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is too short")
    if r != root:
        raise ProofError("inclusion proof does not lead to the root")


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> None:
    """RFC 9162 section 2.1.4.2; raises ProofError unless the old tree is a prefix of the new one."""
    if not 0 < old_size <= new_size:
        raise ProofError(f"no consistency between sizes {old_size} and {new_size}")
    if old_size == new_size:  # nothing to hash: the roots must simply be the same bytes
        if proof:
            raise ProofError("consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError("equal sizes with different roots")
        return
    path = list(proof)
    if len(old_root) != HASH_SIZE or len(new_root) != HASH_SIZE:
        raise ProofError(f"a root is {HASH_SIZE} bytes")
    if any(len(p) != HASH_SIZE for p in path):
        raise ProofError(f"every proof hash is {HASH_SIZE} bytes")
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the first node
        path.insert(0, old_root)
    if not path:
        raise ProofError("consistency proof is empty")
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if fr != old_root:
        raise ProofError("consistency proof does not lead to the old root")
    if sr != new_root:
        raise ProofError("consistency proof does not lead to the new root")
