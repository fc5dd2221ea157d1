"""Before serving, the recommender scores blocks both ways and refuses to start unless the native
kernel's serialized scores are OpenFHE's bytes; openfhe is pinned to the version that was checked."""

import importlib.metadata
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cipherfeed.grpcutil import run_service
from cipherfeed.he import rnsmac
from cipherfeed.he.codec import MaterialCodec
from cipherfeed.he.params import MESH_PARAMS
from services.recommender.scoring import EncryptedScorer, SelfCheckError
from services.recommender.server import serve
from services.recommender.synthetic import synthetic_catalogue
from tests.conftest import recommender_config

pytestmark = pytest.mark.skipif(not rnsmac.available(), reason="the native kernel is not built")


@pytest.fixture(scope="module")
def model():
    return synthetic_catalogue(17_000, seed=3)  # 3 blocks, the last one folded 4 times


def off_by_one(monkeypatch):
    """A kernel that gets one coefficient wrong (as a misread serialization would)."""
    real = rnsmac.multiply_accumulate

    def wrong(out, ciphertexts, plaintexts, modulus, add=None):
        real(out, ciphertexts, plaintexts, modulus, add)
        out[0, 0, 0] = (int(out[0, 0, 0]) + 1) % modulus

    monkeypatch.setattr(rnsmac, "multiply_accumulate", wrong)


def test_the_check_covers_the_first_and_the_folded_last_block(model):
    codec = MaterialCodec(MESH_PARAMS)
    with ThreadPoolExecutor(2) as pool:
        scorer = EncryptedScorer(model, MESH_PARAMS, pool, kernel="native")
        assert scorer.tail_fold == 4
        assert scorer.self_check() == [0, 2]
        assert scorer.self_check(codec.load_query) == [0, 2]  # a query loaded as requests are
        reference = EncryptedScorer(model, MESH_PARAMS, pool, kernel="openfhe")
        assert reference.self_check() == []  # nothing to compare


def test_a_kernel_that_disagrees_is_caught(model, monkeypatch):
    with ThreadPoolExecutor(2) as pool:
        scorer = EncryptedScorer(model, MESH_PARAMS, pool, kernel="native")
        off_by_one(monkeypatch)
        with pytest.raises(SelfCheckError, match=r"block 0.*differs from OpenFHE's"):
            scorer.self_check()


def test_the_recommender_refuses_to_start_with_a_clear_message(model, monkeypatch, tmp_path, capsys, caplog):
    off_by_one(monkeypatch)
    config = recommender_config(tmp_path, keyservice_port=1, redis=None)
    assert run_service("recommender", lambda: serve(config, model)) == 2
    err = capsys.readouterr().err
    assert "recommender: scoring self-check failed" in err and "refusing to serve" in err
    assert any("self-check failed" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_openfhe_is_pinned_to_the_installed_version():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    pins = re.findall(r'"(openfhe\s*[=~<>!][^"]*)"', pyproject)
    assert pins == [f"openfhe=={importlib.metadata.version('openfhe')}"]
