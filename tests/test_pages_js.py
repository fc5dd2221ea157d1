"""The explorer's JavaScript in real headless Chromium against the Python it ports: the RFC 6962
verifiers (merkle.js) on all 196 transparency-dev/merkle cases and on random trees, signed notes
(note.js) against cipherfeed/checkpoint.py, the trust file (trust.js: fields, EIP-55, fingerprint)
against cipherfeed/trust.py, receipt ids against cipherfeed/receipts.py, and the anchor contract's
selectors against its compiled ABI."""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cipherfeed import trust
from cipherfeed.checkpoint import Checkpoint, sign_note, vkey
from cipherfeed.config import default_vectors_dir
from cipherfeed.merkle import CompactTree, leaf_hash
from cipherfeed.receipts import Receipt
from tests.pages_browser import EXPLORER_DIR, PageErrors, chromium, static_server

VECTORS = default_vectors_dir() / "transparency-dev-merkle"
VENDORED = {"vendor/js-sha3/sha3.min.js": "4a432724268b529eeb505989358bb618b614c30031916742b5544fe82a3a6db1"}
b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    with chromium() as browser, static_server(EXPLORER_DIR) as base:
        page = browser.new_page()
        errors = PageErrors(page)
        page.goto(f"{base}/index.html")
        page.wait_for_selector("body[data-loaded='true']")
        yield page
        assert not errors.messages, errors.messages
        page.close()


def run(page: Any, module: str, body: str, arg: Any) -> Any:
    """Evaluates ``body`` (an async function body with ``m`` the module and ``arg``) in the page."""
    script = f"async (arg) => {{ const m = await import('./{module}'); {body} }}"
    return page.evaluate(script, arg)


def test_vendored_files_are_the_recorded_ones():
    for name, digest in VENDORED.items():
        assert hashlib.sha256((EXPLORER_DIR / name).read_bytes()).hexdigest() == digest, name
        assert (EXPLORER_DIR / name).with_name("LICENSE.txt").exists()


def test_merkle_js_agrees_with_every_transparency_dev_case(page):
    files = sorted(VECTORS.glob("*/**/*.json"))
    if len(files) != 196:
        pytest.fail(f"expected the 196 transparency-dev/merkle cases at {VECTORS} (set CIPHERFEED_VECTORS)")
    cases = [{"name": str(f.relative_to(VECTORS)), **json.loads(f.read_text())} for f in files]
    results = run(page, "merkle.js", """
        const d = (s) => Uint8Array.from(atob(s || ""), (c) => c.charCodeAt(0));
        const out = [];
        for (const c of arg) {
          try {
            const proof = (c.proof || []).map(d);
            if ("leafIdx" in c) await m.verifyInclusion(c.leafIdx, c.treeSize, d(c.leafHash), proof, d(c.root));
            else await m.verifyConsistency(c.size1, c.size2, d(c.root1), d(c.root2), proof);
            out.push([c.name, "ok"]);
          } catch (e) { out.push([c.name, e.name]); }
        }
        return out;""", cases)  # fmt: skip
    want = {c["name"]: "ProofError" if c["wantErr"] else "ok" for c in cases}
    assert dict(results) == want
    assert sum(1 for _, r in results if r == "ok") > 0 and sum(1 for _, r in results if r == "ProofError") > 0


def test_merkle_js_verifies_random_trees_and_refuses_every_altered_proof(page):
    rng = random.Random(6962)
    tree = CompactTree([leaf_hash(str(i).encode()) for i in range(300)])
    cases = []
    for _ in range(60):
        size = rng.randint(1, 300)
        index = rng.randrange(size)
        proof = tree.inclusion_proof(index, size)
        case = {"kind": "inclusion", "a": index, "b": str(size), "leaf": b64(tree.leaf(index)),
                "root": b64(tree.root(size)), "proof": [b64(p) for p in proof], "ok": True}  # fmt: skip
        cases.append(case)
        if proof:
            bad = [bytearray(p) for p in proof]
            bad[rng.randrange(len(bad))][rng.randrange(32)] ^= 1 << rng.randrange(8)
            cases.append({**case, "proof": [b64(bytes(p)) for p in bad], "ok": False})
        cases.append({**case, "a": (index + 1) % size, "ok": size == 1})  # a size-1 tree wraps onto the same leaf
        old = rng.randint(1, size)
        cproof = tree.consistency_proof(old, size)
        case = {"kind": "consistency", "a": old, "b": str(size), "leaf": b64(tree.root(old)),
                "root": b64(tree.root(size)), "proof": [b64(p) for p in cproof], "ok": True}  # fmt: skip
        cases.append(case)
        if cproof:
            cases.append({**case, "proof": [b64(p) for p in cproof[:-1]], "ok": False})
    results = run(page, "merkle.js", """
        const d = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
        const out = [];
        for (const c of arg) {
          try {
            if (c.kind === "inclusion") await m.verifyInclusion(c.a, c.b, d(c.leaf), c.proof.map(d), d(c.root));
            else await m.verifyConsistency(c.a, c.b, d(c.leaf), d(c.root), c.proof.map(d));
            out.push(true);
          } catch (e) { if (e.name !== "ProofError") throw e; out.push(false); }
        }
        return out;""", cases)  # fmt: skip
    assert results == [c["ok"] for c in cases]


def _signer(name: str) -> tuple[Ed25519PrivateKey, bytes, str]:
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return key, public, vkey(name, public)


