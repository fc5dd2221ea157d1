"""The pages in real headless Chromium against a real mesh on loopback (key service, ledger
anchoring on anvil, recommender, Redis; mutual TLS; real OpenFHE), and the gateway in front of it.

The device's feed page (`cipherfeed ui`) signs in as a dataset user, shows that user's history, the
feed the SDK computes for the same history, and the receipt verified down to the anchor read from
the chain; its server keeps other local pages out (wrong Host, no token, another origin).

The transparency explorer, served by the gateway at /explorer/, verifies the latest checkpoint
against the pasted trust file, shows it anchored (read from anvil by the page), the model versions
and the log, accepts a real receipt and rejects a tampered one, and a lying ledger's proof."""

from __future__ import annotations

import dataclasses
import http.client
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from cipherfeed import cli, trust
from cipherfeed.client import history as history_store
from cipherfeed.client.feedpage import FeedPage
from cipherfeed.client.sdk import RecommenderClient, encrypt_history, encrypt_query
from cipherfeed.client.ui import FeedPageServer, require_loopback
from cipherfeed.devprocess import start_service
from cipherfeed.devredis import free_port
from cipherfeed.v1 import keyservice_pb2
from services.ledger.server import serve as serve_ledger
from services.recommender.server import serve as serve_recommender
from tests.conftest import client_for, mesh_pki, recommender_config
from tests.pages_browser import PageErrors, chromium, screenshot
from tests.test_ledger import Anvil, ledger_config

SIGN_IN_TIMEOUT_MS = 180_000  # CKKS key generation on a loaded 2-core machine
FEED_TIMEOUT_MS = 180_000


@dataclasses.dataclass
class Mesh:
    rec_port: int
    ks_port: int
    ledger_port: int
    chain_url: str
    ledger_core: Any
    rec_core: Any
    trust: trust.TrustAnchors

    def client(self, home):
        c = client_for(self.rec_port, self.ks_port, home)
        c.config = dataclasses.replace(c.config, ledger_target=f"127.0.0.1:{self.ledger_port}")
        return c


