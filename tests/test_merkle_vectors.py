"""transparency-dev/merkle's inclusion and consistency test cases (Apache-2.0), read in place from
the shared vectors folder (CIPHERFEED_VECTORS): every valid proof verifies, every invalid one is
refused with ProofError (never another exception)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from cipherfeed.config import default_vectors_dir
from cipherfeed.merkle import ProofError, verify_consistency, verify_inclusion

VECTORS = default_vectors_dir() / "transparency-dev-merkle"
EXPECTED_CASES = 196  # 98 inclusion + 98 consistency, as published


def _cases() -> list[Any]:
    files = sorted(VECTORS.glob("*/**/*.json"))
    if not files:  # one failing case instead of silently collecting none
        return [pytest.param(None, id="vectors-missing")]
    return [pytest.param(f, id=str(f.relative_to(VECTORS).with_suffix(""))) for f in files]


def _require(path: Path | None) -> dict[str, Any]:
    if path is None:
        pytest.fail(f"transparency-dev merkle vectors are required at {VECTORS} (set CIPHERFEED_VECTORS)")
    case: dict[str, Any] = json.loads(path.read_text())
    return case


def _hashes(values: list[str] | None) -> list[bytes]:
    return [base64.b64decode(v, validate=True) for v in values or []]


def test_every_published_case_is_here():
    assert len([c for c in _cases() if c.values[0] is not None]) == EXPECTED_CASES, VECTORS


@pytest.mark.parametrize("path", _cases())
def test_verifier_agrees_with_transparency_dev(path):
    case = _require(path)
    b64 = lambda s: base64.b64decode(s, validate=True)  # noqa: E731
    if "leafIdx" in case:
        check = lambda: verify_inclusion(  # noqa: E731
            case["leafIdx"], case["treeSize"], b64(case["leafHash"]), _hashes(case["proof"]), b64(case["root"])
        )
    else:
        check = lambda: verify_consistency(  # noqa: E731
            case["size1"], case["size2"], b64(case["root1"]), b64(case["root2"]), _hashes(case["proof"])
        )
    if case["wantErr"]:
        with pytest.raises(ProofError):
            check()
    else:
        check()