def test_note_js_verifies_what_the_ledger_signs_and_nothing_else(page):
    origin = "cipherfeed.test/ledger"
    key, public, pinned = _signer(origin)
    other_key, other_public, other = _signer(origin)
    body = Checkpoint(origin, 12345, hashlib.sha256(b"root").digest()).body()
    note = sign_note(body, origin, public, key.sign)
    by_other = sign_note(body, origin, other_public, other_key.sign)
    forged = note.replace("\n12345\n", "\n12346\n")
    other_origin = sign_note(Checkpoint("evil/ledger", 1, bytes(32)).body(), origin, public, key.sign)
    both = note + by_other.split("\n\n", 1)[1]  # two signature lines: one pinned, one not
    results = run(page, "note.js", """
        const out = {};
        const pinned = [await m.parseVkey(arg.pinned)];
        for (const [name, note] of Object.entries(arg.notes)) {
          try {
            const cp = await m.verifyCheckpoint(note, pinned, arg.origin);
            out[name] = `ok ${cp.size} ${btoa(String.fromCharCode(...cp.root))}`;
          } catch (e) { out[name] = e.name + ": " + e.message; }
        }
        try { await m.parseVkey(arg.pinned.replace(/\\+[0-9a-f]{8}\\+/, "+00000000+")); out.badid = "accepted"; }
        catch (e) { out.badid = e.name; }
        return out;""",
        {"pinned": pinned, "origin": origin,
         "notes": {"genuine": note, "by_other": by_other, "forged": forged, "other_origin": other_origin, "both": both,
                   "unsigned": body, "garbled": note[:-5] + "\n"}})  # fmt: skip
    root = b64(hashlib.sha256(b"root").digest())
    assert results["genuine"] == f"ok 12345 {root}" and results["both"] == f"ok 12345 {root}"
    assert results["by_other"] == "NoteError: no signature by a trusted key"
    assert results["forged"] == f"NoteError: signature by {origin} does not verify"
    assert results["other_origin"].startswith("NoteError: checkpoint is for log")
    assert results["unsigned"].startswith("NoteError") and results["garbled"].startswith("NoteError")
    assert results["badid"] == "NoteError"
    assert other != pinned


def test_trust_js_parses_like_trust_py_with_the_same_fingerprint(page):
    _, _, pinned = _signer("cipherfeed.test/ledger")
    anchors = trust.TrustAnchors(
        log_origin="cipherfeed.test/ledger",
        checkpoint_vkeys=(pinned,),
        chain_id=131277322940537,
        anchor_contract=trust.checksum_address("0x" + "5a" * 20),
        mesh_ca_pem="-----BEGIN CERTIFICATE-----\nMIIB\u00e9\n-----END CERTIFICATE-----\n",
    )
    good = json.dumps(anchors.to_json(), indent=2)
    lower = json.dumps({**anchors.to_json(), "anchor_contract": anchors.anchor_contract.lower()})
    bad_checksum = json.dumps({**anchors.to_json(), "anchor_contract": "0x" + anchors.anchor_contract[2:].swapcase()})
    extra = json.dumps({**anchors.to_json(), "extra": 1})
    results = run(page, "trust.js", """
        const out = {};
        for (const [name, text] of Object.entries(arg)) {
          try { const t = await m.parseTrust(text); out[name] = [t.fingerprint, t.anchorContract]; }
          catch (e) { out[name] = e.name + ": " + e.message; }
        }
        return out;""", {"good": good, "lower": lower, "bad_checksum": bad_checksum, "extra": extra})  # fmt: skip
    assert results["good"] == [anchors.fingerprint, anchors.anchor_contract]
    assert results["lower"] == [anchors.fingerprint, anchors.anchor_contract]  # same file, checksummed
    if anchors.anchor_contract[2:] != anchors.anchor_contract[2:].swapcase():
        with pytest.raises(trust.TrustError):
            trust.parse(bad_checksum.encode())
        assert "fails its EIP-55 checksum" in results["bad_checksum"]
    assert results["extra"].startswith("TrustError: trust file fields")


def test_receipt_ids_and_contract_selectors_match_python(page):
    receipts = [
        Receipt("ab" * 32, "cd" * 32, "ef" * 32, "01" * 32, 3, 1_700_000_000_123),
        Receipt("00" * 32, "ff" * 32, "model-\u00e9", "k" * 64, 0, 0),
    ]
    ids = run(page, "receipt.js", "return Promise.all(arg.map((r) => m.receiptId(r)));",
              [dict(r.__dict__) for r in receipts])  # fmt: skip
    assert ids == [r.receipt_id for r in receipts]
    from web3 import Web3

    from services.ledger.anchor import compiled_contract

    abi = compiled_contract()["abi"]
    assert {e.get("name") for e in abi} >= {"root_at", "latest", "Anchored"}
    event = next(e for e in abi if e.get("type") == "event" and e["name"] == "Anchored")
    signature = f"Anchored({','.join(i['type'] for i in event['inputs'])})"
    got = run(page, "chain.js", "return [m.ROOT_AT(), m.LATEST(), m.ANCHORED_TOPIC()];", None)
    assert got == [
        "0x" + Web3.keccak(text="root_at(uint256)")[:4].hex().removeprefix("0x"),
        "0x" + Web3.keccak(text="latest()")[:4].hex().removeprefix("0x"),
        "0x" + Web3.keccak(text=signature).hex().removeprefix("0x"),
    ]
