"""The benchmarks still run (tiny sizes, no timing asserted): an API change must not rot them."""

import json

import pytest

from bench import authz, gateway, gateway_memory, history, keys, ledger, load, ownerauth, scoring
from bench.common import RESULTS


@pytest.mark.parametrize(
    ("module", "args"),
    [
        (scoring, ["--sizes", "9000", "--reps", "1", "--tenseal-reps", "0"]),
        (history, ["--sizes", "9000", "--reps", "1"]),
        (authz, ["--items", "100", "--reps", "1", "--cheap-reps", "2"]),
        (keys, ["--users", "3", "--cache-size", "2", "--reps", "1"]),
        (ledger, ["--appends", "400", "--batch", "100", "--leaves", "300", "--anchors", "2"]),
        (ownerauth, ["--n", "3"]),
        (gateway, ["--items", "100", "--reps", "2"]),
        (gateway_memory, ["--mib", "1"]),
    ],
)
def test_benchmark_runs_and_writes_json(module, args, capsys):
    out = f"smoke-{module.__name__.split('.')[-1]}"
    try:
        assert module.main([*args, "--out", out]) == 0
        written = json.loads((RESULTS / f"{out}.json").read_text())
        assert written["machine"]["cores"] >= 1
    finally:
        (RESULTS / f"{out}.json").unlink(missing_ok=True)
    assert capsys.readouterr().out.strip()


def test_load_benchmark_drives_a_sharded_mesh_of_processes(capsys):
    """Two shards and their coordinator configured only by CIPHERFEED_SHARD_* in separate
    processes, directly and through the gateway: every Score answered, digest-checked, and the
    sampled answers decrypt right."""
    out = "smoke-load"
    args = ["--items", "9000", "--clients", "1", "--seconds", "1", "--shards", "2", "--queries-per-client", "1"]
    try:
        assert load.main([*args, "--paths", "direct,gateway", "--out", out]) == 0
        rows = json.loads((RESULTS / f"{out}.json").read_text())["rows"]
    finally:
        (RESULTS / f"{out}.json").unlink(missing_ok=True)
    assert [r["path"] for r in rows] == ["direct", "gateway"]
    for row in rows:
        assert row["shards"] == 2 and row["scores"] >= 1 and not row["errors"] and row["wrong_answers"] == 0
        services = {"keyservice", "ledger", "shard-0", "shard-1", "coordinator", "gateway", "redis"}
        assert set(row["rss_mb"]) == {"start", "warm", "end"}
        assert all(set(rss) == services for rss in row["rss_mb"].values())
        assert set(row["rss_growth_pct"]["after_warmup"]) == set(row["rss_growth_pct"]["from_start"]) == services
    assert "coordinator" in capsys.readouterr().out
