"""`cipherfeed verify` believes only the trust file the device pinned: another contract, another
origin, an unlisted key or another chain is refused at its step with its exit status; a saved copy
that is malformed or missing, and an upper-case id, end in a precise one-line answer, never a
traceback. Real ledgers on loopback anchoring on a real anvil node."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cipherfeed import cli, trust
from cipherfeed.checkpoint import vkey
from cipherfeed.client.verify import (
    AnchorEvidence,
    VerificationError,
    chain_anchors,
    parse_saved_receipt,
)
from cipherfeed.receipts import Receipt
from services.ledger.server import serve as serve_ledger
from services.ledger.signers import LocalSigner
from tests.conftest import mesh_pki
from tests.test_ledger import Anvil, ledger_config

ORIGIN = "cipherfeed.test/ledger"


@dataclasses.dataclass
class Ledger:
    port: int
    core: object
    signer: LocalSigner

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def publish(self, receipts: list[Receipt]) -> None:
        self.core.append(receipts)
        self.core.log.checkpoint()
        self.core.anchorer.anchor_pending()

    def trust(self, *signers: LocalSigner) -> trust.TrustAnchors:
        anchorer = self.core.anchorer
        return trust.TrustAnchors(
            log_origin=ORIGIN,
            checkpoint_vkeys=tuple(vkey(s.name, s.public_key) for s in signers or (self.signer,)),
            chain_id=int(anchorer.chain_id),
            anchor_contract=trust.checksum_address(anchorer.contract_address),
        )


def receipt(n: int) -> Receipt:
    return Receipt(f"{n:064x}", f"{n + 1:064x}", "ab" * 32, "cd" * 32, 1, 1_700_000_000_000 + n)


@pytest.fixture(autouse=True)
def device_identity(monkeypatch):
    """The CLI calls the ledger over mutual TLS as a device, configured from the environment."""
    for name, value in mesh_pki().env("device").items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    anvil = Anvil(tmp_path_factory.mktemp("anvil") / "state.json")
    anvil.start()
    yield anvil
    anvil.stop()


@pytest.fixture(scope="module")
def ledgers(chain, tmp_path_factory):
    """The operator's ledger, and impostors on the same chain, each with its own contract."""
    made: list[tuple[object, object]] = []

    def ledger(name: str, signer: LocalSigner, origin: str = ORIGIN) -> Ledger:
        config = ledger_config(tmp_path_factory.mktemp(name), origin=origin, chain_rpc_url=chain.url)
        running, core = serve_ledger(config, signer=signer, background_anchoring=False)
        made.append((running, core))
        return Ledger(running.port, core, signer)

    operator = ledger("operator", LocalSigner(ORIGIN))
    genuine = [receipt(n) for n in range(5)]
    operator.publish(genuine)
    # Holds the operator's signing key (a stolen key, or a proxy) but anchors in its own contract.
    same_key = ledger("same-key", operator.signer)
    same_key.publish([*genuine, receipt(99)])
    own_key = ledger("own-key", LocalSigner(ORIGIN))
    own_key.publish(genuine)
    other_origin = ledger("other-origin", LocalSigner("evil.example/ledger"), origin="evil.example/ledger")
    other_origin.publish(genuine)
    rotating = ledger("rotating", LocalSigner(ORIGIN))
    rotating.publish(genuine)
    yield dict(operator=operator, same_key=same_key, own_key=own_key, other_origin=other_origin, rotating=rotating,
               receipts=genuine)  # fmt: skip
    for running, core in made:
        running.stop(grace=1)
        core.close()


def pinned_home(tmp_path: Path, anchors: trust.TrustAnchors, saved: list[Receipt]) -> Path:
    home = tmp_path / "client"
    published = tmp_path / "operator-trust.json"
    trust.write(anchors, published)
    assert cli.main(["--home", str(home), "trust", "init", str(published)]) == 0
    for r in saved:
        cli.save_receipt(home, r)
    return home


def verify(capsys, home: Path, ledger: Ledger, receipt_id: str, *extra: str, chain_url: str | None = None):
    args = ["--home", str(home), "verify", receipt_id, "--ledger", ledger.target]
    args += ["--chain-rpc", chain_url] if chain_url else []
    capsys.readouterr()
    status = cli.main([*args, *extra])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return status, out.out, out.err


