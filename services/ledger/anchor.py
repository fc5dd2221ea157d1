"""Anchoring checkpoint roots in a Vyper contract on an Ethereum chain, one transaction each.

Checkpoints are queued durably (the ``anchors`` table) and anchored in size order by one worker.
Before sending, the worker asks the contract whether that size is already anchored (a transaction
whose receipt was lost to a crash or an outage is recognised, not resent); the contract itself
refuses non-increasing sizes. While the chain is unreachable the queue waits and the worker retries
with backoff, so nothing is lost and nothing is anchored twice.

Chains: the embedded default is py-evm in process (web3's ``EthereumTesterProvider``); otherwise
any JSON-RPC URL, sending from a local key (``CIPHERFEED_CHAIN_KEY_FILE``) or, on development
nodes such as anvil, from the node's first unlocked account.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from web3 import Web3
from web3.contract import Contract
from web3.types import TxParams

from services.ledger.store import LedgerStore

log = logging.getLogger(__name__)
CONTRACT_SOURCE = Path(__file__).parent / "contracts" / "CheckpointAnchor.vy"


@functools.lru_cache(maxsize=1)
def compiled_contract() -> dict[str, Any]:
    """ABI and bytecode, compiled in process by the vyper package (no download)."""
    import vyper

    return vyper.compile_code(CONTRACT_SOURCE.read_text(), output_formats=["abi", "bytecode"])


@dataclass(frozen=True)
class ChainConfig:
    rpc_url: str | None = None  # None: the in-process py-evm chain
    key_file: Path | None = None  # hex private key; None: the node's first unlocked account
    contract: str | None = None  # anchor only here (deployed beforehand); None: deploy one on first use
    request_timeout: float = 3.0
    receipt_timeout: float = 30.0


def connect(config: ChainConfig) -> tuple[Web3, str]:
    """A web3 connection and the sending account."""
    if config.rpc_url is None:
        w3 = Web3(Web3.EthereumTesterProvider())
        return w3, w3.eth.accounts[0]
    w3 = Web3(Web3.HTTPProvider(config.rpc_url, request_kwargs={"timeout": config.request_timeout}))
    if config.key_file is not None:
        from eth_account import Account
        from web3.middleware import SignAndSendRawMiddlewareBuilder

        account = Account.from_key(config.key_file.read_text().strip())
        w3.middleware_onion.inject(SignAndSendRawMiddlewareBuilder.build(account), layer=0)
        return w3, account.address
    return w3, w3.eth.accounts[0]


def _owned_contract(w3: Web3, address: str, account: str) -> Contract | None:
    """The CheckpointAnchor at ``address`` if it has code and ``account`` owns it; None without code."""
    checksummed = Web3.to_checksum_address(address)
    if not w3.eth.get_code(checksummed):
        return None
    contract = w3.eth.contract(address=checksummed, abi=compiled_contract()["abi"])
    owner = contract.functions.owner().call()
    if owner != account:
        raise RuntimeError(f"the anchor contract {checksummed} is owned by {owner}, not by this account ({account})")
    return contract


def deploy_contract(config: ChainConfig) -> tuple[str, bool]:
    """Deploys CheckpointAnchor from the configured account, unless ``config.contract`` already
    names one that account owns. Returns the address and whether it was deployed now."""
    w3, account = connect(config)
    if config.contract is not None and _owned_contract(w3, config.contract, account) is not None:
        return Web3.to_checksum_address(config.contract), False
    compiled = compiled_contract()
    factory = w3.eth.contract(abi=compiled["abi"], bytecode=compiled["bytecode"])
    tx = factory.constructor().transact(cast(TxParams, {"from": account}))
    receipt = w3.eth.wait_for_transaction_receipt(tx, timeout=config.receipt_timeout)
    if receipt["contractAddress"] is None:
        raise RuntimeError("the deployment's receipt names no contract address")
    return str(receipt["contractAddress"]), True


class Anchorer:
    def __init__(
        self,
        store: LedgerStore,
        config: ChainConfig,
        min_backoff: float = 0.2,
        max_backoff: float = 5.0,
        background: bool = True,
    ) -> None:
        self.store = store
        self.config = config
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._w3: Web3 | None = None
        self._account: str | None = None
        self._contract: Contract | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="ledger-anchor", daemon=True)
        if background:  # tests drive anchor_pending() themselves
            self._thread.start()

    @property
    def contract_address(self) -> str | None:
        return self._contract.address if self._contract is not None else None

    @property
    def chain_id(self) -> str | None:
        return self.store.meta("chain_id")

    def notify(self) -> None:
        self._wake.set()

    def _ensure_contract(self) -> Contract:
        if self._contract is not None:
            return self._contract
        if self._w3 is None:
            self._w3, self._account = connect(self.config)
        w3 = self._w3
        genesis = w3.eth.get_block(0)["hash"].hex()
        chain_id = str(w3.eth.chain_id)
        if self.config.contract is not None:
            return self._pinned_contract(w3, genesis, chain_id)
        compiled = compiled_contract()
        address = self.store.meta("contract")
        if address and self.store.meta("genesis") == genesis and w3.eth.get_code(Web3.to_checksum_address(address)):
            self._contract = w3.eth.contract(address=Web3.to_checksum_address(address), abi=compiled["abi"])
            return self._contract
        if address:
            log.warning(
                "chain %s is not the one the contract was deployed on; deploying anew and re-anchoring", chain_id
            )
            self.store.requeue_all_anchors()
        factory = w3.eth.contract(abi=compiled["abi"], bytecode=compiled["bytecode"])
        tx = factory.constructor().transact(cast(TxParams, {"from": self._account}))
        receipt = w3.eth.wait_for_transaction_receipt(tx, timeout=self.config.receipt_timeout)
        deployed = receipt["contractAddress"]
        if deployed is None:
            raise RuntimeError("the deployment's receipt names no contract address")
        self.store.set_meta("contract", deployed)
        self.store.set_meta("genesis", genesis)
        self.store.set_meta("chain_id", chain_id)
        log.info("deployed the anchor contract at %s on chain %s", deployed, chain_id)
        self._contract = w3.eth.contract(address=deployed, abi=compiled["abi"])
        return self._contract

    def _pinned_contract(self, w3: Web3, genesis: str, chain_id: str) -> Contract:
        """The operator's contract (``CIPHERFEED_ANCHOR_CONTRACT``), never one of our own: until it
        exists and this account owns it, anchoring fails and the queue waits (nothing is lost)."""
        assert self.config.contract is not None and self._account is not None
        contract = _owned_contract(w3, self.config.contract, self._account)
        if contract is None:
            raise RuntimeError(
                f"no contract at the pinned anchor address {self.config.contract} on chain {chain_id}: "
                "run `cipherfeed ledger deploy-contract` (the anchor-contract Job)"
            )
        stored = self.store.meta("contract")
        if stored and (stored != contract.address or self.store.meta("genesis") != genesis):
            log.warning("anchoring into the pinned contract %s now (was %s): re-anchoring", contract.address, stored)
            self.store.requeue_all_anchors()
        self.store.set_meta("contract", contract.address)
        self.store.set_meta("genesis", genesis)
        self.store.set_meta("chain_id", chain_id)
        self._contract = contract
        return contract

    def anchor_pending(self) -> int:
        """Anchors every queued checkpoint in order; returns how many were confirmed."""
        with self._lock:
            contract = self._ensure_contract()
            assert self._w3 is not None
            done = 0
            for row in self.store.anchors(pending_only=True):
                onchain = contract.functions.root_at(row.size).call()
                if onchain == row.root:  # already anchored (receipt lost): confirm, do not resend
                    self._confirm_from_events(contract, row.size)
                    done += 1
                    continue
                latest_size = contract.functions.latest_size().call()
                if latest_size >= row.size:
                    raise RuntimeError(
                        f"contract holds size {latest_size} >= queued {row.size} with another root: not anchoring"
                    )
                tx = contract.functions.anchor(row.root, row.size).transact(cast(TxParams, {"from": self._account}))
                receipt = self._w3.eth.wait_for_transaction_receipt(tx, timeout=self.config.receipt_timeout)
                if receipt["status"] != 1:
                    raise RuntimeError(f"anchor transaction for size {row.size} reverted")
                self.store.confirm_anchor(
                    row.size, str(self._w3.eth.chain_id), contract.address, tx.hex(), receipt["blockNumber"]
                )
                log.info("anchored checkpoint %d in block %d", row.size, receipt["blockNumber"])
                done += 1
            return done

    def _confirm_from_events(self, contract: Contract, size: int) -> None:
        assert self._w3 is not None
        events = contract.events.Anchored().get_logs(from_block=0, argument_filters={"size": size})
        tx, block = (events[0]["transactionHash"].hex(), events[0]["blockNumber"]) if events else ("", 0)
        self.store.confirm_anchor(size, str(self._w3.eth.chain_id), contract.address, tx, block)

    def _loop(self) -> None:
        backoff = self.min_backoff
        while not self._stop.is_set():
            try:
                if self.store.anchors(pending_only=True):
                    self.anchor_pending()
                self.last_error = None
                backoff = self.min_backoff
                self._wake.wait(timeout=1.0)
                self._wake.clear()
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("anchoring failed (%s); retrying in %.1f s", self.last_error[:200], backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    def onchain_root(self, size: int) -> bytes:
        with self._lock:
            return bytes(self._ensure_contract().functions.root_at(size).call())

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
