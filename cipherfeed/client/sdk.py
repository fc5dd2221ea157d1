"""The client SDK: talks to a recommender over gRPC; encryption and decryption happen here only."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from google.protobuf.message import Message

from cipherfeed import ownerauth, siwe
from cipherfeed.client import keystore
from cipherfeed.client.catalogue import ManifestCache
from cipherfeed.client.interest import Engagement, history_weights
from cipherfeed.client.keystore import ClientKeys
from cipherfeed.client.ranking import rank_feed
from cipherfeed.client.transport import open_channel
from cipherfeed.config import ClientConfig
from cipherfeed.errors import Reason
from cipherfeed.grpcutil import reason_of
from cipherfeed.he import packing, scorecheck
from cipherfeed.he.codec import MaterialError, ciphertext_sha256, serialize
from cipherfeed.he.keymap import KeyMaterial, installed_tag
from cipherfeed.he.params import HEParams, ParameterError, build_context, context_fingerprint
from cipherfeed.manifest import CatalogueItem, Manifest, ManifestError
from cipherfeed.manifest import decode as decode_manifest
from cipherfeed.receipts import Receipt
from cipherfeed.v1 import (
    common_pb2,
    keyservice_pb2,
    keyservice_pb2_grpc,
    recommender_pb2,
    recommender_pb2_grpc,
)


class ClientError(RuntimeError):
    """The server's answer cannot be trusted or used."""


class Refusal(str, Enum):
    """Which of the device's checks a server's answer failed (``ResponseRefused.reason``)."""

    QUERY_MISMATCH = "QUERY_MISMATCH"  # the answer names another query
    RESPONSE_HASH_MISMATCH = "RESPONSE_HASH_MISMATCH"  # response_sha256 is not over the ciphertexts received
    RECEIPT_MISMATCH = "RECEIPT_MISMATCH"  # the receipt id does not hash what was sent and received
    MODEL_MISMATCH = "MODEL_MISMATCH"  # scored by another model than the one pinned
    KEY_VERSION_MISMATCH = "KEY_VERSION_MISMATCH"  # scored under another version of the key than this device holds
    LAYOUT_INVALID = "LAYOUT_INVALID"  # slots, items per ciphertext, item count or tail fold
    COUNT_INVALID = "COUNT_INVALID"  # not one score ciphertext per block of the layout
    CIPHERTEXT_INVALID = "CIPHERTEXT_INVALID"  # a score ciphertext is not the mesh's (``scorecheck``)


