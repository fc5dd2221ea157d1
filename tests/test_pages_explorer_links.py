"""A link cannot change the explorer's chain node behind the user's back (an attack review's
finding: one visit to ``/explorer/?chain=<another node>`` with a pinned trust file verified
against that node at once and stored it for good). Headless Chromium on a real gateway process.
"""

from __future__ import annotations

import json

from cipherfeed import trust
from tests.pages_browser import chromium
from tests.test_gateway import start_gateway, stop
from tests.test_gateway_hardening import free_port
from tests.test_pages_js import _signer

CHAIN_KEY = "cipherfeed.explorer.chain"
USERS_NODE = "http://127.0.0.1:8545"
OTHER_NODE = "http://attacker.example:8545"


def test_a_chain_in_a_link_is_shown_unconfirmed_and_never_stored_without_a_click() -> None:
    dead = free_port()  # the ledger's answers do not matter here: only which node the page keeps
    proc, port = start_gateway(dead, dead, dead)
    _, _, vkey = _signer("cipherfeed.test/ledger")
    anchors = trust.TrustAnchors(
        log_origin="cipherfeed.test/ledger",
        checkpoint_vkeys=(vkey,),
        chain_id=31337,
        anchor_contract=trust.checksum_address("0x" + "5a" * 20),
    )
    base = f"http://127.0.0.1:{port}/explorer/"
    try:
        with chromium() as browser:
            page = browser.new_page()
            page.goto(base)
            page.wait_for_selector("body[data-loaded='true']")
            page.fill("#chain-url", USERS_NODE)
            page.fill("#trust-input", json.dumps(anchors.to_json()))
            page.click("#trust-pin")  # the user's choice, confirmed by the click
            page.wait_for_function(f"localStorage.getItem('{CHAIN_KEY}') === '{USERS_NODE}'")

            page.goto(f"{base}?chain={OTHER_NODE}")
            page.wait_for_selector("body[data-loaded='true']")
            assert page.input_value("#chain-url") == OTHER_NODE  # shown,
            status = page.inner_text("#checkpoint-status")
            assert f"chain node {OTHER_NODE}" in status and "press refresh" in status  # unconfirmed,
            assert page.get_attribute("body", "data-ready") is None  # not used to verify,
            assert page.evaluate(f"localStorage.getItem('{CHAIN_KEY}')") == USERS_NODE  # and not stored

            page.goto(base)  # a plain visit is back on the user's node
            page.wait_for_selector("body[data-loaded='true']")
            assert page.input_value("#chain-url") == USERS_NODE

            page.goto(f"{base}?chain={OTHER_NODE}")
            page.wait_for_selector("body[data-loaded='true']")
            page.click("#refresh")  # the user confirms the link's node: now it is theirs
            page.wait_for_function(f"localStorage.getItem('{CHAIN_KEY}') === '{OTHER_NODE}'")
    finally:
        stop(proc)
