"""The coefficient words of a one-limb ciphertext inside OpenFHE's binary serialization.

OpenFHE's Python binding gives no access to a ciphertext's polynomials, but its serialization
holds them as cereal vectors, one per limb of c0, then one per limb of c1, each written as a
little-endian uint64 length ``n``, the ``n`` words (evaluation form, each below the limb's
modulus), then that modulus. A vector is recognised by all three parts, not by its length word
alone: a header field can look like that length too (the key tag's length byte, a zero and the
tag's first bytes do, at a byte offset of their own), and a size heuristic that preferred
"coefficient-looking" words picked that one about once in a thousand serializations (whenever
one sampled coefficient happened to be small), so writing words there overwrote the header's
lengths and OpenFHE died in its deserializer with std::bad_alloc.

Offsets are found by scanning a serialization of each length once and then only *checked*:
the length word before each vector, its modulus after it, every word below that modulus.
Anything else (another ring size, level or OpenFHE version) raises, so a change in OpenFHE's
format fails loudly instead of being misread.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence

import numpy as np

from cipherfeed.he.rnsmac import Words


class LayoutError(RuntimeError):
    """A serialization does not have the learned one-limb layout."""


class OneLimbLayout:
    """Finds the polynomials of a ciphertext of ``ring_dimension`` over the limbs ``moduli`` in
    serializations: ``2 * len(moduli)`` vectors, c0's limbs then c1's (the scorer's one-limb
    ciphertexts have ``moduli = (q0,)``, history profiles ``(q0, q1)``).

    Where they sit depends on the key tag's length and on whether the ciphertext's parameters are
    written in full or by reference (they are in full for polynomials that came from a
    deserialization), so each serialization length is scanned once and remembered; every later
    blob of that length is checked at the remembered offsets."""

    def __init__(self, ring_dimension: int, moduli: Sequence[int]) -> None:
        if not moduli or any(q % (2 * ring_dimension) != 1 for q in moduli):
            raise ValueError("limb moduli must be NTT primes of the ring (1 mod 2N)")
        self.ring_dimension = ring_dimension
        self.moduli = tuple(int(q) for q in moduli)
        self.vectors = 2 * len(self.moduli)
        self._expected = self.moduli * 2  # c0's limbs, then c1's
        self._offsets: dict[int, tuple[int, ...]] = {}

    @classmethod
    def learn(cls, reference: bytes, ring_dimension: int, moduli: Sequence[int]) -> OneLimbLayout:
        layout = cls(ring_dimension, moduli)
        layout.offsets(reference)
        return layout

    def _vector_modulus(self, blob: bytes, start: int) -> int | None:
        """The modulus of a vector of ``n`` words starting at ``start``, if one is there: the
        length word before, a word = 1 mod 2N after (an NTT prime), every word below it."""
        n = self.ring_dimension
        end = start + 8 * n
        if start < 8 or end + 8 > len(blob) or struct.unpack_from("<Q", blob, start - 8)[0] != n:
            return None
        modulus = struct.unpack_from("<Q", blob, end)[0]
        if modulus % (2 * n) != 1:
            return None
        if int(np.frombuffer(blob, dtype="<u8", count=n, offset=start).max()) >= modulus:
            return None
        return int(modulus)

    def _valid(self, blob: bytes, starts: tuple[int, ...]) -> bool:
        return (
            len(starts) == self.vectors
            and all(b - a >= 8 * self.ring_dimension + 16 for a, b in itertools.pairwise(starts))
            and all(self._vector_modulus(blob, s) == q for s, q in zip(starts, self._expected, strict=True))
        )

    def _scan(self, blob: bytes) -> tuple[int, ...]:
        marker = struct.pack("<Q", self.ring_dimension)
        found: list[tuple[int, int]] = []
        pos = blob.find(marker)
        while pos != -1:
            modulus = self._vector_modulus(blob, pos + 8)
            if modulus is not None:
                found.append((pos + 8, modulus))
            pos = blob.find(marker, pos + 1)
        starts = tuple(start for start, _ in found)
        if not self._valid(blob, starts):
            raise LayoutError(
                f"expected {self.vectors} vectors of {self.ring_dimension} words over moduli"
                f" {list(self._expected)}, found {len(found)}"
            )
        return starts

    def offsets(self, blob: bytes) -> tuple[int, ...]:
        """Where each vector's words start in ``blob`` (c0 and c1 for one limb)."""
        known = self._offsets.get(len(blob))
        if known is not None and self._valid(blob, known):
            return known
        starts = self._scan(blob)
        if len(self._offsets) < 64:  # a handful of lengths occur; never grow without bound
            self._offsets[len(blob)] = starts
        return starts

    def produced_offsets(self, blob: bytes) -> tuple[int, ...]:
        """``offsets`` for a serialization this process's OpenFHE just produced from validated
        material (never for received bytes): at a length already learned, only the structure is
        rechecked (each vector's length word before it and its modulus after it), not every word
        against the modulus. Safe because the words are OpenFHE's own reduced output, and no
        reader relies on their range for memory safety (the kernel bounds-checks every vector
        against its blob; a word out of range could only give a wrong sum). A new length is
        scanned and fully checked, as ``offsets`` does."""
        known = self._offsets.get(len(blob))
        n = self.ring_dimension
        if known is not None and all(
            struct.unpack_from("<Q", blob, start - 8)[0] == n and struct.unpack_from("<Q", blob, start + 8 * n)[0] == q
            for start, q in zip(known, self._expected, strict=True)
        ):
            return known
        return self.offsets(blob)

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
