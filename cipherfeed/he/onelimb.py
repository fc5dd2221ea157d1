"""The coefficient words of a one-limb ciphertext inside OpenFHE's binary serialization.

OpenFHE's Python binding gives no access to a ciphertext's polynomials, but its serialization
holds them as two cereal vectors (a little-endian uint64 length, then the words) of ``n`` words
each, c0 then c1, in evaluation form. Their offsets are found by scanning a
serialization of each length once (as ``wire`` finds vectors) and then only *checked*: a length
word of ``n`` in front of each vector. Anything else (another ring size, level or OpenFHE
version) raises, so a change in OpenFHE's format fails loudly instead of being misread.
"""

from __future__ import annotations

import itertools
import struct

import numpy as np

from cipherfeed.he import wire
from cipherfeed.he.rnsmac import Words


class LayoutError(RuntimeError):
    """A serialization does not have the learned one-limb layout."""


class OneLimbLayout:
    """Finds the two polynomials of a one-limb ciphertext of ``ring_dimension`` in serializations.

    Where they sit depends on the key tag's length and on whether the ciphertext's parameters are
    written in full or by reference (they are in full for polynomials that came from a
    deserialization), so each serialization length is scanned once and remembered; every later
    blob of that length is checked for the length words at the remembered offsets.

    ``vectors`` = 2 * limbs: a ciphertext of L limbs holds c0's L limb vectors, then c1's
    (history profiles use the two-limb form, ``vectors=4``)."""

    def __init__(self, ring_dimension: int, vectors: int = 2) -> None:
        self.ring_dimension = ring_dimension
        self.vectors = vectors
        self._offsets: dict[int, tuple[int, ...]] = {}

    @classmethod
    def learn(cls, reference: bytes, ring_dimension: int, vectors: int = 2) -> OneLimbLayout:
        layout = cls(ring_dimension, vectors)
        layout.offsets(reference)
        return layout

    def _valid(self, blob: bytes, starts: tuple[int, ...]) -> bool:
        return (
            len(starts) == self.vectors
            and all(
                start >= 8
                and start + 8 * self.ring_dimension <= len(blob)
                and struct.unpack_from("<Q", blob, start - 8)[0] == self.ring_dimension
                for start in starts
            )
            and all(b - a >= 8 * self.ring_dimension for a, b in itertools.pairwise(starts))
        )

    def offsets(self, blob: bytes) -> tuple[int, ...]:
        """Where each vector's words start in ``blob`` (c0 and c1 for one limb)."""
        known = self._offsets.get(len(blob))
        if known is not None and self._valid(blob, known):
            return known
        runs = tuple(start for start, n in wire.find_runs(blob, (self.ring_dimension,)) if n == self.ring_dimension)
        if not self._valid(blob, runs):
            raise LayoutError(f"expected {self.vectors} vectors of {self.ring_dimension} words, found {len(runs)}")
        if len(self._offsets) < 64:  # a handful of lengths occur; never grow without bound
            self._offsets[len(blob)] = runs
        return runs

    def read(self, blob: bytes, out: Words) -> None:
        """Copies the vectors into ``out`` (shape (vectors, n): c0 and c1 for one limb)."""
        for c, start in enumerate(self.offsets(blob)):
            out[c] = np.frombuffer(blob, dtype="<u8", count=self.ring_dimension, offset=start)

    def write(self, template: bytes, polys: Words) -> bytes:
        """``template`` (a serialization of this layout: its header, level, scale and key tag are
        kept) with its vectors replaced by ``polys`` (shape (vectors, n))."""
        blob = bytearray(template)
        for c, start in enumerate(self.offsets(template)):
            np.frombuffer(blob, dtype="<u8", count=self.ring_dimension, offset=start)[:] = polys[c]
        return bytes(blob)
