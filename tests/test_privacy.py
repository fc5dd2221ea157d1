"""No request carries a history or feed item: the whole mesh's inbound traffic, recorded.

Real key service, ledger (signing through the key service, anchoring on py-evm) and recommender
on loopback, each with a recording server interceptor placed before any other (so it also sees
what an authorization interceptor would refuse). Recorded: the exact request bytes as they
arrived (the deserializer's input) and the responses' bytes (what a client may echo back).
A device runs ``recommend()`` for five dataset users with histories from its own store, then
verifies every receipt down to the anchor, as ``cipherfeed demo`` does. Then every request to
every service, service-to-service calls included (key state and eval keys, receipt batches =
the ledger's leaves, checkpoint signing), every Redis key and value, and every log line are
searched for every history and feed item (encodings: tests/test_privacy_scan.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import grpc
import numpy as np
import pytest

from cipherfeed.cli import AnchorerChain, device_history, operator_trust
from cipherfeed.client import history as history_store
from cipherfeed.client.history import HistoryEntry, HistoryStore
from cipherfeed.client.verify import fetch_and_verify
from cipherfeed.devredis import LocalRedis
from cipherfeed.v1 import ledger_pb2_grpc
from services.keyservice.server import serve as serve_keyservice
from services.ledger.server import serve as serve_ledger
from services.recommender.server import serve as serve_recommender
from tests.conftest import client_for, keyservice_config, recommender_config
from tests.test_ledger import ledger_config
from tests.test_privacy_scan import Echoes, Finding, Secrets, find_item_ids, scan_request, scan_text

USERS = 5


class RecordingInterceptor(grpc.ServerInterceptor):
    """Keeps every request's and response's serialized bytes, per service."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes]] = []
        self.responses: list[tuple[str, bytes]] = []
        self.old_sdk_requests: list[tuple[str, bytes]] = []  # the control: what the SDK did before
        self.phase = "sdk"
        self._lock = threading.Lock()

    def _keep(self, into: list, method: str, data: bytes) -> None:
        with self._lock:
            if self.phase == "old-sdk" and into is self.requests:
                into = self.old_sdk_requests
            into.append((method, bytes(data)))

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        deserialize, serialize = handler.request_deserializer, handler.response_serializer

        def recorded_request(data: bytes):
            self._keep(self.requests, method, data)
            return deserialize(data) if deserialize else data

        def recorded_response(message) -> bytes:
            data = serialize(message) if serialize else message
            self._keep(self.responses, method, data)
            return data

        return handler._replace(request_deserializer=recorded_request, response_serializer=recorded_response)


@dataclasses.dataclass
class Run:
    recorder: RecordingInterceptor
    secrets: Secrets
    redis: LocalRedis
    logs: list[str]
    feeds: dict[str, list[int]]
    histories: dict[str, list[int]]


@pytest.fixture(scope="module")
def private_run(tiktok_model, master_key_file, tmp_path_factory) -> Run:
    tmp = tmp_path_factory.mktemp("privacy")
    recorder = RecordingInterceptor()
    real_server = grpc.server

    def recording_server(*args, interceptors=(), **kwargs):
        return real_server(*args, interceptors=[recorder, *interceptors], **kwargs)

    logs: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: logs.append(record.getMessage())  # type: ignore[method-assign]
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    cache = LocalRedis.start()
    stack = []
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(grpc, "server", recording_server)
            ks, ks_core = serve_keyservice(
                keyservice_config(tmp / "ks", master_key_file, cache.config_for("keyservice"))
            )
            stack.append((ks, ks_core))
            ledger, ledger_core = serve_ledger(
                ledger_config(tmp / "ledger", keyservice_target=f"127.0.0.1:{ks.port}"), background_anchoring=False
            )
            stack.append((ledger, ledger_core))
            config = dataclasses.replace(
                recommender_config(tmp / "rec", ks.port, cache.config_for("recommender")),
                ledger_target=f"127.0.0.1:{ledger.port}",
            )
            rec, rec_core = serve_recommender(config, tiktok_model)
            stack.append((rec, rec_core))
        client = client_for(rec.port, ks.port, tmp / "device")
        client.config = dataclasses.replace(client.config, ledger_target=f"127.0.0.1:{ledger.port}")
        m = tiktok_model
        ids, indices, feeds, histories, receipts = set(), set(), {}, {}, []
        with client:
            client.use_keys()
            client.register()
            manifest = client.manifest()
            for row in np.linspace(7, len(m.creator_ids) - 8, USERS).astype(int):
                user = m.creator_ids[row]
                history, seeded = device_history(client, user)  # the CLI's path: the device store
                assert seeded and history
                feed, scored = client.recommend(history, k=10, per_creator_cap=2)
                assert len(feed) == 10 and scored.receipt is not None
                receipts.append(scored)
                histories[user] = [manifest.index_of[e.item_id] for e in history]
                feeds[user] = [item.index for item in feed]
                ids |= {e.item_id for e in history} | {item.item_id for item in feed}
                indices |= set(histories[user]) | set(feeds[user])
            # The same user again: scored by reference, no upload. Then the user comments on
            # the top video of that feed (the device store), and the changed history goes up.
            uploads = sum(m_.endswith("/UploadHistory") for m_, _ in recorder.requests)
            again, _ = client.recommend(history, k=10, per_creator_cap=2)
            assert [i.index for i in again] == feeds[user]
            assert sum(m_.endswith("/UploadHistory") for m_, _ in recorder.requests) == uploads
            store = HistoryStore(client.config.home / "history")
            store.add(user, [HistoryEntry(feed[0].item_id, "comment", history_store.now())])
            history = history_store.engagements(store.entries(user))
            changed, _ = client.recommend(history, k=10, per_creator_cap=2)
            assert sum(m_.endswith("/UploadHistory") for m_, _ in recorder.requests) == uploads + 1
            assert feed[0].index not in [i.index for i in changed]  # now seen
            histories[user] = [manifest.index_of[e.item_id] for e in history]
            feeds[user + " (after a comment)"] = [i.index for i in changed]
            ids |= {item.item_id for item in changed}
            indices |= {item.index for item in changed}
            rec_core.receipts.flush(timeout=30)
            ledger_core.log.checkpoint()
            ledger_core.anchorer.anchor_pending()
            stub = ledger_pb2_grpc.LedgerStub(client.ledger_channel())
            trust = operator_trust(ledger_core, client)
            for scored in receipts:
                fetch_and_verify(
                    scored.receipt_id,
                    stub,
                    trust,
                    AnchorerChain(ledger_core.anchorer),
                    30,
                    scored.receipt,
                )
            # The control: the calls the SDK made before issue 9 (embeddings of the history by
            # id, display fields of the feed by index), recorded apart.
            recorder.phase = "old-sdk"
            for seen in histories.values():
                client.items(item_ids=[manifest.item_ids[i] for i in seen])
            for shown in feeds.values():
                client.items(indices=shown)
        assert {i for i in indices} == {m.item_ids.index(i) for i in ids}
        return Run(recorder, Secrets(frozenset(ids), frozenset(indices)), cache, logs, feeds, histories)
    finally:
        for server, core in reversed(stack):
            server.stop(grace=1)
            core.close()
        root.removeHandler(handler)
        root.setLevel(old_level)
        # The cache is scanned after the servers stop: keep it until the module ends.
        _CACHES.append(cache)