class ResponseRefused(ClientError):
    """A server's answer failed the device's checks; nothing of it was decrypted or kept. Raised
    for a broken or hostile server, never a signal or a large allocation: every field is checked
    before anything sized by it is allocated, and every score ciphertext before OpenFHE reads it.
    ``block`` is the index of the score ciphertext refused, if one was."""

    def __init__(self, message: str, reason: Refusal, block: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.block = block


KEYSERVICE = keyservice_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name
RECOMMENDER = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
SignedRequest = TypeVar("SignedRequest", bound=Message)
SESSION_MARGIN = 30  # seconds before a session token's expiry that the SDK stops using it


@dataclass(frozen=True)
class EncryptedScores:
    model_version: str
    scores: np.ndarray  # decrypted, one per catalogue item, in catalogue order
    server_millis: float
    query_bytes: int
    response_bytes: int
    from_cache: bool = False
    receipt: Receipt | None = None  # rebuilt from what was sent and received; None without a ledger
    receipt_id: str = ""


def encrypt_query(keys: ClientKeys, u: np.ndarray) -> bytes:
    """The serialized query: ``u`` repeated across every slot, encrypted under ``keys``."""
    p = keys.params
    slots = packing.replicate_query(u, p.padded_dim, p.slots)
    return serialize(keys.cc.Encrypt(keys.public_key, keys.cc.MakeCKKSPackedPlaintext(slots)))


def encrypt_history(keys: ClientKeys, weights: np.ndarray) -> list[bytes]:
    """The serialized history: weights over catalogue indices (normalised to sum to 1), one
    ciphertext per block in the score layout, encrypted under ``keys``."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("history weights must be a vector of finite, non-negative values")
    total = float(w.sum())
    if not total > 0:
        raise ValueError("history weights are all zero")
    p = keys.params
    return [
        serialize(keys.cc.Encrypt(keys.public_key, keys.cc.MakeCKKSPackedPlaintext(v)))
        for v in packing.history_blocks(w / total, p.slots)
    ]


def params_from_proto(p: common_pb2.HEParameters) -> HEParams:
    """The server's published parameters, refused unless 128-bit secure and self-consistent."""
    try:
        params = HEParams(
            ring_dimension=p.ring_dimension,
            first_mod_bits=p.first_mod_bits,
            scaling_mod_bits=p.scaling_mod_bits,
            multiplicative_depth=p.multiplicative_depth,
            key_switch_digit_bits=p.key_switch_digit_bits,
            security_level=p.security_level,
            scaling_technique=p.scaling_technique,
            key_switch_technique=p.key_switch_technique,
            embedding_dim=p.embedding_dim,
        )
    except (ParameterError, AttributeError) as exc:
        raise ClientError(f"server published unusable HE parameters: {exc}") from exc
    if list(p.rotation_indices) != params.rotation_indices:
        raise ClientError("server's rotation indices do not match its parameter set")
    if context_fingerprint(build_context(params)) != p.context_sha256:
        raise ClientError("server's crypto context fingerprint does not match its published parameters")
    return params


class RecommenderClient:
    """The device's side of the mesh. Each target is reached through the HTTP gateway when it is an
    ``http(s)://`` URL (``http_encoding``: binary protobuf bodies, or proto3 JSON), over gRPC
    otherwise (``cipherfeed.client.transport``); every method below works the same on either."""

    def __init__(self, config: ClientConfig, http_encoding: str = "binary") -> None:
        self.config = config
        self.http_encoding = http_encoding
        self._channel = self._open(config.target, "recommender")
        self._keyservice_channel = self._open(config.keyservice_target, "keyservice")
        self._ledger_channel: grpc.Channel | None = None
        self.stub = recommender_pb2_grpc.RecommenderStub(self._channel)
        self.keyservice = keyservice_pb2_grpc.KeyServiceStub(self._keyservice_channel)
        self._params: HEParams | None = None
        self._scores: scorecheck.ScoreChecker | None = None
        self.keys: ClientKeys | None = None
        self.account: LocalAccount | None = None  # owns the registered key; never sent or logged
        self.session: keyservice_pb2.SessionToken | None = None
        self.key_id: str | None = None
        self.key_version: int = 0
        self._profile: tuple[bytes, str] | None = None  # (query sha256, profile_ref)
        self._histories: dict[str, bytes] = {}  # profile_ref -> SHA-256 the receipt names
        self._history: tuple[bytes, str] | None = None  # (weights digest, profile_ref) of the last upload
        self._manifest: Manifest | None = None  # per model version; refreshed when the model changes
        self.manifests = ManifestCache(config.home / "manifests")
        self.manifest_downloads = 0  # how many manifests this client fetched (the rest came from disk)

    def _open(self, target: str, server: str) -> grpc.Channel:
        return open_channel(target, self.config.limits, self.config.tls, server, self.http_encoding)

    def ledger_channel(self) -> grpc.Channel:
        if self._ledger_channel is None:
            self._ledger_channel = self._open(self.config.ledger_target, "ledger")
        return self._ledger_channel

    def close(self) -> None:
        self._channel.close()
        self._keyservice_channel.close()
        if self._ledger_channel is not None:
            self._ledger_channel.close()

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _deadline(self) -> float:
        return self.config.deadline_seconds

    def wait_ready(self, timeout: float) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout)
        grpc.channel_ready_future(self._keyservice_channel).result(timeout=timeout)

    def params(self) -> HEParams:
        if self._params is None:
            response = self.stub.GetParams(recommender_pb2.GetParamsRequest(), timeout=self._deadline)
            self._params = params_from_proto(response.params)
            self._scores = scorecheck.for_params(self._params)
        return self._params

    def model_info(self) -> common_pb2.ModelVersion:
        return self.stub.GetModelInfo(recommender_pb2.GetModelInfoRequest(), timeout=self._deadline)

    def use_keys(self, directory: Path | None = None) -> bool:
        """Loads the key pair and its owner account from ``directory`` (default: the client home),
        making them if needed."""
        directory = directory or self.config.home / "keys"
        self.keys, created = keystore.load_or_generate(directory, self.params())
        self.account = keystore.load_or_create_account(directory)
        return created

    def _require_account(self) -> LocalAccount:
        if self.account is None:
            raise ClientError("no owner account loaded; call use_keys() first")
        return self.account

    def _authorize(
        self, service: str, method: str, key_id: str, request: SignedRequest, bearer: bool = True
    ) -> SignedRequest:
        """Sets the owner's authorization on ``request``: the session token while it is fresh
        (unless ``bearer`` is False), else an EIP-712 signature over this very request."""
        fresh = self.session is not None and self.session.expires_unix > time.time() + SESSION_MARGIN
        if bearer and fresh and self.session is not None:
            request.auth.session_token = self.session.token  # type: ignore[attr-defined]
        else:
            account = self._require_account()
            ownerauth.sign_request(account, self.config.chain_id, f"{service}/{method}", key_id, request)
        return request

    def sign_in(self, statement: str = "Sign in to cipherfeed with this device's owner account.") -> str:
        """Sign-In with Ethereum (EIP-4361) with the owner account: later owner requests carry the
        session token instead of a signature each. Returns the token."""
        account = self._require_account()
        challenge = self.keyservice.GetSignInNonce(keyservice_pb2.GetSignInNonceRequest(), timeout=self._deadline)
        now = datetime.now(timezone.utc)
        message = siwe.SiweMessage(
            domain=challenge.domain,
            address=account.address,
            statement=statement,
            uri=challenge.uri,
            chain_id=self.config.chain_id,
            nonce=challenge.nonce,
            issued_at=siwe.format_time(now),
            expiration_time=siwe.format_time(now + timedelta(minutes=15)),
        )
        text = message.text()
        signature = bytes(account.sign_message(encode_defunct(text=text)).signature)
        session = self.keyservice.SignIn(
            keyservice_pb2.SignInRequest(message=text, signature=signature), timeout=self._deadline
        )
        if session.address != account.address:
            raise ClientError("the key service issued a session for another account")
        self.session = session
        return session.token

    def register(self) -> str:
        """Registers the public key and rotation keys with the key service, owned by this
        device's account (idempotent)."""
        keys = self._require_keys()
        account = self._require_account()
        expected = hashlib.sha256(keys.public_key_bytes).hexdigest()
        request = keyservice_pb2.RegisterKeyRequest(
            public_key=keys.public_key_bytes, rotation_key_map=keys.rotation_key_bytes, owner=account.address
        )
        record = self.keyservice.RegisterKey(
            self._authorize(KEYSERVICE, "RegisterKey", expected, request), timeout=self._deadline
        )
        if record.key.key_id != expected:
            raise ClientError("key service returned a key id that is not the hash of our public key")
        self.key_id = record.key.key_id
        self.key_version = self._version_of(record, keys)
        return self.key_id

    def rotate(self, new_keys: ClientKeys, min_version: int = 0) -> int:
        """Registers ``new_keys`` as the next version of this key; returns that version."""
        if self.key_id is None:
            raise ClientError("register before rotating")
        request = keyservice_pb2.RotateKeyRequest(
            key_id=self.key_id,
            public_key=new_keys.public_key_bytes,
            rotation_key_map=new_keys.rotation_key_bytes,
            min_version=min_version,
        )
        record = self.keyservice.RotateKey(
            self._authorize(KEYSERVICE, "RotateKey", self.key_id, request), timeout=self._deadline
        )
        self.keys = new_keys
        self.key_version = record.key.version
        self._profile = None
        self._history = None
        return self.key_version

    def _set_state(self, method: str) -> keyservice_pb2.KeyRecord:
        if self.key_id is None:
            raise ClientError("register first")
        request = keyservice_pb2.KeyStateRequest(key_id=self.key_id)
        call = getattr(self.keyservice, method)
        return call(self._authorize(KEYSERVICE, method, self.key_id, request), timeout=self._deadline)

    def disable(self) -> keyservice_pb2.KeyRecord:
        """Stops every recommender from using this key until ``enable``."""
        return self._set_state("DisableKey")

    def enable(self) -> keyservice_pb2.KeyRecord:
        return self._set_state("EnableKey")

    def destroy(self) -> keyservice_pb2.KeyRecord:
        """Deletes the key's material for good (the key id stays, DESTROYED)."""
        record = self._set_state("DestroyKey")
        self._profile = None
        return record

    def audit(self, after_seq: int = 0, limit: int = 100) -> list[keyservice_pb2.AuditEntry]:
        """This key's entries in the key service's audit log."""
        if self.key_id is None:
            raise ClientError("register first")
        request = keyservice_pb2.ListAuditRequest(key_id=self.key_id, after_seq=after_seq, limit=limit)
        # ListAudit is a GET through the gateway: its proof travels in the URL, which proxies
        # log. A single-use signature that expires in minutes, never the bearer session token.
        reply = self.keyservice.ListAudit(
            self._authorize(KEYSERVICE, "ListAudit", self.key_id, request, bearer=False), timeout=self._deadline
        )
        return list(reply.entries)

    @staticmethod
    def _version_of(record: keyservice_pb2.KeyRecord, keys: ClientKeys) -> int:
        digest = KeyMaterial(keys.public_key_bytes, keys.rotation_key_bytes).sha256
        for v in record.versions:
            if v.material_sha256 == digest:
                return v.version
        raise ClientError("the key service's record does not hold our key material")

    def _key_ref(self) -> common_pb2.KeyRef:
        if self.key_id is None:
            self.register()
        return common_pb2.KeyRef(key_id=self.key_id or "", version=self.key_version)

    def _require_keys(self) -> ClientKeys:
        if self.keys is None:
            raise ClientError("no client keys loaded; call use_keys() first")
        return self.keys

    def encrypt_query(self, u: np.ndarray) -> bytes:
        return encrypt_query(self._require_keys(), u)

    def upload_profile(self, u: np.ndarray) -> str:
        """Uploads the encrypted interest vector once; later scores send only the reference."""
        query = self.encrypt_query(u)
        ref = self._key_ref()
        request = recommender_pb2.UploadProfileRequest(key=ref, query_ciphertext=query)
        reply = self.stub.UploadProfile(
            self._authorize(RECOMMENDER, "UploadProfile", ref.key_id, request), timeout=self._deadline
        )
        self._profile = (hashlib.sha256(query).digest(), reply.profile_ref)
        return reply.profile_ref

    def score(self, u: np.ndarray, pin_model: str = "", use_profile: bool = False) -> EncryptedScores:
        """Encrypts ``u``, has the whole catalogue scored, and decrypts the scores locally.

        With ``use_profile`` the ciphertext is uploaded once and later calls send its reference;
        an expired reference is uploaded again transparently.
        """
        if not use_profile:
            return self.score_ciphertext(self.encrypt_query(u), pin_model)
        for attempt in range(2):
            if self._profile is None or attempt:
                self.upload_profile(u)
            assert self._profile is not None
            query_sha, ref = self._profile
            key = self._key_ref()
            request = recommender_pb2.ScoreRequest(key=key, profile_ref=ref, model_version=pin_model)
            self._authorize(RECOMMENDER, "Score", key.key_id, request)
            try:
                return self._decrypt(self.stub.Score(request, timeout=self._deadline), query_sha, 0, pin_model)
            except grpc.RpcError as exc:
                if reason_of(exc) != Reason.PROFILE_NOT_FOUND or attempt:  # expired: upload again
                    raise
        raise AssertionError("unreachable")

    def upload_history(self, weights: np.ndarray, pin_model: str = "") -> str:
        """Encrypts the history (weights over catalogue indices, one per item of the serving
        catalogue; normalised here to sum to 1) and uploads it; the server computes the encrypted
        interest vector ``u = X^T w`` from it. Returns the profile reference to score by."""
        blobs = encrypt_history(self._require_keys(), weights)
        key = self._key_ref()
        request = recommender_pb2.UploadHistoryRequest(key=key, history_ciphertexts=blobs, model_version=pin_model)
        reply = self.stub.UploadHistory(
            self._authorize(RECOMMENDER, "UploadHistory", key.key_id, request), timeout=self._deadline
        )
        if len(self._histories) >= 64:  # a few live references; the oldest are forgotten
            self._histories.pop(next(iter(self._histories)))
        self._histories[reply.profile_ref] = ciphertext_sha256(blobs)
        return reply.profile_ref

    def score_profile(
        self, profile_ref: str, pin_model: str = "", query_sha256: bytes | None = None
    ) -> EncryptedScores:
        """Scores an uploaded history (or profile) by reference. The answer must name what was
        uploaded: ``query_sha256`` (``codec.ciphertext_sha256`` of the history ciphertexts), known
        here for references this client uploaded. NOT_FOUND once it expired: upload again."""
        expected = query_sha256 or self._histories.get(profile_ref)
        if expected is None and self._profile is not None and self._profile[1] == profile_ref:
            expected = self._profile[0]
        if expected is None:
            raise ClientError("unknown profile reference: pass the SHA-256 of what was uploaded")
        key = self._key_ref()
        request = recommender_pb2.ScoreRequest(key=key, profile_ref=profile_ref, model_version=pin_model)
        self._authorize(RECOMMENDER, "Score", key.key_id, request)
        return self._decrypt(self.stub.Score(request, timeout=self._deadline), expected, 0, pin_model)

    def score_history(self, weights: np.ndarray, pin_model: str = "") -> EncryptedScores:
        """Scores a history, uploading it only when these weights were not uploaded already (or
        the reference expired)."""
        digest = hashlib.sha256(np.ascontiguousarray(weights, dtype=np.float64).tobytes()).digest()
        for attempt in range(2):
            if self._history is None or self._history[0] != digest or attempt:
                self._history = (digest, self.upload_history(weights, pin_model))
            try:
                return self.score_profile(self._history[1], pin_model)
            except grpc.RpcError as exc:
                if reason_of(exc) != Reason.PROFILE_NOT_FOUND or attempt:  # expired: upload again
                    raise
        raise AssertionError("unreachable")

    def score_ciphertext(self, query: bytes, pin_model: str = "") -> EncryptedScores:
        """Scores an already encrypted query; sending the same bytes again (a retry) is answered
        from the server's result cache without recomputation."""
        key = self._key_ref()
        request = recommender_pb2.ScoreRequest(key=key, query_ciphertext=query, model_version=pin_model)
        response = self.stub.Score(self._authorize(RECOMMENDER, "Score", key.key_id, request), timeout=self._deadline)
        return self._decrypt(response, hashlib.sha256(query).digest(), len(query), pin_model)

    def _decrypt(
        self, response: recommender_pb2.ScoreResponse, query_sha256: bytes, query_bytes: int, pin_model: str = ""
    ) -> EncryptedScores:
        """The decrypted scores of ``response``, or ResponseRefused: every field is checked before
        anything sized by it is allocated, every score ciphertext before OpenFHE sees it."""
        keys = self._require_keys()
        blobs = list(response.score_ciphertexts)
        if response.query_sha256 != query_sha256:
            raise ResponseRefused("server's receipt names another query", Refusal.QUERY_MISMATCH)
        if response.response_sha256 != ciphertext_sha256(blobs):
            raise ResponseRefused(
                "server's response hash does not match the ciphertexts received", Refusal.RESPONSE_HASH_MISMATCH
            )
        if pin_model and response.model_version != pin_model:
            raise ResponseRefused("server answered for another model than the one pinned", Refusal.MODEL_MISMATCH)
        if self.key_version and response.key_version != self.key_version:  # it could not be decrypted here
            raise ResponseRefused(
                f"server scored under key version {response.key_version}; this device holds {self.key_version}",
                Refusal.KEY_VERSION_MISMATCH,
            )
        receipt = None
        if response.receipt_id:  # pure hashing: checked before any decryption
            receipt = Receipt(
                query_sha256=query_sha256.hex(),
                response_sha256=response.response_sha256.hex(),
                model_version=response.model_version,
                key_id=self.key_id or "",
                key_version=response.key_version,
                unix_millis=response.receipt_unix_millis,
            )
            if receipt.receipt_id != response.receipt_id:
                raise ResponseRefused(
                    "the server's receipt id does not match what was sent and received", Refusal.RECEIPT_MISMATCH
                )
        layout = response.layout
        p = self.params()
        if layout.slots != p.slots or layout.items_per_ciphertext != p.items_per_ciphertext:
            raise ResponseRefused("server's score layout does not match the parameter set", Refusal.LAYOUT_INVALID)
        known = self._manifest  # the catalogue size is public: the manifest of that model says it
        if layout.item_count == 0 or (
            known is not None
            and known.model_version == response.model_version
            and known.item_count != layout.item_count
        ):
            raise ResponseRefused(f"server's layout has {layout.item_count} items", Refusal.LAYOUT_INVALID)
        if len(blobs) != packing.block_count(layout.item_count, layout.items_per_ciphertext):
            raise ResponseRefused(
                f"{len(blobs)} score ciphertexts for {layout.item_count} items", Refusal.COUNT_INVALID
            )
        fold = max(1, layout.tail_fold)
        expected = packing.tail_fold(layout.item_count, p.slots, p.padded_dim, p.giant_steps)
        if fold != expected:
            raise ResponseRefused(
                f"server's tail fold {fold} is not the layout's {expected} for {layout.item_count} items",
                Refusal.LAYOUT_INVALID,
            )
        assert self._scores is not None
        tag = installed_tag(self.key_id or "", response.key_version)  # the tag the server scored under
        loaded = []
        for i, blob in enumerate(blobs):  # all of them before any decryption
            try:
                loaded.append(self._scores.load(blob, tag))
            except MaterialError as exc:
                raise ResponseRefused(f"score ciphertext {i}: {exc}", Refusal.CIPHERTEXT_INVALID, block=i) from None
        decrypted = []
        for ct in loaded:
            pt = keys.cc.Decrypt(keys.secret_key, ct)
            pt.SetLength(p.slots)
            decrypted.append(np.asarray(pt.GetCKKSPackedValue()))
        return EncryptedScores(
            model_version=response.model_version,
            scores=packing.unpack_scores(decrypted, layout.item_count, p.slots, fold, p.padded_dim),
            server_millis=response.server_millis,
            query_bytes=query_bytes,
            response_bytes=sum(len(b) for b in blobs),
            from_cache=response.from_cache,
            receipt=receipt,
            receipt_id=response.receipt_id,
        )

    def items(self, indices: Sequence[int] = (), item_ids: Sequence[str] = ()) -> list[recommender_pb2.Item]:
        """Display fields by index or id, from the server: it learns which items were asked for.
        The SDK's own paths never call this (``manifest()`` has the same fields)."""
        response = self.stub.GetItems(
            recommender_pb2.GetItemsRequest(indices=list(indices), item_ids=list(item_ids)), timeout=self._deadline
        )
        return list(response.items)

    def manifest(self, refresh: bool = False) -> Manifest:
        """The serving model's catalogue manifest: from memory, else from the device's cache
        (checked against the digest in the model info), else downloaded once and cached."""
        if self._manifest is not None and not refresh:
            return self._manifest
        info = self.model_info()
        try:
            found = self.manifests.load(info.version, info.manifest_sha256)
            if found is None:
                reply = self.stub.GetCatalogueManifest(
                    recommender_pb2.GetCatalogueManifestRequest(model_version=info.version), timeout=self._deadline
                )
                found = decode_manifest(reply.encoded, expected_sha256=info.manifest_sha256)
                self.manifest_downloads += 1
                if found.model_version != info.version or found.item_count != info.item_count:
                    raise ClientError("the manifest served is not the one of the serving model")
                self.manifests.store(info.version, reply.encoded)
        except ManifestError as exc:
            raise ClientError(f"catalogue manifest refused: {exc}") from None
        self._manifest = found
        return found

    def items_of_creator(self, creator_id: str) -> list[int]:
        """Catalogue indices of a creator's videos, from the manifest (no request names them)."""
        try:
            return self.manifest().items_of_creator(creator_id)
        except KeyError:
            raise ClientError(f"creator {creator_id!r} is not in the catalogue") from None

    def recommend(
        self, history: list[Engagement], k: int = 10, per_creator_cap: int = 2
    ) -> tuple[list[CatalogueItem], EncryptedScores]:
        """The private feed for an engagement history: top ``k`` unseen items, capped per creator.

        The history leaves the device only as ciphertext (``upload_history``, once per distinct
        history); seen items, the creator cap and the display fields come from the manifest on
        the device: no request names a history or feed item (tests/test_privacy.py).
        """
        manifest = self.manifest()
        try:
            scored = self._score_history(history, manifest)
        except grpc.RpcError as exc:
            if reason_of(exc) != Reason.MODEL_MISMATCH:
                raise
            manifest = self.manifest(refresh=True)  # the model changed since the cached manifest
            scored = self._score_history(history, manifest)
        seen = [manifest.index_of[e.item_id] for e in history if e.item_id in manifest.index_of]
        feed = rank_feed(scored.scores, k, manifest.creator_of, seen=seen, per_creator_cap=per_creator_cap)
        return [manifest.item(i) for i in feed], scored

    def _score_history(self, history: list[Engagement], manifest: Manifest) -> EncryptedScores:
        # The history becomes weights over the manifest's indices here, on the device, and
        # leaves it encrypted; the server projects it with its embeddings (E(u) = X^T E(w)).
        weights = history_weights(history, manifest.index_of, manifest.item_count)
        return self.score_history(weights, pin_model=manifest.model_version)
