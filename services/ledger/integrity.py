"""An offline integrity check of a ledger's store, and of its anchors on the chain: what an
operator runs after an incident (and the fault tests run after every fault).

It recomputes everything from the leaves: each stored hash is the RFC 6962 hash of its data, the
indices are 0..n-1 without a gap and no leaf is logged twice; every checkpoint's root is the tree
root at its size, its signed note names that size and root and verifies under the given keys;
every anchor row belongs to the checkpoint of its size, with its root. On the chain: the
contract's ``Anchored`` events name strictly increasing sizes, each once, each with the root of
the stored checkpoint of that size, and every confirmed anchor is what the contract holds.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cipherfeed.checkpoint import NoteError, Verifier, verify_checkpoint
from cipherfeed.merkle import CompactTree, leaf_hash
from services.ledger.store import LedgerStore


@dataclass
class LedgerIntegrity:
    leaves: int = 0
    checkpoints: int = 0
    anchors_confirmed: int = 0
    anchors_pending: int = 0
    onchain_anchors: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_store(
    store: LedgerStore, verifiers: Sequence[Verifier] = (), origin: str | None = None, max_problems: int = 50
) -> LedgerIntegrity:
    """Leaves, checkpoints and anchor rows of ``store`` (``verifiers``: check the notes' signatures)."""
    report = LedgerIntegrity()

    def problem(text: str) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(text)

    rows = store.db.query("SELECT idx, hash, data FROM leaves ORDER BY idx")
    tree = CompactTree()
    seen: dict[bytes, int] = {}
    for expected, (idx, stored, data) in enumerate(rows):
        stored, data = bytes(stored), bytes(data)
        if int(idx) != expected:
            problem(f"leaf index {idx} where {expected} was expected (a gap or a duplicate index)")
        if leaf_hash(data) != stored:
            problem(f"leaf {idx}: the stored hash is not the hash of its data")
        if stored in seen:
            problem(f"leaf {idx} repeats leaf {seen[stored]}: logged twice")
        seen.setdefault(stored, int(idx))
        tree.append_hash(stored)
    report.leaves = len(rows)

    checkpoints = store.db.query("SELECT size, root, note FROM checkpoints ORDER BY size")
    roots: dict[int, bytes] = {}
    for size, root, note in checkpoints:
        size, root = int(size), bytes(root)
        roots[size] = root
        if size > tree.size:
            problem(f"checkpoint {size} is beyond the {tree.size} stored leaves")
            continue
        if tree.root(size) != root:
            problem(f"checkpoint {size}: its root is not the tree root at that size")
        if verifiers:
            try:
                signed = verify_checkpoint(note, verifiers, origin)
            except NoteError as exc:
                problem(f"checkpoint {size}: its note does not verify ({exc})")
                continue
            if signed.size != size or signed.root != root:
                problem(f"checkpoint {size}: its note names size {signed.size} and another root")
    report.checkpoints = len(checkpoints)

    for anchor in store.anchors():
        if roots.get(anchor.size) != anchor.root:
            problem(f"anchor {anchor.size} has no checkpoint of that size and root")
        if anchor.confirmed:
            report.anchors_confirmed += 1
        else:
            report.anchors_pending += 1
    confirmed = [a for a in store.anchors() if a.confirmed]
    blocks = [a.block_number or 0 for a in confirmed]
    if blocks != sorted(blocks):
        problem("confirmed anchors are not in block order of their sizes")
    return report


def check_chain(store: LedgerStore, contract: Any, report: LedgerIntegrity) -> LedgerIntegrity:
    """Adds the on-chain checks to ``report``; ``contract`` is the web3 contract the store names."""
    roots = {row.size: row.root for row in store.anchors()}
    events = contract.events.Anchored().get_logs(from_block=0)
    sizes = [int(e["args"]["size"]) for e in events]
    report.onchain_anchors = len(sizes)
    if any(b <= a for a, b in itertools.pairwise(sizes)):
        report.problems.append(f"on-chain anchor sizes are not strictly increasing: {sizes}")
    for e in events:
        size, root = int(e["args"]["size"]), bytes(e["args"]["root"])
        if roots.get(size) != root:
            report.problems.append(f"on-chain anchor {size} is not the stored checkpoint of that size")
    for row in store.anchors():
        if row.confirmed and bytes(contract.functions.root_at(row.size).call()) != row.root:
            report.problems.append(f"confirmed anchor {row.size} is not what the contract holds")
    return report


def unique_leaves(store: LedgerStore, leaf_hashes: Iterable[bytes]) -> dict[bytes, int]:
    """How many times each of ``leaf_hashes`` is in the log (exactly once for every acknowledged receipt)."""
    out: dict[bytes, int] = {}
    for h in set(leaf_hashes):
        out[h] = int(store.db.query("SELECT COUNT(*) FROM leaves WHERE hash = ?", (h,))[0][0])
    return out