def test_the_pinned_ledger_verifies_on_chain_and_impostors_fail_at_their_step(ledgers, chain, tmp_path, capsys):
    operator, genuine = ledgers["operator"], ledgers["receipts"]
    home = pinned_home(tmp_path, operator.trust(), genuine)
    rid = genuine[2].receipt_id
    status, out, err = verify(capsys, home, operator, rid, chain_url=chain.url)
    assert status == 0, err
    assert "read on chain" in out and "equals the copy kept here" in out
    assert operator.trust().anchor_contract in out
    # The attack: a ledger with its own contract on the same chain, even one signing with
    # the operator's key. Read on chain, the pinned contract does not hold its root...
    status, _, err = verify(capsys, home, ledgers["same_key"], rid, chain_url=chain.url)
    assert status == 13 and "failed at anchor: no anchor on chain at or after size 6" in err
    # ...and taken from the ledger, its anchors are in a contract the trust file does not pin.
    status, _, err = verify(capsys, home, ledgers["same_key"], rid, "--trust-ledger-anchors")
    assert status == 13 and "the trust file pins" in err
    # Another key (not listed), or another origin: the signature step.
    status, _, err = verify(capsys, home, ledgers["own_key"], rid, chain_url=chain.url)
    assert status == 12 and "no signature by a trusted key" in err
    status, _, err = verify(capsys, home, ledgers["other_origin"], rid, chain_url=chain.url)
    assert status == 12 and "signature" in err


def test_a_new_checkpoint_key_counts_only_once_the_trust_file_lists_it(ledgers, chain, tmp_path, capsys):
    operator, genuine = ledgers["rotating"], ledgers["receipts"]
    home = pinned_home(tmp_path, operator.trust(), genuine)
    rid = genuine[0].receipt_id
    rotated = LocalSigner(ORIGIN, Ed25519PrivateKey.generate())
    old = operator.signer
    operator.core.log.signer = rotated  # the operator rotates its checkpoint key
    try:
        operator.publish([receipt(7)])  # the receipts' covering checkpoint is now signed by the new key
        assert verify(capsys, home, operator, rid, chain_url=chain.url)[0] == 12
        published = tmp_path / "operator-trust-2.json"
        trust.write(operator.trust(old, rotated), published)
        assert cli.main(["--home", str(home), "trust", "init", str(published)]) == 1  # no silent replacement
        assert "--force" in capsys.readouterr().err
        assert cli.main(["--home", str(home), "trust", "init", str(published), "--force"]) == 0
        assert verify(capsys, home, operator, rid, chain_url=chain.url)[0] == 0
    finally:
        operator.core.log.signer = old


def test_another_contract_or_chain_in_the_trust_file_fails_at_the_anchor(ledgers, chain, tmp_path, capsys):
    operator, genuine = ledgers["operator"], ledgers["receipts"]
    elsewhere = dataclasses.replace(operator.trust(), anchor_contract=trust.checksum_address("0x" + "11" * 20))
    home = pinned_home(tmp_path, elsewhere, genuine)
    status, _, err = verify(capsys, home, operator, genuine[1].receipt_id, chain_url=chain.url)
    assert status == 13 and "reading" in err and len(err.strip().splitlines()) == 1
    wrong_chain = dataclasses.replace(operator.trust(), chain_id=operator.trust().chain_id + 1)
    with pytest.raises(VerificationError, match="not the pinned") as failed:
        chain_anchors(cli.Web3Chain(chain.url), wrong_chain)(5)
    assert failed.value.exit_code == 13


def test_saved_copies_and_receipt_ids_get_precise_answers(ledgers, chain, tmp_path, capsys):
    operator, genuine = ledgers["operator"], ledgers["receipts"]
    home = pinned_home(tmp_path, operator.trust(), genuine[:3])
    r = genuine[0]
    path = home / "receipts" / f"{r.receipt_id}.json"
    fields = dataclasses.asdict(r)
    for broken in ({**fields, "extra": 1}, {k: v for k, v in fields.items() if k != "key_version"},
                   {**fields, "key_version": "1"}, [1, 2]):  # fmt: skip
        path.write_text(json.dumps(broken))
        status, _, err = verify(capsys, home, operator, r.receipt_id, chain_url=chain.url)
        assert status == 10 and "saved copy" in err and len(err.strip().splitlines()) == 1
    path.write_text("{not json")
    assert verify(capsys, home, operator, r.receipt_id, chain_url=chain.url)[0] == 10
    # An upper-case id is the same receipt.
    status, out, _ = verify(capsys, home, operator, genuine[1].receipt_id.upper(), chain_url=chain.url)
    assert status == 0 and genuine[1].receipt_id in out
    status, _, err = verify(capsys, home, operator, "zz" * 32, chain_url=chain.url)
    assert status == 10 and "64 hexadecimal digits" in err
    # No local copy: refused unless the user says so, and then the output says it was not compared.
    missing = genuine[4].receipt_id
    status, _, err = verify(capsys, home, operator, missing, chain_url=chain.url)
    assert status == 10 and "--no-local-copy" in err
    status, out, _ = verify(capsys, home, operator, missing, "--no-local-copy", chain_url=chain.url)
    assert status == 0 and "NOT compared" in out


