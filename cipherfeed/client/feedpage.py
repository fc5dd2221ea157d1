"""The device's feed page, as a domain core (``FeedPage``): sign in, history, one private feed,
receipt checks. The HTTP side is ``cipherfeed/client/ui.py``; everything secret (the CKKS secret
key, the owner account, decrypted scores) stays in this process and the page on this machine.

Jobs run one at a time on a worker thread (CKKS key generation and encryption are CPU-bound); the
page polls a job for its stage, so it can show progress while keys are made.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import grpc
import numpy as np

from cipherfeed import siwe
from cipherfeed.client import history as history_store
from cipherfeed.client import keystore
from cipherfeed.client.history import HistoryEntry, HistoryStore
from cipherfeed.client.interest import history_weights
from cipherfeed.client.ranking import rank_feed
from cipherfeed.client.sdk import ClientError, RecommenderClient, encrypt_query
from cipherfeed.errors import Reason
from cipherfeed.grpcutil import reason_of
from cipherfeed.he import packing
from cipherfeed.manifest import Manifest
from cipherfeed.receipts import Receipt
from cipherfeed.v1 import keyservice_pb2

log = logging.getLogger("cipherfeed.ui")
MAX_JOBS = 32  # finished jobs remembered for the page to read
MAX_USER_LENGTH = 64


class PageError(ValueError):
    """A request the page made that cannot be served (shown to the user as it is)."""


@dataclass
class Job:
    id: str
    kind: str
    stage: str = "queued"
    stages: list[dict[str, Any]] = field(default_factory=list)  # done stages with their times
    state: str = "running"  # running | done | failed
    result: dict[str, Any] | None = None
    error: str = ""
    _started: float = field(default_factory=time.perf_counter, repr=False)

    def enter(self, stage: str) -> None:
        now = time.perf_counter()
        if self.stages:
            self.stages[-1]["ms"] = round(1e3 * (now - self.stages[-1]["_t"]), 1)
        self.stages.append({"stage": stage, "_t": now})
        self.stage = stage

    def finish(self) -> None:
        self.enter("done")
        self.stages.pop()

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "stage": self.stage,
            "stages": [{k: v for k, v in s.items() if not k.startswith("_")} for s in self.stages],
            "result": self.result,
            "error": self.error,
        }


def _short_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        code = exc.code()
        return f"{code.name if code else 'gRPC error'}: {str(exc.details() or '')[:300]}"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


class FeedPage:
    """What the local page can ask for. ``client`` talks to the mesh (gRPC, or the gateway when
    its target is an http(s) URL); ``chain_rpc`` is the node receipts' anchors are read from."""

    def __init__(
        self,
        client: RecommenderClient,
        chain_rpc: str | None = None,
        verify: Callable[[Receipt], dict[str, Any]] | None = None,
    ) -> None:
        self.client = client
        self.chain_rpc = chain_rpc
        self.history = HistoryStore(client.config.home / "history")
        self._verify = verify or self._verify_receipt
        self._lock = threading.Lock()  # one job at a time: HE work is CPU-bound
        self._jobs: dict[str, Job] = {}
        self._jobs_lock = threading.Lock()
        self.user: str | None = None
        self.identity: str = ""  # "device" or "wallet"
        self.receipts: dict[str, Receipt] = {}
        self._wallet_message: tuple[str, str, str] | None = None  # (address, SIWE text, user) awaiting a signature
        self._ciphertext_bytes = 0

    # --- jobs ------------------------------------------------------------------------------

    def start(self, kind: str, work: Callable[[Job], dict[str, Any]]) -> Job:
        job = Job(id=secrets.token_hex(8), kind=kind)
        with self._jobs_lock:
            while len(self._jobs) >= MAX_JOBS:
                self._jobs.pop(next(iter(self._jobs)))
            self._jobs[job.id] = job

        def run() -> None:
            with self._lock:
                try:
                    job.result = work(job)
                    job.finish()
                    job.state = "done"
                except Exception as exc:  # the page shows why; the worker keeps serving
                    log.warning("%s job failed: %s", kind, _short_error(exc))
                    job.error = _short_error(exc)
                    job.state = "failed"

        threading.Thread(target=run, name=f"ui-{kind}", daemon=True).start()
        return job

    def job(self, job_id: str) -> Job:
        with self._jobs_lock:
            found = self._jobs.get(job_id)
        if found is None:
            raise PageError("no such job")
        return found

    # --- sign in -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        c = self.client
        return {
            "user": self.user,
            "identity": self.identity,
            "owner": (c.session.address if c.session is not None else (c.account.address if c.account else "")),
            "key_id": c.key_id or "",
            "session_expires": int(c.session.expires_unix) if c.session is not None else 0,
            "target": c.config.target,
            "chain_rpc": self.chain_rpc or "",
        }

    def _check_user(self, user: str) -> str:
        user = str(user).strip()
        if not user or len(user) > MAX_USER_LENGTH or not user.isprintable() or "/" in user or user.startswith("."):
            raise PageError("a user is a dataset account id (printable, at most 64 characters, no '/')")
        return user

    def _load_device_keys(self, job: Job) -> None:
        c = self.client
        job.enter("fetching the server's HE parameters")
        c.params()
        directory = c.config.home / "keys"
        job.enter(
            "making a CKKS key pair and 11 evaluation keys (the secret key stays here)"
            if not (directory / keystore.SECRET_FILE).exists()
            else "loading this device's CKKS keys"
        )
        c.use_keys(directory)
        self._ciphertext_bytes = len(encrypt_query(c.keys, np.zeros(c.params().embedding_dim)))  # type: ignore[arg-type]

    def sign_in(self, user: str) -> Job:
        """Signs in as a dataset user with the device account: keys (made if needed), registered
        with the key service, a SIWE session, the catalogue manifest and the user's history (seeded
        with the creator's own videos when empty)."""
        user = self._check_user(user)

        def work(job: Job) -> dict[str, Any]:
            c = self.client
            self._load_device_keys(job)
            job.enter("registering the public and evaluation keys with the key service")
            c.session = None
            c.register()
            job.enter("Sign-In with Ethereum as the device account")
            c.sign_in()
            self._after_sign_in(job, user, "device")
            return self.status()

        return self.start("signin", work)

    def wallet_challenge(self, address: str, user: str) -> dict[str, str]:
        """The EIP-4361 message a browser wallet signs (``personal_sign``) to sign in."""
        from cipherfeed.errors import InvalidArgument
        from cipherfeed.ownerauth import checksum_address

        user = self._check_user(user)
        try:
            address = checksum_address(str(address))
        except InvalidArgument as exc:
            raise PageError(f"wallet address: {exc}") from None
        c = self.client
        challenge = c.keyservice.GetSignInNonce(
            keyservice_pb2.GetSignInNonceRequest(), timeout=c.config.deadline_seconds
        )
        now = datetime.now(timezone.utc)
        text = siwe.SiweMessage(
            domain=challenge.domain,
            address=address,
            statement="Sign in to cipherfeed with this wallet; it will own this device's HE key.",
            uri=challenge.uri,
            chain_id=c.config.chain_id,
            nonce=challenge.nonce,
            issued_at=siwe.format_time(now),
            expiration_time=siwe.format_time(now + timedelta(minutes=15)),
        ).text()
        self._wallet_message = (address, text, user)
        return {"message": text, "address": address}

    def wallet_sign_in(self, signature_hex: str) -> Job:
        """Completes a wallet sign-in: the key service checks the SIWE signature and issues a
        session for the wallet's address, which then owns a key set of its own on this device."""
        if self._wallet_message is None:
            raise PageError("ask for a sign-in message first")
        address, text, user = self._wallet_message
        self._wallet_message = None
        try:
            signature = bytes.fromhex(str(signature_hex).removeprefix("0x"))
        except ValueError:
            raise PageError("the signature is not hexadecimal") from None
        if len(signature) != 65:
            raise PageError("an Ethereum signature is 65 bytes")

        def work(job: Job) -> dict[str, Any]:
            c = self.client
            job.enter("checking the wallet's Sign-In with Ethereum at the key service")
            session = c.keyservice.SignIn(
                keyservice_pb2.SignInRequest(message=text, signature=signature), timeout=c.config.deadline_seconds
            )
            if session.address != address:
                raise ClientError("the key service issued a session for another account")
            job.enter("fetching the server's HE parameters")
            c.params()
            directory = c.config.home / "wallets" / address / "keys"  # the wallet's own HE keys
            job.enter("making a CKKS key pair and 11 evaluation keys (the secret key stays here)")
            c.keys, _ = keystore.load_or_generate(directory, c.params())
            c.account = None  # requests are authorized by the wallet's session from now on
            c.session = session
            self._ciphertext_bytes = len(encrypt_query(c.keys, np.zeros(c.params().embedding_dim)))
            job.enter("registering the keys, owned by the wallet")
            request = keyservice_pb2.RegisterKeyRequest(
                public_key=c.keys.public_key_bytes, rotation_key_map=c.keys.rotation_key_bytes, owner=address
            )
            request.auth.session_token = session.token
            record = c.keyservice.RegisterKey(request, timeout=c.config.deadline_seconds)
            if record.key.key_id != hashlib.sha256(c.keys.public_key_bytes).hexdigest():
                raise ClientError("key service returned a key id that is not the hash of our public key")
            c.key_id = record.key.key_id
            c.key_version = RecommenderClient._version_of(record, c.keys)
            self._after_sign_in(job, user, "wallet")
            return self.status()

        return self.start("signin", work)

    def _after_sign_in(self, job: Job, user: str, identity: str) -> None:
        c = self.client
        job.enter("catalogue manifest (downloaded once per model, digest checked)")
        manifest = c.manifest()
        job.enter("this device's history")
        if not self.history.entries(user):
            try:
                own = manifest.items_of_creator(user)
            except KeyError:
                raise PageError(f"{user!r} is not a dataset user (no videos in the catalogue)") from None
            start = history_store.now()
            self.history.add(user, [HistoryEntry(manifest.item_ids[i], "like", start - r) for r, i in enumerate(own)])
        self.user, self.identity = user, identity

    def sign_out(self) -> None:
        self.user = None
        self.client.session = None

    # --- history and feed --------------------------------------------------------------------

    def _require_user(self) -> str:
        if self.user is None:
            raise PageError("sign in first")
        return self.user

    def history_view(self) -> list[dict[str, Any]]:
        user = self._require_user()
        manifest = self.client.manifest()
        out = []
        for e in sorted(self.history.entries(user), key=lambda e: e.unix, reverse=True):
            row: dict[str, Any] = {"item_id": e.item_id, "kind": e.kind, "unix": e.unix}
            index = manifest.index_of.get(e.item_id)
            if index is not None:
                item = manifest.item(index)
                row.update(creator_id=item.creator_id, creator_nickname=item.creator_nickname, url=item.url)
            out.append(row)
        return out

    def request_feed(self, k: int, per_creator: int) -> Job:
        user = self._require_user()
        if not (1 <= k <= 100 and 1 <= per_creator <= 10):
            raise PageError("k is 1..100 and the per-creator cap 1..10")

        def work(job: Job) -> dict[str, Any]:
            return self._feed(job, user, k, per_creator)

        return self.start("feed", work)

    def _feed(self, job: Job, user: str, k: int, per_creator: int) -> dict[str, Any]:
        c = self.client
        job.enter("catalogue manifest")
        manifest = c.manifest()
        entries = self.history.entries(user)
        engagements = history_store.engagements(entries)
        for attempt in range(2):
            try:
                return self._score(job, manifest, engagements, k, per_creator, len(entries))
            except grpc.RpcError as exc:
                if reason_of(exc) != Reason.MODEL_MISMATCH or attempt:
                    raise
                job.enter("the model changed: refreshing the manifest")
                manifest = c.manifest(refresh=True)
        raise AssertionError("unreachable")

    def _score(
        self, job: Job, manifest: Manifest, engagements: list, k: int, per_creator: int, count: int
    ) -> dict[str, Any]:
        c = self.client
        p = c.params()
        weights = history_weights(engagements, manifest.index_of, manifest.item_count)
        blocks = packing.block_count(manifest.item_count, p.items_per_ciphertext)
        job.enter(f"encrypting the history ({blocks} CKKS ciphertexts) and uploading it")
        t0 = time.perf_counter()
        ref = c.upload_history(weights, pin_model=manifest.model_version)
        upload_ms = 1e3 * (time.perf_counter() - t0)
        job.enter(f"scoring {manifest.item_count} items under encryption, decrypting here")
        t0 = time.perf_counter()
        scored = c.score_profile(ref, pin_model=manifest.model_version)
        score_ms = 1e3 * (time.perf_counter() - t0)
        job.enter("ranking on this device")
        seen = [manifest.index_of[e.item_id] for e in engagements if e.item_id in manifest.index_of]
        feed = rank_feed(scored.scores, k, manifest.creator_of, seen=seen, per_creator_cap=per_creator)
        items = []
        for rank, i in enumerate(feed, 1):
            item = manifest.item(i)
            items.append({"rank": rank, **asdict(item), "score": float(scored.scores[i])})
        receipt_id = ""
        if scored.receipt is not None:
            from cipherfeed.cli import save_receipt

            save_receipt(c.config.home, scored.receipt)
            self.receipts[scored.receipt_id] = scored.receipt
            receipt_id = scored.receipt_id
        return {
            "items": items,
            "history_engagements": count,
            "model_version": scored.model_version,
            "item_count": manifest.item_count,
            "upload": {"ciphertexts": blocks, "bytes": blocks * self._ciphertext_bytes, "ms": round(upload_ms, 1)},
            "score": {
                "request": "by profile reference",
                "response_bytes": scored.response_bytes,
                "server_ms": round(scored.server_millis, 1),
                "round_trip_ms": round(score_ms, 1),
                "from_cache": scored.from_cache,
            },
            "receipt_id": receipt_id,
        }

    # --- receipts ----------------------------------------------------------------------------

    def verify(self, receipt_id: str) -> dict[str, Any]:
        receipt = self.receipts.get(str(receipt_id).lower())
        if receipt is None:
            raise PageError("no receipt of this page's feeds with that id")
        return {"receipt_id": receipt.receipt_id, **self._verify(receipt)}

    def _verify_receipt(self, receipt: Receipt) -> dict[str, Any]:
        """Checked against the trust file pinned in the client home only, the anchor read from
        the chain (``chain_rpc``), as ``cipherfeed verify`` does."""
        from cipherfeed.cli import Web3Chain
        from cipherfeed.client.verify import VerificationError, fetch_and_verify
        from cipherfeed.trust import TrustError, load_pinned
        from cipherfeed.v1 import ledger_pb2_grpc

        c = self.client
        try:
            trust = load_pinned(c.config.home)
        except TrustError as exc:
            return {"state": "unverified", "message": str(exc)}
        if not self.chain_rpc:
            return {
                "state": "unverified",
                "message": "no chain RPC configured (--chain-rpc): the anchor cannot be read",
            }
        ledger = ledger_pb2_grpc.LedgerStub(c.ledger_channel())
        try:
            v = fetch_and_verify(
                receipt.receipt_id, ledger, trust, Web3Chain(self.chain_rpc), c.config.deadline_seconds, receipt
            )
        except VerificationError as exc:
            if exc.step == "anchor" and "no anchor on chain" in str(exc):
                return {"state": "pending", "message": str(exc)}
            return {"state": "failed", "step": exc.step, "message": str(exc)}
        except grpc.RpcError as exc:
            if reason_of(exc) in (Reason.NOT_CHECKPOINTED, Reason.NO_CHECKPOINT):
                return {"state": "pending", "message": "not covered by a checkpoint yet"}
            return {"state": "failed", "step": "ledger", "message": _short_error(exc)}
        return {
            "state": "verified",
            "message": (
                f"leaf {v.leaf_index} of {v.checkpoint.size}, checkpoint signed by a pinned key, "
                f"anchored at size {v.anchor.size} ({v.anchor.source})"
            ),
        }
