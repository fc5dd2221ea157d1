"""A short, bounded run of every coverage-guided fuzz target (``make fuzz`` is the long run)."""

import dataclasses
import itertools
import re
import subprocess
import sys

import pytest

from cipherfeed.config import REPO_ROOT
from fuzz import campaign
from fuzz.targets import TARGETS

RUNS = 3000
# Targets that load and use every mutated HE object the validator accepts (~15% of programs; a
# public key or rotation-key map is then validated as the key service does: 4-13 executions/s here).
RUNS_OF = {"he_mutated_query": 1000, "he_mutated_public_key": 200, "he_rotation_keys": 60}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target_survives_a_bounded_run(name, tmp_path):
    runs = RUNS_OF.get(name, RUNS)
    proc = subprocess.run(
        [sys.executable, "-m", "fuzz.run", name, f"-runs={runs}", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, check=False,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    # libFuzzer counts the seed corpus's inputs as runs too, so a finished run reports at least -runs.
    done = re.search(r"^Done (\d+) runs", log, re.MULTILINE)
    assert done is not None and int(done.group(1)) >= runs, log[-3000:]
    assert not list(tmp_path.glob("crash-*"))


def test_a_target_that_raises_is_reported_as_a_crash(tmp_path):
    """The harness itself: an exception the parser does not document stops the run."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, atheris\n"
         "def boom(data):\n    raise RuntimeError('finding')\n"
         f"atheris.Setup([sys.argv[0], '-runs=10', '-artifact_prefix={tmp_path}/'], boom)\natheris.Fuzz()\n"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "RuntimeError: finding" in proc.stdout + proc.stderr
    assert list(tmp_path.glob("crash-*"))


def test_the_long_run_restarts_a_target_in_segments_and_keeps_its_corpus(tmp_path, monkeypatch):
    """``make fuzz``: a target with ``runs_per_process`` runs as several fuzzer processes sharing
    one corpus until its time is used, and their executions add up."""
    monkeypatch.setitem(TARGETS, "merkle", dataclasses.replace(TARGETS["merkle"], runs_per_process=500))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(TARGETS["merkle"].seeds()):
        (corpus / f"seed-{i}").write_bytes(seed)
    ticks = itertools.count()  # a clock that advances one second per reading: three processes fit in 5 s
    runs, _, _, crashed, log, processes = campaign._fuzz(
        "merkle", corpus, tmp_path, seconds=5, clock=lambda: float(next(ticks))
    )
    assert not crashed, log[-3000:]
    assert processes == 3 and runs >= 3 * 500