@pytest.fixture(scope="module")
def mesh(tiktok_model, keyservice, redis_server, tmp_path_factory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("pages-mesh")
    anvil = Anvil(tmp / "anvil-state.json")
    anvil.start()
    stack: list[tuple[Any, Any]] = []
    try:
        ks_port = keyservice[0]
        config = ledger_config(
            tmp / "ledger", keyservice_target=f"127.0.0.1:{ks_port}", chain_rpc_url=anvil.url,
            checkpoint_every=1, checkpoint_interval=0.2,
        )  # fmt: skip
        ledger, ledger_core = serve_ledger(config)
        stack.append((ledger, ledger_core))
        rec_config = dataclasses.replace(
            recommender_config(tmp / "rec", ks_port, redis_server.config_for("recommender")),
            ledger_target=f"127.0.0.1:{ledger.port}",
        )
        rec, rec_core = serve_recommender(rec_config, tiktok_model)
        stack.append((rec, rec_core))
        operator = client_for(rec.port, ks_port, tmp / "operator")
        with operator:
            anchors = cli.operator_trust(ledger_core, operator)
        yield Mesh(rec.port, ks_port, ledger.port, anvil.url, ledger_core, rec_core, anchors)
    finally:
        for running, core in reversed(stack):
            running.stop(grace=1)
            core.close()
        anvil.stop()


@pytest.fixture(scope="module")
def dataset_user(tiktok_model) -> str:
    """A creator with a few videos: the page seeds the empty history with them."""
    counts = np.bincount(tiktok_model.creator_index, minlength=len(tiktok_model.creator_ids))
    return str(tiktok_model.creator_ids[int(np.flatnonzero(counts >= 4)[3])])


@pytest.fixture(scope="module", params=["grpc", "gateway"])
def feed_page(request, mesh, tmp_path_factory) -> Iterator[FeedPageServer]:
    """The device's page scoring over gRPC, or through the HTTP gateway (one URL for all three
    services, as a browser-side deployment would have it)."""
    home = tmp_path_factory.mktemp(f"ui-device-{request.param}")
    trust.pin_anchors(mesh.trust, home)
    client = mesh.client(home)
    if request.param == "gateway":
        url = request.getfixturevalue("gateway")
        client.close()
        client = RecommenderClient(
            dataclasses.replace(client.config, target=url, keyservice_target=url, ledger_target=url)
        )
    server = FeedPageServer(FeedPage(client, chain_rpc=mesh.chain_url))
    server.start()
    yield server
    server.stop()
    client.close()


def test_the_feed_page_signs_in_shows_history_and_the_sdks_feed_with_a_verified_receipt(
    feed_page, mesh, dataset_user, tmp_path
):
    with chromium() as browser:
        page = browser.new_page()
        errors = PageErrors(page)
        page.goto(feed_page.url)
        page.wait_for_selector("body[data-loaded='true']")
        assert "token=" not in page.url  # the token left the address bar
        page.fill("#user", dataset_user)
        page.click("#signin-device")
        page.wait_for_selector("#status[data-state='signed-in']", timeout=SIGN_IN_TIMEOUT_MS)
        stages = page.inner_text("#stages")
        assert "making a CKKS key pair" in stages and "Sign-In with Ethereum" in stages
        screenshot(page, "feed-signed-in")

        device = feed_page.page
        entries = device.history.entries(dataset_user)
        manifest = device.client.manifest()
        assert sorted(e.item_id for e in entries) == sorted(
            manifest.item_ids[i] for i in manifest.items_of_creator(dataset_user)
        )
        shown_history = page.eval_on_selector_all("#history tr", "rows => rows.map(r => r.dataset.itemId)")
        assert sorted(shown_history) == sorted(e.item_id for e in entries)

        page.fill("#k", "10")
        page.click("#feed-request")
        page.wait_for_selector("body[data-feed='shown']", timeout=FEED_TIMEOUT_MS)
        shown = page.eval_on_selector_all(
            "#feed tr", "rows => rows.map(r => [r.dataset.itemId, Number(r.children[1].textContent)])"
        )
        stats = page.inner_text("#feed-stats")
        assert "ciphertexts" in stats and "KiB of encrypted scores" in stats and "server time" in stats
        page.wait_for_selector("#receipt-status[data-state='verified']", timeout=FEED_TIMEOUT_MS)
        assert "anchored at size" in page.inner_text("#receipt-status")
        screenshot(page, "feed-shown")
        assert not errors.messages, errors.messages

    # The SDK, with its own keys, for the same history: the same feed, scores within CKKS noise.
    sdk = mesh.client(tmp_path / "sdk")
    with sdk:
        sdk.use_keys()
        sdk.register()
        feed, scored = sdk.recommend(history_store.engagements(entries), k=10, per_creator_cap=2)
        assert [item_id for item_id, _ in shown] == [item.item_id for item in feed]
        for (_, score), item in zip(shown, feed, strict=True):
            assert abs(score - float(scored.scores[item.index])) < 1e-4
        # The page reports the upload as blocks x one ciphertext: every history ciphertext has a
        # fresh query's size.
        assert sdk.keys is not None
        one = len(encrypt_query(sdk.keys, np.zeros(sdk.params().embedding_dim)))
        assert {len(b) for b in encrypt_history(sdk.keys, np.ones(manifest.item_count))} == {one}


def _request(server: FeedPageServer, method: str, path: str, headers: dict[str, str], body: Any = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_the_feed_pages_server_answers_only_its_own_page(feed_page):
    host = f"127.0.0.1:{feed_page.port}"
    token = {"X-Cipherfeed-Token": feed_page.token}
    assert _request(feed_page, "GET", "/api/status", {"Host": host, **token})[0] == 200
    assert _request(feed_page, "GET", "/", {"Host": f"localhost:{feed_page.port}"})[0] == 200
    # DNS rebinding: a name the attacker controls, resolving to 127.0.0.1.
    assert _request(feed_page, "GET", "/api/status", {"Host": f"evil.example:{feed_page.port}", **token})[0] == 421
    assert _request(feed_page, "GET", "/", {"Host": "evil.example"})[0] == 421
    # Another local page: no token, a wrong one, or a cross-origin request.
    assert _request(feed_page, "GET", "/api/status", {"Host": host})[0] == 401
    assert _request(feed_page, "GET", "/api/status", {"Host": host, "X-Cipherfeed-Token": "x" * 43})[0] == 401
    status, _ = _request(feed_page, "POST", "/api/signin", {"Host": host, "Origin": "http://evil.example", **token}, {})
    assert status == 403
    cross = {"Host": host, "Sec-Fetch-Site": "cross-site", **token}
    assert _request(feed_page, "POST", "/api/feed", cross, {"k": 5})[0] == 403
    # Bad input gets a precise answer and the server keeps serving.
    status, body = _request(feed_page, "POST", "/api/feed", {"Host": host, **token}, {"k": "ten"})
    assert status == 400 and b"integers" in body
    status, body = _request(feed_page, "GET", "/api/jobs/nope", {"Host": host, **token})
    assert status == 400 and b"no such job" in body
    status, body = _request(feed_page, "POST", "/api/signin", {"Host": host, **token}, {"user": "../etc"})
    assert status == 400
    assert _request(feed_page, "GET", "/api/status", {"Host": host, **token})[0] == 200
    for bad in ("0.0.0.0", "192.168.1.10", "::", "example.com"):
        with pytest.raises(ValueError, match="loopback only"):
            require_loopback(bad)


@pytest.fixture(scope="module")
def gateway(mesh, tmp_path_factory) -> Iterator[str]:
    """The HTTP gateway (its own `gateway` identity over mutual TLS upstream) in front of the mesh."""
    port = free_port()
    env = {
        "CIPHERFEED_GATEWAY_PORT": str(port),
        "CIPHERFEED_TARGET": f"127.0.0.1:{mesh.rec_port}",
        "CIPHERFEED_KEYSERVICE_TARGET": f"127.0.0.1:{mesh.ks_port}",
        "CIPHERFEED_LEDGER_TARGET": f"127.0.0.1:{mesh.ledger_port}",
        **mesh_pki().env("gateway"),
    }
    proc = start_service("gateway", env, log_path=tmp_path_factory.mktemp("gateway") / "gateway.log")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _published_receipt(mesh: Mesh, home, user: str):
    """A real Score's receipt, delivered to the ledger, checkpointed and anchored."""
    sdk = mesh.client(home)
    with sdk:
        sdk.use_keys()
        sdk.register()
        manifest = sdk.manifest()
        own = manifest.items_of_creator(user)
        history = [
            history_store.HistoryEntry(manifest.item_ids[i], "like", 1_700_000_000 - r) for r, i in enumerate(own)
        ]
        _, scored = sdk.recommend(history_store.engagements(history), k=5)
    assert scored.receipt is not None
    assert mesh.rec_core.receipts.flush(timeout=60)
    mesh.ledger_core.log.checkpoint()
    mesh.ledger_core.anchorer.anchor_pending()
    return scored.receipt


def test_the_explorer_verifies_checkpoint_anchors_and_receipts_in_the_page(mesh, gateway, dataset_user, tmp_path):
    receipt = _published_receipt(mesh, tmp_path / "device", dataset_user)
    latest = mesh.ledger_core.latest_checkpoint()
    with chromium() as browser:
        page = browser.new_page()
        errors = PageErrors(page)
        page.goto(f"{gateway}/explorer/?chain={mesh.chain_url}")
        page.wait_for_selector("body[data-loaded='true']")
        page.fill("#trust-input", json.dumps(mesh.trust.to_json(), indent=2))
        page.click("#trust-pin")
        page.wait_for_selector("body[data-ready='true']", timeout=60_000)
        assert mesh.trust.fingerprint in page.inner_text("#trust-status")
        assert page.get_attribute("#checkpoint-status", "data-state") == "verified"
        assert page.inner_text("#checkpoint-size") == str(latest.size)
        assert page.inner_text("#checkpoint-root") == latest.root.hex()
        # The anchored checkpoint, read from the chain by the page: its row, its transaction.
        page.wait_for_selector("#anchors-status[data-state='verified']")
        assert page.get_attribute("#checkpoint-anchored", "data-state") == "anchored"
        row = page.locator(f"#anchors-body tr[data-size='{latest.size}']")
        assert row.get_attribute("data-state") == "verified"
        onchain = [a for a in mesh.ledger_core.anchors(0) if a.size == latest.size]
        assert onchain and row.locator("td").nth(2).get_attribute("title") == "0x" + onchain[0].tx_hash.removeprefix(
            "0x"
        )
        # Model versions and the log: the serving model's record, verified included.
        page.wait_for_selector("#model-logged[data-state='verified']")
        served = page.inner_text("#model-version")
        assert page.get_attribute(f"#models-body tr[data-version='{served}']", "data-state") == "verified"
        assert page.locator("#log-body tr[data-kind='receipt']").count() >= 1
        screenshot(page, "explorer-checkpoint")

        def verify(text: str) -> tuple[str | None, str | None, str]:
            page.fill("#receipt-input", text)
            page.click("#receipt-verify")
            page.wait_for_selector("#receipt-result:not([data-state='working'])")
            el = page.locator("#receipt-result")
            return el.get_attribute("data-state"), el.get_attribute("data-step"), el.inner_text()

        real = json.dumps(dataclasses.asdict(receipt), indent=2)
        state, _, text = verify(real)
        assert state == "verified", text
        assert receipt.receipt_id in page.inner_text("#receipt-details")
        screenshot(page, "explorer-receipt-verified")
        tampered = json.dumps({**dataclasses.asdict(receipt), "unix_millis": receipt.unix_millis + 1})
        state, step, text = verify(tampered)
        assert (state, step) == ("failed", "receipt") and "not in the log" in text
        screenshot(page, "explorer-receipt-rejected")

        # A ledger (or gateway) that lies about the proof: the page's own hashing catches it.
        def flip_proof(route):
            body = route.fetch().json()
            hashes = body["inclusion"]["hashes"]
            hashes[0] = ("A" if hashes[0][0] != "A" else "B") + hashes[0][1:]
            route.fulfill(json=body)

        page.route("**/v1/receipts/**", flip_proof)
        state, step, _ = verify(real)
        assert (state, step) == ("failed", "inclusion")
        page.unroute("**/v1/receipts/**")

        # The next visit checks the new checkpoint is consistent with the one seen before.
        _published_receipt(mesh, tmp_path / "device", dataset_user)
        page.reload()
        page.wait_for_selector("body[data-ready='true']", timeout=60_000)
        assert page.get_attribute("#seen-status", "data-state") == "verified"
        assert f"size {latest.size}" in page.inner_text("#seen-status")
        # The browser logs the tampered receipt's lookup (404: not in the log); nothing else.
        unexpected = [m for m in errors.messages if "status of 404" not in m]
        assert unexpected == [] and len(errors.messages) == 1, errors.messages


def test_an_injected_wallet_signs_in_with_siwe_and_owns_the_key_it_scores_with(mesh, dataset_user, tmp_path):
    from eth_account import Account
    from eth_account.messages import encode_defunct

    wallet = Account.create()
    home = tmp_path / "ui-wallet"
    trust.pin_anchors(mesh.trust, home)
    client = mesh.client(home)
    server = FeedPageServer(FeedPage(client, chain_rpc=mesh.chain_url))
    server.start()
    signed: list[str] = []

    def personal_sign(message_hex: str) -> str:  # the wallet: EIP-191 over the SIWE text it is shown
        text = bytes.fromhex(message_hex.removeprefix("0x")).decode()
        signed.append(text)
        return "0x" + bytes(wallet.sign_message(encode_defunct(text=text)).signature).hex()

    try:
        with chromium() as browser:
            page = browser.new_page()
            errors = PageErrors(page)
            page.expose_function("walletSign", personal_sign)
            page.add_init_script(
                "window.ethereum = { request: async ({ method, params }) => {"
                f"  if (method === 'eth_requestAccounts') return ['{wallet.address.lower()}'];"
                "  if (method === 'personal_sign') return await window.walletSign(params[0]);"
                "  throw new Error('unsupported ' + method); } };"
            )
            page.goto(server.url)
            page.wait_for_selector("body[data-loaded='true']")
            assert page.is_visible("#signin-wallet")
            page.fill("#user", dataset_user)
            page.click("#signin-wallet")
            page.wait_for_selector("#status[data-state='signed-in']", timeout=SIGN_IN_TIMEOUT_MS)
            assert f"wallet account {wallet.address}" in page.inner_text("#status")
            assert len(signed) == 1 and wallet.address in signed[0] and "Chain ID:" in signed[0]
            page.click("#feed-request")
            page.wait_for_selector("body[data-feed='shown']", timeout=FEED_TIMEOUT_MS)
            assert page.locator("#feed tr").count() == 10
            screenshot(page, "feed-wallet")
            assert not errors.messages, errors.messages
        # The key belongs to the wallet: the key service says so, and the device account made none.
        record = client.keyservice.GetKey(keyservice_pb2.GetKeyRequest(key_id=client.key_id), timeout=30)
        assert record.owner == wallet.address
        assert not (home / "keys").exists()
    finally:
        server.stop()
        client.close()
