"""The arena cap reaches glibc: mallopt answers 1 only for a parameter it knows and accepts."""

import platform
import subprocess
import sys

import pytest

from cipherfeed import heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_arena_cap_is_accepted_by_glibc():
    assert heap.limit_arenas(1)


TRIM_PROBE = """
import ctypes
from cipherfeed import heap

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
blocks = [libc.malloc(65552) for _ in range(170)]  # a key set's polynomials, ~11 MB
for b in blocks:
    libc.memset(b, 1, 65552)
pin = libc.malloc(65552)  # allocated after them, at the top: free() alone cannot shrink the heap
for b in blocks:
    libc.free(b)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


before = rss()
print(heap.trim(), before - rss())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_hands_an_evicted_key_sets_pages_back():
    """free() keeps the pages of a key set that is not at the heap's top; trim returns them (RSS
    falls by most of its 11 MB). A fresh interpreter, so that the heap's state is known."""
    run = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True)
    released, freed = run.stdout.split()
    assert released == "True"
    assert int(freed) > 8 << 20
