"""The arena cap reaches glibc: mallopt answers 1 only for a parameter it knows and accepts."""

import platform

import pytest

from cipherfeed import heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_arena_cap_is_accepted_by_glibc():
    assert heap.limit_arenas(1)
