"""A lossless wire encoding for score ciphertexts: OpenFHE writes every RNS coefficient as a 64-bit
word, but a score ciphertext's coefficients are below q0 (58 bits here). Runs of such words are
stored with only as many bits as their largest value needs; everything else is kept byte for byte.

A run is found where cereal writes a vector: a little-endian uint64 length L followed by L words.
Nothing is assumed beyond that: ``unpack(pack(x)) == x`` for every byte string (tests check it on
real ciphertexts and on random bytes), and a blob without such runs is stored as it is.
"""

from __future__ import annotations

import functools
import math
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


@functools.lru_cache(maxsize=16)
def _group_plan(bits: int) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """Values per group, words per group, and for each output word of a group up to four
    contributions: (value index, signed shift, valid). A group of 64 / gcd(bits, 64) values fills
    a whole number of words, so every group packs the same way."""
    per_group = 64 // math.gcd(bits, 64)
    words = per_group * bits // 64
    slots = -(-64 // bits) + 1  # values that can touch one 64-bit word
    idx = np.zeros((slots, words), dtype=np.intp)
    shift = np.zeros((slots, words), dtype=np.int64)
    valid = np.zeros((slots, words), dtype=bool)
    for k in range(words):
        first, last = (64 * k) // bits, min((64 * k + 63) // bits, per_group - 1)
        for c, i in enumerate(range(first, last + 1)):
            idx[c, k], shift[c, k], valid[c, k] = i, bits * i - 64 * k, True
    return per_group, words, idx, shift, valid


def _pack_words(words: np.ndarray, bits: int) -> bytes:
    """Packs values below 2**bits, group by group, with whole-array shifts (no per-value indexing)."""
    n = words.shape[0]
    per_group, out_words, idx, shift, valid = _group_plan(bits)
    groups = -(-n // per_group)
    v = np.zeros(groups * per_group, dtype=np.uint64)
    v[:n] = words
    v = v.reshape(groups, per_group)
    out = np.zeros((groups, out_words), dtype=np.uint64)
    for c in range(idx.shape[0]):
        part = v[:, idx[c]]
        left = np.where(shift[c] > 0, shift[c], 0).astype(np.uint64)
        right = np.where(shift[c] < 0, -shift[c], 0).astype(np.uint64)
        out |= np.where(valid[c], (part << left) >> right, np.uint64(0))
    return out.reshape(-1)[: (n * bits + 63) // 64].tobytes()


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