_CACHES: list[LocalRedis] = []


@pytest.fixture(scope="module", autouse=True)
def _stop_caches():
    yield
    for cache in _CACHES:
        cache.stop()


def _report(findings: list[Finding]) -> str:
    """One line per place and kind of leak: how often, and the first example."""
    groups: dict[tuple[str, str], list[Finding]] = {}
    for f in findings:
        groups.setdefault((f.where, f.what.split(" ")[0] + " " + f.what.split(" ")[-1]), []).append(f)
    return "\n".join(f"{len(g)} x {g[0]}" for g in groups.values())


def test_no_request_to_any_service_carries_a_history_or_feed_item(private_run):
    run = private_run
    methods = {method.split("/")[1] for method, _ in run.recorder.requests}
    # Every service was exercised, including the service-to-service calls.
    assert {"cipherfeed.v1.Recommender", "cipherfeed.v1.KeyService", "cipherfeed.v1.Ledger"} <= methods
    assert any(m.endswith("/AppendBatch") for m, _ in run.recorder.requests)  # the ledger's leaves
    assert any(m.endswith("/Sign") for m, _ in run.recorder.requests)  # checkpoint signing
    assert any(m.endswith("/UploadHistory") for m, _ in run.recorder.requests)  # the encrypted path
    assert not any(m.endswith("/GetItems") for m, _ in run.recorder.requests)
    echoes = Echoes()
    for method, data in run.recorder.responses:
        echoes.add_response(method, data)
    findings = [f for method, data in run.recorder.requests for f in scan_request(method, data, run.secrets, echoes)]
    assert not findings, "items reached a server:\n" + _report(findings)


def test_the_scan_finds_what_the_sdk_sent_before_issue_9(private_run):
    run = private_run
    echoes = Echoes()
    for method, data in run.recorder.responses:
        echoes.add_response(method, data)
    findings = [
        f for method, data in run.recorder.old_sdk_requests for f in scan_request(method, data, run.secrets, echoes)
    ]
    history_ids = sum(len(h) for h in run.histories.values())
    assert sum("as text" in f.what for f in findings) == history_ids
    assert {i for f in findings for i in f.indices} == {i for feed in run.feeds.values() for i in feed}


def test_the_cache_and_the_logs_hold_no_history_or_feed_item(private_run):
    run = private_run
    r = run.redis.client()  # as admin: everything there is
    keys = list(r.scan_iter(count=1000))
    echoes = Echoes()
    for method, data in run.recorder.responses:
        echoes.add_response(method, data)
    assert any(k.startswith(b"cf:result:") for k in keys)  # results were cached: there was something to see
    findings = []
    for key in keys:
        findings += find_item_ids(key, run.secrets, f"redis key {key[:40]!r}")
        findings += [f for f in scan_text("redis key", [key.decode()], run.secrets)]
        # cf:<kind>:<hex ids and digests, server-issued tokens, key versions>: nothing else
        # (cf:history:<ref> holds a history's E(w), cf:profile:<ref> its E(u)).
        prefix, kind, *parts = key.decode().split(":")
        assert prefix == "cf" and kind in {"evalkeys", "keystate", "profile", "history", "result"}, key
        for part in parts:
            if part.isdigit():
                if int(part) in run.secrets.indices and int(part) not in echoes.ints:
                    findings.append(Finding(f"redis key {key[:40]!r}", f"catalogue index {part}"))
            elif part not in echoes.tokens:
                findings.append(Finding(f"redis key {key[:40]!r}", f"{part[:24]!r} is no token a server issued"))
        value = r.get(key)
        if value is not None:
            findings += find_item_ids(value, run.secrets, f"redis value of {key[:40]!r}")
    findings += scan_text("server log", run.logs, run.secrets)
    assert run.logs and not findings, _report(findings)
