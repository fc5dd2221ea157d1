"""A lossless wire encoding for score ciphertexts: OpenFHE writes every RNS coefficient as a 64-bit
word, but a score ciphertext's coefficients are below q0 (58 bits here). Runs of such words are
stored with only as many bits as their largest value needs; everything else is kept byte for byte.

A run is found where cereal writes a vector: a little-endian uint64 length L followed by L words.
Nothing is assumed beyond that: ``unpack(pack(x)) == x`` for every byte string (tests check it on
real ciphertexts and on random bytes), and a blob without such runs is stored as it is.
"""

from __future__ import annotations

import functools
import struct

import numpy as np

MAGIC = b"CFPK1"
MIN_RUN = 1024  # words; shorter vectors are not worth a segment


class WireError(ValueError):
    """Packed bytes are malformed."""


def _find_runs(blob: bytes, lengths: tuple[int, ...]) -> list[tuple[int, int]]:
    """(byte offset, word count) of vectors of the given lengths, in order, not overlapping.

    A header field can equal a vector length too; among overlapping candidates the one whose
    words look most like coefficients (most of them at least 2^40) wins.
    """
    candidates: list[tuple[int, int, int]] = []
    for n in lengths:
        marker = struct.pack("<Q", n)
        pos = blob.find(marker)
        while pos != -1:
            start = pos + 8
            if start + 8 * n <= len(blob):
                words = np.frombuffer(blob, dtype="<u8", count=n, offset=start)
                candidates.append((int(np.count_nonzero(words >= np.uint64(1 << 40))), start, n))
            pos = blob.find(marker, pos + 1)
    chosen: list[tuple[int, int]] = []
    for _, start, n in sorted(candidates, reverse=True):
        if all(start + 8 * n <= s or s + 8 * m <= start for s, m in chosen):
            chosen.append((start, n))
    return sorted(chosen)


@functools.lru_cache(maxsize=16)
def _plan(n: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Word index, bit offset, complementary shift and a has-high-part mask for n values of ``bits``."""
    pos = np.arange(n, dtype=np.uint64) * np.uint64(bits)
    w = (pos >> np.uint64(6)).astype(np.intp)
    off = pos & np.uint64(63)
    return w, off, (np.uint64(64) - off) & np.uint64(63), off != 0


def _pack_words(words: np.ndarray, bits: int) -> bytes:
    n = words.shape[0]
    w, off, back, spills = _plan(n, bits)
    out = np.zeros((n * bits + 63) // 64 + 1, dtype=np.uint64)
    lo = words << off
    hi = (words >> back) * spills  # zero where the value does not cross into the next word
    for r in range(3):  # with bits >= 22, words r, r+3, ... never share an output word
        sel = slice(r, None, 3)
        out[w[sel]] |= lo[sel]
        out[w[sel] + 1] |= hi[sel]
    return out[: (n * bits + 63) // 64].tobytes()


def _unpack_words(data: bytes, n: int, bits: int) -> np.ndarray:
    w, off, back, spills = _plan(n, bits)
    src = np.zeros((n * bits + 63) // 64 + 1, dtype=np.uint64)
    src[: len(data) // 8] = np.frombuffer(data, dtype="<u8")
    hi = (src[w + 1] << back) * spills
    return ((src[w] >> off) | hi) & np.uint64((1 << bits) - 1)


def pack(blob: bytes, vector_lengths: tuple[int, ...]) -> bytes:
    segments: list[tuple[int, int, int, bytes]] = []
    for start, n in _find_runs(blob, vector_lengths):
        if n < MIN_RUN:
            continue
        words = np.frombuffer(blob, dtype="<u8", count=n, offset=start).astype(np.uint64)
        bits = max(int(words.max()).bit_length(), 22)
        if bits >= 64:
            continue
        segments.append((start, n, bits, _pack_words(words, bits)))
    out = [MAGIC, struct.pack("<I", len(segments))]
    cursor = 0
    for start, n, bits, packed in segments:
        out += [struct.pack("<IIB", start - cursor, n, bits), blob[cursor:start], packed]
        cursor = start + 8 * n
    out += [struct.pack("<I", len(blob) - cursor), blob[cursor:]]
    return b"".join(out)


def unpack(data: bytes) -> bytes:
    try:
        if not data.startswith(MAGIC):
            raise WireError("not a packed ciphertext")
        pos = len(MAGIC)
        (count,) = struct.unpack_from("<I", data, pos)
        pos += 4
        parts = []
        for _ in range(count):
            raw_len, n, bits = struct.unpack_from("<IIB", data, pos)
            pos += 9
            if not 22 <= bits < 64 or n > 1 << 24:
                raise WireError("bad segment header")
            parts.append(data[pos : pos + raw_len])
            pos += raw_len
            size = (n * bits + 63) // 64 * 8
            if pos + size > len(data):
                raise WireError("truncated segment")
            parts.append(_unpack_words(data[pos : pos + size], n, bits).astype("<u8").tobytes())
            pos += size
        (tail,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + tail != len(data):
            raise WireError("trailing or missing bytes")
        parts.append(data[pos:])
        return b"".join(parts)
    except struct.error as exc:
        raise WireError("truncated packed ciphertext") from exc
