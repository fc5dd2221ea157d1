"""The anchor-contract Job: `cipherfeed ledger deploy-contract` on a real anvil node over JSON-RPC,
idempotent; a ledger pinned to that contract (CIPHERFEED_ANCHOR_CONTRACT) anchors into it and
never deploys its own; a missing or foreign pinned contract holds the queue, loses nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from eth_account import Account
from web3 import Web3

from cipherfeed.config import REPO_ROOT, ConfigError, LedgerConfig
from services.ledger.anchor import compiled_contract
from services.ledger.server import build_core
from services.ledger.signers import LocalSigner
from tests.test_ledger import ORIGIN, Anvil, ledger_config

DEV_CHAIN_CONFIG = REPO_ROOT / "deploy" / "k8s" / "overlays" / "dev" / "chain-config.yaml"


def deploy(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cipherfeed.cli", "ledger", "deploy-contract"],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.fixture
def anvil(tmp_path):
    node = Anvil(tmp_path / "anvil-state.json")
    node.start()
    yield node
    node.stop()


def test_the_job_deploys_once_at_the_dev_overlays_pinned_address_and_the_ledger_anchors_there(anvil, tmp_path):
    pinned = yaml.safe_load(DEV_CHAIN_CONFIG.read_text())["data"]["CIPHERFEED_ANCHOR_CONTRACT"]
    first = deploy({"CIPHERFEED_CHAIN_RPC_URL": anvil.url})
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result["deployed"] is True
    assert result["contract"] == pinned  # anvil's first account, nonce 0: what the dev overlay pins
    assert "set it to" in first.stderr  # not pinned in this run: told what to pin

    again = deploy({"CIPHERFEED_CHAIN_RPC_URL": anvil.url, "CIPHERFEED_ANCHOR_CONTRACT": pinned})
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {**result, "deployed": False}  # a retried Job deploys nothing
    assert "set it to" not in again.stderr
    w3 = Web3(Web3.HTTPProvider(anvil.url))
    assert w3.eth.get_transaction_count(w3.eth.accounts[0]) == 1

    config = ledger_config(tmp_path, chain_rpc_url=anvil.url, anchor_contract=pinned)
    core = build_core(config, LocalSigner(ORIGIN), background_anchoring=False)
    try:
        core.log.append_many([b"one", b"two", b"three"])
        core.log.checkpoint()
        assert core.anchorer.anchor_pending() == 1
        assert core.anchorer.contract_address == pinned
        contract = w3.eth.contract(address=pinned, abi=compiled_contract()["abi"])
        assert contract.functions.latest().call() == [3, core.log.tree.root(3)]
        assert w3.eth.get_transaction_count(w3.eth.accounts[0]) == 2  # one anchor, no second deployment
    finally:
        core.close()


def test_a_ledger_pinned_to_a_missing_contract_queues_and_deploys_nothing(anvil, tmp_path):
    nowhere = "0x" + "00" * 20
    config = ledger_config(tmp_path, chain_rpc_url=anvil.url, anchor_contract=nowhere)
    core = build_core(config, LocalSigner(ORIGIN), background_anchoring=False)
    try:
        core.log.append_many([b"a"])
        core.log.checkpoint()
        with pytest.raises(RuntimeError, match="no contract at the pinned anchor address"):
            core.anchorer.anchor_pending()
        assert [a.confirmed for a in core.anchors(0)] == [False]  # queued durably, not lost
        w3 = Web3(Web3.HTTPProvider(anvil.url))
        assert w3.eth.get_transaction_count(w3.eth.accounts[0]) == 0
    finally:
        core.close()


def test_a_contract_another_account_owns_is_refused_by_the_job_and_the_ledger(anvil, tmp_path):
    other = Account.create()  # made for this test: no key is ever stored in the repository
    w3 = Web3(Web3.HTTPProvider(anvil.url))
    w3.provider.make_request("anvil_setBalance", [other.address, hex(10**18)])
    key_file = tmp_path / "other.key"
    key_file.write_text(other.key.hex())
    key_file.chmod(0o600)
    theirs = deploy({"CIPHERFEED_CHAIN_RPC_URL": anvil.url, "CIPHERFEED_CHAIN_KEY_FILE": str(key_file)})
    assert theirs.returncode == 0, theirs.stderr
    foreign = json.loads(theirs.stdout)["contract"]

    ours = deploy({"CIPHERFEED_CHAIN_RPC_URL": anvil.url, "CIPHERFEED_ANCHOR_CONTRACT": foreign})
    assert ours.returncode == 1 and "is owned by" in ours.stderr, ours.stderr
    config = ledger_config(tmp_path, chain_rpc_url=anvil.url, anchor_contract=foreign)
    core = build_core(config, LocalSigner(ORIGIN), background_anchoring=False)
    try:
        core.log.append_many([b"a"])
        core.log.checkpoint()
        with pytest.raises(RuntimeError, match="is owned by"):
            core.anchorer.anchor_pending()
        assert [a.confirmed for a in core.anchors(0)] == [False]
    finally:
        core.close()


def test_deploy_contract_needs_a_json_rpc_chain_and_a_well_formed_address(monkeypatch):
    out = deploy({"CIPHERFEED_CHAIN_RPC_URL": ""})
    assert out.returncode == 2 and "CIPHERFEED_CHAIN_RPC_URL" in out.stderr
    for bad in ("0x1234", "5FbDB2315678afecb367f032d93F642f64180aa3", "0x" + "g" * 40):
        monkeypatch.setenv("CIPHERFEED_ANCHOR_CONTRACT", bad)
        with pytest.raises(ConfigError, match="CIPHERFEED_ANCHOR_CONTRACT"):
            LedgerConfig.from_env()
    monkeypatch.setenv("CIPHERFEED_ANCHOR_CONTRACT", "")
    assert LedgerConfig.from_env().anchor_contract is None
