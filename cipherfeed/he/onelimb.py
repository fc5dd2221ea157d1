"""The coefficient words of a one-limb ciphertext inside OpenFHE's binary serialization.

OpenFHE's Python binding gives no access to a ciphertext's polynomials, but its serialization
holds them as two cereal vectors (a little-endian uint64 length, then the words) of ``n`` words
each, c0 then c1, in evaluation form. Their offsets are found by scanning a
serialization of each length once (as ``wire`` finds vectors) and then only *checked*: a length
word of ``n`` in front of each vector. Anything else (another ring size, level or OpenFHE
version) raises, so a change in OpenFHE's format fails loudly instead of being misread.
"""

from __future__ import annotations

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
    blob of that length is checked for the length words at the remembered offsets."""

    def __init__(self, ring_dimension: int) -> None:
        self.ring_dimension = ring_dimension
        self._offsets: dict[int, tuple[int, int]] = {}

    @classmethod
    def learn(cls, reference: bytes, ring_dimension: int) -> OneLimbLayout:
        layout = cls(ring_dimension)
        layout.offsets(reference)
        return layout

    def _valid(self, blob: bytes, starts: tuple[int, int]) -> bool:
        return (
            all(
                start >= 8
                and start + 8 * self.ring_dimension <= len(blob)
                and struct.unpack_from("<Q", blob, start - 8)[0] == self.ring_dimension
                for start in starts
            )
            and starts[1] - starts[0] >= 8 * self.ring_dimension
        )

    def offsets(self, blob: bytes) -> tuple[int, int]:
        """Where c0's and c1's words start in ``blob``."""
        known = self._offsets.get(len(blob))
        if known is not None and self._valid(blob, known):
            return known
        runs = [start for start, n in wire.find_runs(blob, (self.ring_dimension,)) if n == self.ring_dimension]
        if len(runs) != 2 or not self._valid(blob, (runs[0], runs[1])):
            raise LayoutError(f"expected 2 polynomials of {self.ring_dimension} words, found {len(runs)}")
        if len(self._offsets) < 64:  # a handful of lengths occur; never grow without bound
            self._offsets[len(blob)] = (runs[0], runs[1])
        return runs[0], runs[1]

    def read(self, blob: bytes, out: Words) -> None:
        """Copies c0 and c1 into ``out`` (shape (2, n))."""
        for c, start in enumerate(self.offsets(blob)):
            out[c] = np.frombuffer(blob, dtype="<u8", count=self.ring_dimension, offset=start)

    def write(self, template: bytes, polys: Words) -> bytes:
        """``template`` (a one-limb serialization: its header, level, scale and key tag are kept)
        with c0 and c1 replaced by ``polys`` (shape (2, n))."""
        blob = bytearray(template)
        for c, start in enumerate(self.offsets(template)):
            np.frombuffer(blob, dtype="<u8", count=self.ring_dimension, offset=start)[:] = polys[c]
        return bytes(blob)
