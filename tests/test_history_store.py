"""The device's engagement store: private files, durable appends, strict reads, the CLI."""

import os
import stat

import numpy as np
import pytest

from cipherfeed.client.history import HistoryEntry, HistoryError, HistoryStore, engagements
from cipherfeed.client.interest import history_weights
from cipherfeed.manifest import decode, encode
from tests.test_cli import run_cli, targets


def test_entries_are_private_durable_and_ordered(tmp_path):
    store = HistoryStore(tmp_path / "history")
    assert store.entries("alice") == []
    store.add("alice", [HistoryEntry("2", "like", 20), HistoryEntry("1", "watch", 10)])
    store.add("alice", [HistoryEntry("3", "comment", 30)])
    assert [e.item_id for e in store.entries("alice")] == ["1", "2", "3"]
    assert stat.S_IMODE(store.path("alice").stat().st_mode) == 0o600
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    assert store.users() == ["alice"] and store.entries("bob") == []
    history = engagements(store.entries("alice"))
    assert [e.item_id for e in history] == ["3", "2", "1"]  # newest first
    assert [e.recency_rank for e in history] == [0, 1, 2]
    assert history[0].commented and history[1].liked and history[2].watched == 1.0
    assert store.clear("alice") and not store.clear("alice") and store.entries("alice") == []


def test_a_readable_file_bad_names_and_bad_records_are_refused(tmp_path):
    store = HistoryStore(tmp_path)
    for name in ("", "../etc", ".hidden", "-rf", "a/b", "x" * 129):
        with pytest.raises(HistoryError):
            store.path(name)
    with pytest.raises(HistoryError):
        HistoryEntry("1", "share", 0)
    store.add("u", [HistoryEntry("1", "watch", 1)])
    os.chmod(store.path("u"), 0o644)
    with pytest.raises(HistoryError, match="readable by others"):
        store.entries("u")
    with pytest.raises(HistoryError, match="readable by others"):
        store.add("u", [HistoryEntry("2", "watch", 2)])
    os.chmod(store.path("u"), 0o600)
    with store.path("u").open("a") as fh:
        fh.write('{"item_id": "2"}\n')
    with pytest.raises(HistoryError, match=":2: malformed"):
        store.entries("u")


def test_an_append_cut_short_by_a_crash_is_not_history_and_does_not_break_the_next(tmp_path):
    store = HistoryStore(tmp_path)
    store.add("u", [HistoryEntry("1", "watch", 1)])
    with store.path("u").open("a") as fh:
        fh.write('{"item_id":"2","ki')  # the process died here: that add never returned
    assert [e.item_id for e in store.entries("u")] == ["1"]
    store.add("u", [HistoryEntry("3", "like", 3)])
    assert [e.item_id for e in store.entries("u")] == ["1", "3"]


def test_weights_over_catalogue_indices_come_from_the_manifest():
    ids = ["10", "11", "12", "13"]
    m = decode(encode("a" * 64, ids, np.zeros(4), ["c"], ["n"], np.zeros(4), np.zeros(4)))
    entries = [HistoryEntry("12", "like", 2), HistoryEntry("10", "watch", 1), HistoryEntry("99", "like", 3)]
    w = history_weights(engagements(entries), m.index_of, m.item_count)
    assert w.shape == (4,) and w[1] == w[3] == 0 and w.sum() == pytest.approx(1.0)
    # "99" (not in this model's catalogue) is newest, so "12" is rank 1 and "10" rank 2.
    assert w[2] / w[0] == pytest.approx((3 / 1.1) / (1 / 1.2))
    with pytest.raises(ValueError, match="no engagement"):
        history_weights(engagements([HistoryEntry("99", "like", 1)]), m.index_of, m.item_count)


def test_history_cli_add_show_clear(recommender, keyservice, tiktok_model, tmp_path):
    home = ["--home", str(tmp_path)]
    net = targets(recommender, keyservice)
    by_id = run_cli(*net, *home, "history", "add", "--user", "me", tiktok_model.item_ids[7], "--kind", "like")
    assert by_id.returncode == 0, by_id.stderr
    by_index = run_cli(
        *net, *home, "history", "add", "--user", "me", "--index", "5", "9", "--at", "2024-01-02T03:04:05"
    )
    assert by_index.returncode == 0, by_index.stderr
    shown = run_cli(*home, "history", "show", "--user", "me")  # no server needed
    assert shown.returncode == 0, shown.stderr
    rows = [line.split() for line in shown.stdout.splitlines()]
    assert [r[-1] for r in rows] == [tiktok_model.item_ids[i] for i in (5, 9, 7)]
    assert rows[0][:3] == ["2024-01-02", "03:04:05Z", "watch"] and rows[2][2] == "like"
    unknown = run_cli(*net, *home, "history", "add", "--user", "me", "no-such-video")
    assert unknown.returncode == 2 and "not in the catalogue" in unknown.stderr
    outside = run_cli(*net, *home, "history", "add", "--user", "me", "--index", str(tiktok_model.item_count))
    assert outside.returncode == 2 and "not a catalogue index" in outside.stderr
    assert run_cli(*home, "history", "clear", "--user", "me").returncode == 0
    assert run_cli(*home, "history", "show", "--user", "me").stdout == ""


def test_recommend_seeds_the_device_history_with_the_creators_videos(recommender, keyservice, tiktok_model, tmp_path):
    user = tiktok_model.creator_ids[11]
    ran = run_cli(*targets(recommender, keyservice), "--home", str(tmp_path), "recommend", "--user", user, "-k", "4")
    assert ran.returncode == 0, ran.stderr
    assert "seeded with the creator's own videos" in ran.stderr
    stored = HistoryStore(tmp_path / "history").entries(user)
    own = [tiktok_model.item_ids[i] for i in np.flatnonzero(tiktok_model.creator_index == 11)]
    assert sorted(e.item_id for e in stored) == sorted(own) and {e.kind for e in stored} == {"like"}
