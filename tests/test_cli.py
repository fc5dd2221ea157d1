"""The command line end to end, as separate processes against a real recommender."""

import os
import stat
import subprocess
import sys

import numpy as np

from cipherfeed.config import REPO_ROOT
from tests.conftest import mesh_pki


def run_cli(*args, env_extra=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **mesh_pki().env("device"), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "cipherfeed.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def feed_rows(stdout: str) -> list[list[str]]:
    lines = [line.split() for line in stdout.strip().splitlines()]
    assert lines[0][:3] == ["#", "creator", "video"]
    return lines[1:]


def targets(recommender, keyservice):
    return ["--target", f"127.0.0.1:{recommender[0]}", "--keyservice", f"127.0.0.1:{keyservice[0]}"]


def test_recommend_for_a_dataset_user(recommender, keyservice, tiktok_model, tmp_path):
    user = tiktok_model.creator_ids[42]
    home = tmp_path / "home"
    first = run_cli(*targets(recommender, keyservice), "--home", str(home), "recommend", "--user", user, "-k", "8")
    assert first.returncode == 0, first.stderr
    assert "generated a CKKS key pair" in first.stderr
    rows = feed_rows(first.stdout)
    assert len(rows) == 8
    own = {tiktok_model.item_ids[i] for i in np.flatnonzero(tiktok_model.creator_index == 42)}
    assert not own & {row[2] for row in rows}  # seen items are dropped
    creators = [row[1] for row in rows]
    assert max(creators.count(c) for c in creators) <= 2
    secret = home / "keys" / "secret.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "keys").stat().st_mode) == 0o700
    # The second run reuses the stored keys and gives the same feed.
    second = run_cli(*targets(recommender, keyservice), "--home", str(home), "recommend", "--user", user, "-k", "8")
    assert second.returncode == 0 and "generated" not in second.stderr
    assert feed_rows(second.stdout) == rows


def test_unknown_user_and_unreachable_server_fail_clearly(recommender, keyservice, tmp_path):
    unknown = run_cli(*targets(recommender, keyservice), "--home", str(tmp_path), "recommend", "--user", "nobody-here")
    assert unknown.returncode == 2 and "not in the catalogue" in unknown.stderr
    down = run_cli(
        "--target",
        "127.0.0.1:1",
        "--home",
        str(tmp_path),
        "recommend",
        "--user",
        "x",
        env_extra={"CIPHERFEED_DEADLINE_SECONDS": "3"},
    )
    assert down.returncode == 3 and "UNAVAILABLE" in down.stderr


def test_unsafe_key_file_is_refused(recommender, keyservice, tiktok_model, tmp_path):
    home = tmp_path / "home"
    ok = run_cli(*targets(recommender, keyservice), "--home", str(home), "keys", "init")
    assert ok.returncode == 0, ok.stderr
    again = run_cli(*targets(recommender, keyservice), "--home", str(home), "keys", "init")
    assert again.returncode == 1 and "--force" in again.stderr
    os.chmod(home / "keys" / "secret.key", 0o644)
    refused = run_cli(
        *targets(recommender, keyservice),
        "--home",
        str(home),
        "recommend",
        "--user",
        tiktok_model.creator_ids[0],
    )
    assert refused.returncode == 2 and "readable by others" in refused.stderr


def test_demo_runs_the_whole_path(tmp_path, dataset_path):
    demo = run_cli(
        "demo",
        "--user",
        "a.r.m.y664",
        env_extra={"CIPHERFEED_STATE_DIR": str(tmp_path), "CIPHERFEED_DATASET": str(dataset_path)},
    )
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert len(feed_rows(demo.stdout)) == 10
    assert "top-10 identical: True" in demo.stderr
    assert "verified: leaf" in demo.stderr and "anchored on chain" in demo.stderr
    assert list((tmp_path / "models").glob("*.cfmodel"))


def test_serve_starts_a_service_that_answers(tmp_path):
    from cipherfeed.devprocess import start_service
    from cipherfeed.devredis import free_port

    port = free_port()
    proc = start_service(
        "cipherfeed.cli",
        {
            "CIPHERFEED_LEDGER_LISTEN": f"127.0.0.1:{port}",
            "CIPHERFEED_LEDGER_DSN": f"sqlite:///{tmp_path / 'ledger.db'}",
            "CIPHERFEED_LEDGER_SIGNER": "local",
            "CIPHERFEED_STATE_DIR": str(tmp_path),
            **mesh_pki().env("ledger"),
        },
        args=["serve", "ledger"],
    )
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with mesh_pki().channel(port, "ledger", "operator") as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="cipherfeed.v1.Ledger"), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_feed_table_never_prints_a_manifest_s_control_characters():
    # a hostile recommender's manifest: an OSC title set, an OSC 52 clipboard write and a line
    # erase in a creator id, an SGR sequence in an item id, a bidi override; all reached the
    # terminal raw through print_feed
    import io

    from cipherfeed import manifest
    from cipherfeed.cli import print_feed

    evil = "\x1b]0;pwned\x07\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b[2K\rinnocent\u202e\x9b"
    data = manifest.encode(
        "v" * 64, ["1", "2\x1b[31mRED"], np.array([0, 0]), [evil], ["nick"], np.array([0, 0]), np.array([0.0, 0.0])
    )
    decoded = manifest.decode(data)
    out = io.StringIO()
    print_feed([decoded.item(0), decoded.item(1)], out)
    text = out.getvalue()
    assert not any((ord(ch) < 0x20 and ch != "\n") or 0x7F <= ord(ch) < 0xA0 or ch == "\u202e" for ch in text), repr(
        text
    )
    assert "innocent" in text and "[31mRED" in text  # the printable rest is kept
