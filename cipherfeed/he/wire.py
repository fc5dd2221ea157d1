"""A lossless wire encoding for score ciphertexts: OpenFHE writes every RNS coefficient as a 64-bit
word, but a score ciphertext's coefficients are below q0 (58 bits here). Runs of such words are
stored with only as many bits as their largest value needs; everything else is kept byte for byte.

A run is found where cereal writes a vector: a little-endian uint64 length L followed by L words.
Nothing is assumed beyond that: ``unpack(pack(x)) == x`` for every byte string (tests check it on
real ciphertexts and on random bytes), and a blob without such runs is stored as it is.
"""

from __future__ import annotations

import itertools
import struct
import sys

import numpy as np

from cipherfeed.he import rnsmac

MAGIC = b"CFPK2"
_NATIVE_PLANES = rnsmac.available() and sys.byteorder == "little"
MIN_RUN = 1024  # words; shorter vectors are not worth a segment


class WireError(ValueError):
    """Packed bytes are malformed."""


def find_runs(blob: bytes, lengths: tuple[int, ...]) -> list[tuple[int, int]]:
    """(byte offset, word count) of vectors of the given lengths, in order, not overlapping.

    A header field can equal a vector length too; among overlapping candidates the one whose
    words look most like coefficients (most of an even sample of ~256 of them at least 2^40) wins.
    The choice only affects the packed size, never correctness.
    """
    candidates: list[tuple[int, int, int]] = []
    for n in lengths:
        marker = struct.pack("<Q", n)
        pos = blob.find(marker)
        while pos != -1:
            start = pos + 8
            if start + 8 * n <= len(blob):
                words = np.frombuffer(blob, dtype="<u8", count=n, offset=start)[:: max(1, n // 256)]  # a sample
                candidates.append((int(np.count_nonzero(words >= np.uint64(1 << 40))), start, n))
            pos = blob.find(marker, pos + 1)
    chosen: list[tuple[int, int]] = []
    for _, start, n in sorted(candidates, reverse=True):
        if all(start + 8 * n <= s or s + 8 * m <= start for s, m in chosen):
            chosen.append((start, n))
    return sorted(chosen)


def _planes(bits: int) -> list[tuple[int, str]]:
    """(shift, dtype) of each plane of a value below 2**bits: byte planes of 4, 2 and 1 bytes for its
    low ``bits // 8`` bytes (each a contiguous numpy cast), then one bit plane per remaining bit."""
    planes: list[tuple[int, str]] = []
    shift = 0
    for width, dtype in ((4, "<u4"), (2, "<u2"), (1, "u1")):
        while bits - shift >= 8 * width:
            planes.append((shift, dtype))
            shift += 8 * width
    planes += [(b, "bit") for b in range(shift, bits)]
    return planes


def _packed_size(n: int, bits: int) -> int:
    return sum((n + 7) // 8 if dtype == "bit" else n * np.dtype(dtype).itemsize for _, dtype in _planes(bits))


def _pack_words(words: np.ndarray, bits: int) -> bytes:
    """Values below 2**bits, plane by plane (see ``_planes``): in the compiled kernel when it is
    built (one call that releases the GIL, ~3x faster, where numpy's ~30 small calls each
    contend for the GIL with the scorer's other thread), else whole-array numpy operations."""
    if _NATIVE_PLANES:
        return rnsmac.pack_planes(np.ascontiguousarray(words, dtype="<u8"), bits)
    v = np.asarray(words, dtype=np.uint64)
    parts = []
    for shift, dtype in _planes(bits):
        shifted = v >> np.uint64(shift)
        if dtype == "bit":
            parts.append(np.packbits((shifted & np.uint64(1)).astype(np.uint8), bitorder="little").tobytes())
        else:
            parts.append(shifted.astype(dtype).tobytes())
    return b"".join(parts)


def _unpack_words(data: bytes, n: int, bits: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.uint64)
    pos = 0
    for shift, dtype in _planes(bits):
        if dtype == "bit":
            size = (n + 7) // 8
            plane = np.unpackbits(
                np.frombuffer(data, dtype=np.uint8, count=size, offset=pos), count=n, bitorder="little"
            )
        else:
            size = n * np.dtype(dtype).itemsize
            plane = np.frombuffer(data, dtype=dtype, count=n, offset=pos)
        out |= plane.astype(np.uint64) << np.uint64(shift)
        pos += size
    return out


def pack(blob: bytes, vector_lengths: tuple[int, ...], runs: list[tuple[int, int]] | None = None) -> bytes:
    """``blob`` with its coefficient vectors bit-packed. ``runs`` ((byte offset, word count) of
    each vector, in order), when the caller knows them, saves the scan."""
    if runs is None:
        runs = find_runs(blob, vector_lengths)
    elif any(s < e + 8 * m for (e, m), (s, _) in itertools.pairwise(runs)) or any(
        s < 0 or s + 8 * m > len(blob) for s, m in runs
    ):
        raise ValueError("runs overlap or fall outside the blob")
    segments: list[tuple[int, int, int, bytes]] = []
    for start, n in runs:
        if n < MIN_RUN:
            continue
        words = np.frombuffer(blob, dtype="<u8", count=n, offset=start)
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


def unpack(data: bytes, limit: int | None = None) -> bytes:
    """The blob ``pack`` was given. With ``limit``, WireError before anything is allocated for an
    output that would exceed ``limit`` bytes (what the headers promise is added up first)."""
    try:
        if not data.startswith(MAGIC):
            raise WireError("not a packed ciphertext")
        pos = len(MAGIC)
        (count,) = struct.unpack_from("<I", data, pos)
        pos += 4
        segments: list[tuple[int, int, int, int]] = []  # (raw start, raw length, words, bits)
        total = 0
        for _ in range(count):
            raw_len, n, bits = struct.unpack_from("<IIB", data, pos)
            pos += 9
            if not 22 <= bits < 64 or n > 1 << 24:
                raise WireError("bad segment header")
            size = _packed_size(n, bits)
            if pos + raw_len + size > len(data):
                raise WireError("truncated segment")
            segments.append((pos, raw_len, n, bits))
            pos += raw_len + size
            total += raw_len + 8 * n
            if limit is not None and total > limit:
                raise WireError(f"unpacks to more than {limit} bytes")
        (tail,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + tail != len(data):
            raise WireError("trailing or missing bytes")
        if limit is not None and total + tail > limit:
            raise WireError(f"unpacks to more than {limit} bytes")
        parts = []
        for start, raw_len, n, bits in segments:
            parts.append(data[start : start + raw_len])
            words = start + raw_len
            parts.append(_unpack_words(data[words : words + _packed_size(n, bits)], n, bits).astype("<u8").tobytes())
        parts.append(data[pos:])
        return b"".join(parts)
    except struct.error as exc:
        raise WireError("truncated packed ciphertext") from exc