def test_without_a_pinned_trust_file_verify_refuses(ledgers, tmp_path, capsys):
    status, _, err = verify(capsys, tmp_path / "empty", ledgers["operator"], ledgers["receipts"][0].receipt_id)
    assert status == 2 and "trust init" in err


def flip_case(address: str) -> str:
    """The same address with one letter's case flipped: it fails its EIP-55 checksum."""
    i = next(i for i, c in enumerate(address) if i > 1 and c.isalpha())
    return address[:i] + address[i].swapcase() + address[i + 1 :]


def test_trust_files_are_checked_completely_and_pinned_safely(ledgers, tmp_path, capsys):
    good = ledgers["operator"].trust().to_json()
    home = tmp_path / "home"
    cases = {
        "extra": {**good, "ledger_url": "x"},
        "missing": {k: v for k, v in good.items() if k != "chain_id"},
        "address": {**good, "anchor_contract": "0x1234"},
        "checksum": {**good, "anchor_contract": flip_case(good["anchor_contract"])},
        "vkey": {**good, "checkpoint_vkeys": ["nonsense"]},
        "chain": {**good, "chain_id": True},
        "ca": {**good, "mesh_ca_pem": "not a certificate"},
    }  # fmt: skip
    for name, body in cases.items():
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(body))
        assert cli.main(["--home", str(home), "trust", "init", str(f)]) == 2, name
        assert not trust.pinned_path(home).exists()
    capsys.readouterr()
    f = tmp_path / "good.json"
    f.write_text(json.dumps(good))
    expected = trust.parse(f.read_bytes()).fingerprint
    assert cli.main(["--home", str(home), "trust", "init", str(f), "--fingerprint", "sha256:" + "0" * 64]) == 2
    assert cli.main(["--home", str(home), "trust", "init", str(f), "--fingerprint", f"sha256:{expected}"]) == 0
    assert f"sha256:{expected}" in capsys.readouterr().out
    pinned = trust.pinned_path(home)
    assert pinned.stat().st_mode & 0o777 == 0o644
    assert trust.load_pinned(home).fingerprint == expected
    os.chmod(pinned, 0o666)
    with pytest.raises(trust.TrustError, match="writable by others"):
        trust.load_pinned(home)


def test_saved_receipt_parser_and_chain_evidence_units():
    r = receipt(3)
    assert parse_saved_receipt(json.dumps(dataclasses.asdict(r)).encode(), "x") == r
    with pytest.raises(VerificationError) as bad:
        parse_saved_receipt(b"\xff", "x")
    assert bad.value.exit_code == 10
    # Found by the saved_receipt fuzz target: Python's JSON parser raises RecursionError on deep
    # nesting and a bare ValueError on integers beyond 4,300 digits; both were tracebacks.
    for hostile in (b"[" * 5000, b'{"key_version": ' + b"1" * 5000 + b"}"):
        with pytest.raises(VerificationError, match="not JSON") as bad:
            parse_saved_receipt(hostile, "x")
        assert bad.value.exit_code == 10

    class Later:
        def chain_id(self) -> int:
            return 7

        def root_at(self, contract: str, size: int) -> bytes:
            return bytes(32)  # not anchored at exactly this size

        def latest(self, contract: str) -> tuple[int, bytes]:
            return 9, b"\x01" * 32

    anchors = trust.TrustAnchors(ORIGIN, (vkey(ORIGIN, b"\x02" * 32),), 7, trust.checksum_address("0x" + "22" * 20))
    assert chain_anchors(Later(), anchors)(5) == [
        AnchorEvidence(9, b"\x01" * 32, f"chain 7 contract {anchors.anchor_contract}")
    ]
    assert chain_anchors(Later(), anchors)(10) == []
