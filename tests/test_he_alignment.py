"""The kernel never loads a uint64 from a misaligned address.

``wire`` hands ``pack_planes`` views into serializations at any byte offset (cereal's vectors sit
at offsets = 6 and 3 mod 8 in score ciphertexts). The kernel is rebuilt here with
``-fsanitize=alignment`` (trapping) and run in a subprocess on such views: a misaligned load
aborts it. The word-array entry points refuse misaligned buffers instead of reading them.
"""

import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cipherfeed.he import rnsmac, wire

SOURCE = Path(wire.__file__).with_name("_rnsmac.c")


def _ubsan_runtime() -> str | None:
    cc = shutil.which("gcc")
    if cc is None:
        return None
    path = subprocess.run([cc, "-print-file-name=libubsan.so"], capture_output=True, text=True).stdout.strip()
    return path if Path(path).is_file() else None


@pytest.mark.skipif(_ubsan_runtime() is None, reason="gcc with libubsan is needed to build the sanitized kernel")
def test_sanitized_kernel_packs_views_at_every_offset(tmp_path):
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    built = tmp_path / f"_rnsmac{suffix}"
    subprocess.run(
        [
            "gcc",
            "-shared",
            "-fPIC",
            "-O1",
            "-g",
            "-fsanitize=alignment",
            "-fno-sanitize-recover=alignment",
            f"-I{sysconfig.get_paths()['include']}",
            str(SOURCE),
            "-o",
            str(built),
        ],
        check=True,
    )
    probe = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import numpy as np, _rnsmac
        rng = np.random.default_rng(0)
        words = rng.integers(0, 2**58, size=8195, dtype=np.uint64)
        for offset in range(8):
            blob = bytes(offset) + words.tobytes()
            view = np.frombuffer(blob, dtype="<u8", count=8195, offset=offset)
            assert _rnsmac.pack_planes(view, 58) == _rnsmac.pack_planes(words, 58), offset
        print("ok")
        """
    )
    env = {"LD_PRELOAD": _ubsan_runtime(), "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1", "PATH": ""}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.skipif(not rnsmac.available(), reason="the native kernel is not built")
def test_misaligned_word_arrays_are_refused_not_read():
    q = (1 << 58) - 27  # odd; only alignment matters here
    blob = bytes(8 * 1025)
    view = np.frombuffer(blob, dtype="<u8", count=1024, offset=4)
    assert not view.flags.aligned
    aligned = np.zeros(1024, dtype=np.uint64)
    with pytest.raises(ValueError, match="aligned"):
        rnsmac.add_mod(aligned, view, q)
    with pytest.raises(ValueError, match="aligned"):
        rnsmac.to_montgomery(np.frombuffer(bytearray(blob), dtype="<u8", count=1024, offset=4), q)


def test_wire_round_trips_vectors_at_every_offset():
    rng = np.random.default_rng(5)
    words = rng.integers(0, 2**58, size=2048, dtype=np.uint64)
    for offset in range(8):
        blob = bytes(range(offset)) + (2048).to_bytes(8, "little") + words.tobytes() + b"tail"
        assert wire.unpack(wire.pack(blob, (2048,))) == blob
