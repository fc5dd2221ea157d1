"""The recommender's domain core: everything the gRPC servicer exposes, with typed errors."""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import openfhe
from google.protobuf.message import Message

from cipherfeed import heap, manifest
from cipherfeed.cache import Cache, Keys, WriteBehind
from cipherfeed.config import GrpcLimits, OwnerAuthConfig, RedisConfig, ScoreRateLimit
from cipherfeed.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
    ResourceExhausted,
    Unavailable,
    echo,
)
from cipherfeed.he import packing, rnsmac, wire
from cipherfeed.he.codec import MaterialCodec, MaterialError, OrderedDigest, ciphertext_sha256
from cipherfeed.he.params import HEParams
from cipherfeed.keystate import KeyStatus, check_key_id
from cipherfeed.receipts import ModelRecord, Receipt
from cipherfeed.v1 import common_pb2, keyservice_pb2_grpc
from services.recommender.artifact import ModelArtifact
from services.recommender.evalkeys import InstalledKeys, KeyResolver
from services.recommender.history import (
    HistoryError,
    HistoryProjector,
    HistoryRecord,
    catalogue_sha256,
    frame_history,
    unframe_history,
)
from services.recommender.owners import OwnerChecks
from services.recommender.receipts import ReceiptSpool
from services.recommender.scoring import EncryptedScorer, ScoreTiming, SelfCheckError
from services.recommender.sharding import (
    BlockRange,
    block_range,
    catalogue_blocks,
    history_input_rotations,
    kernel_name,
    model_slice,
    scoring_strategy,
)

log = logging.getLogger(__name__)
MAX_ITEMS_PER_REQUEST = 1000


class OversizeError(ResourceExhausted):
    """A request field exceeds its configured limit."""

    reason = Reason.SIZE_LIMIT


class UnknownItemError(NotFound):
    """An item index or id is not in the catalogue."""

    reason = Reason.ITEM_NOT_FOUND


class ModelMismatchError(FailedPrecondition):
    """The client pinned a model version that is not the one serving."""

    reason = Reason.MODEL_MISMATCH


class UnknownProfileError(NotFound):
    """The profile reference expired or never existed (upload the profile again)."""

    reason = Reason.PROFILE_NOT_FOUND


@dataclass(frozen=True)
class ScoreResult:
    model_version: str
    item_count: int
    items_per_ciphertext: int
    tail_fold: int
    slots: int
    ciphertexts: list[bytes]
    query_sha256: bytes
    response_sha256: bytes
    server_millis: float
    from_cache: bool = False
    key_version: int = 0
    receipt_id: str = ""
    receipt_unix_millis: int = 0


@dataclass(frozen=True)
class ItemView:
    index: int
    item_id: str
    creator_id: str
    creator_nickname: str
    url: str
    popularity: float
    posted_unix: int


@dataclass(frozen=True)
class EncodedManifest:
    model_version: str
    encoded: bytes
    sha256: bytes


@dataclass(frozen=True)
class KeyLimits:
    max_count: int
    max_bytes: int


class RecommenderCore:
    """Serves the catalogue's blocks ``blocks`` (all of them unless it is a shard: ``shard`` =
    (index, count)). Only a recommender with every block answers clients' Scores itself; a
    shard's blocks are asked for by a coordinator (``services.recommender.coordinator``)."""

    scorer: EncryptedScorer
    blocks: BlockRange

    def __init__(
        self,
        model: ModelArtifact,
        params: HEParams,
        threads: int,
        limits: GrpcLimits,
        keyservice: keyservice_pb2_grpc.KeyServiceStub,
        key_limits: KeyLimits,
        redis_config: RedisConfig | None = None,
        keyservice_deadline: float = 10.0,
        receipts: ReceiptSpool | None = None,
        owner_auth: OwnerAuthConfig | None = None,
        score_rate: ScoreRateLimit | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        heap.limit_arenas(1)  # before the pools start: key sets come and go on many threads
        self.model = model
        self.params = params
        self.limits = limits
        self.model_version = model.version
        self.redis_config = redis_config or RedisConfig()
        self.cache = Cache(self.redis_config)
        self.results = WriteBehind(self.cache)  # a response never waits for its result to be cached
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckks")
        self.codec = MaterialCodec(params)
        self.block_count = catalogue_blocks(model, params.items_per_ciphertext)
        self.tail_fold = packing.tail_fold(model.item_count, params.slots, params.padded_dim, params.giant_steps)
        self.catalogue_sha256 = catalogue_sha256(model.item_ids)
        self._build_engines(model, shard)
        t0 = time.perf_counter()
        self.codec.warm_up()
        log.info("learned the byte templates of queries and keys in %.1f s", time.perf_counter() - t0)
        self.installed = InstalledKeys(self.codec, key_limits.max_count, key_limits.max_bytes)
        self.keys = KeyResolver(
            self.codec, self.installed, self.cache, self.redis_config, keyservice, keyservice_deadline
        )
        self.owners = OwnerChecks(
            keyservice, owner_auth or OwnerAuthConfig(), score_rate or ScoreRateLimit(), keyservice_deadline
        )
        self._index = {item_id: i for i, item_id in enumerate(model.item_ids)}
        self._manifest: EncodedManifest | None = None
        self._manifest_lock = threading.Lock()
        self.receipts = receipts
        if receipts is not None:  # the log records which model served from when
            receipts.put(ModelRecord(self.model_version, model.created_by, model.item_count, _now_ms()))

    def _build_engines(self, model: ModelArtifact, shard: tuple[int, int] | None) -> None:
        """The scorer and history projector of this recommender's blocks (a shard's: its slice
        of the catalogue, with the whole catalogue's strategies, so that its bytes are the ones
        one recommender would make for those blocks)."""
        self.blocks = block_range(self.block_count, *(shard or (0, 1)))
        kernel = kernel_name()
        sliced = model_slice(model, self.blocks, self.params.items_per_ciphertext)
        strategy = scoring_strategy(self.block_count, kernel)
        rotations = history_input_rotations(self.block_count)
        params = self.params
        t0 = time.perf_counter()
        self.scorer = EncryptedScorer(sliced, params, self.pool, strategy=strategy, kernel=kernel)
        log.info(
            "model %s: %d items encoded into %d blocks in %.1f s (%s strategy, %s kernel%s)",
            self.model_version[:16],
            sliced.item_count,
            self.scorer.block_count,
            time.perf_counter() - t0,
            self.scorer.strategy,
            self.scorer.kernel,
            "" if self.scorer.kernel == "native" else f": {rnsmac.IMPORT_ERROR}",
        )
        t0 = time.perf_counter()
        try:  # before serving: the native kernel must give OpenFHE's bytes under this OpenFHE build
            checked = self.scorer.self_check(self.codec.load_query)
        except SelfCheckError as exc:
            log.error("%s", exc)
            self.pool.shutdown(wait=False)
            raise
        if checked:
            log.info(
                "scoring self-check: blocks %s scored by the native kernel are OpenFHE's bytes (%.1f s)",
                checked,
                time.perf_counter() - t0,
            )
        t0 = time.perf_counter()
        self.history = HistoryProjector(sliced, params, self.pool, kernel=kernel, input_rotations=rotations)
        log.info(
            "history projection: %d blocks, %d input rotations, %s kernel, encoded in %.1f s",
            self.history.block_count,
            self.history.input_rotations,
            self.history.kernel,
            time.perf_counter() - t0,
        )

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.results.close()
        self.cache.close()
        if self.receipts is not None:
            self.receipts.close()

    def _check_query_size(self, query: bytes) -> None:
        if len(query) > self.limits.max_query_bytes:
            limit = self.limits.max_query_bytes
            raise OversizeError(
                f"query is {len(query)} bytes; the limit is {limit}",
                metadata={"field": "query_ciphertext", "size": len(query), "limit": limit},
            )

    def authorize(self, method: str, request: Message, key_id: str) -> KeyStatus:
        """The key's status, if ``request`` carries its owner's authorization for ``method``
        (``cipherfeed.v1.Recommender/<Method>``); Unauthenticated / PermissionDenied otherwise.
        Checked before the key's state, so others learn nothing about it."""
        status = self.keys.status(check_key_id(key_id, "key.key_id"))
        self.owners.authorize(method, request, status)
        return status

    def upload_profile(self, ref: common_pb2.KeyRef, query: bytes, status: KeyStatus | None = None) -> tuple[str, int]:
        """Stores a validated encrypted interest vector in the cache; returns (reference, expiry)."""
        self._check_query_size(query)
        _, version = self.keys.usable_version(ref, status)
        self.codec.load_query(query)
        if not self.cache.enabled:
            raise Unavailable(
                "profiles are kept in the cache, and none is configured; send the query inline",
                metadata={"dependency": "cache"},
            )
        profile_ref = secrets.token_urlsafe(24)
        blob = _frame_profile(ref.key_id, version, query)
        if not self.cache.set(Keys.profile(profile_ref), blob, self.redis_config.profile_ttl):
            raise Unavailable("the cache is unavailable; send the query inline", metadata={"dependency": "cache"})
        return profile_ref, int(time.time()) + self.redis_config.profile_ttl

    def _profile(self, profile_ref: str, ref: common_pb2.KeyRef) -> tuple[bytes, int] | HistoryRecord:
        blob = self.cache.get(Keys.profile(profile_ref)) if profile_ref else None
        if blob is None:
            raise UnknownProfileError("profile expired or unknown; upload it again")
        if blob.startswith(HISTORY_PREFIX):
            try:
                record = HistoryRecord.from_bytes(blob)
            except HistoryError:
                raise UnknownProfileError("stored history is unreadable; upload it again") from None
            if record.key_id != ref.key_id:
                raise InvalidArgument("the history was uploaded under another key")
            if record.catalogue_sha256 != self.catalogue_sha256:
                raise UnknownProfileError("the history indexes another catalogue; upload it again")
            return record
        key_id, version, query = _unframe_profile(blob)
        if key_id != ref.key_id:
            raise InvalidArgument("the profile was uploaded under another key", reason=Reason.PROFILE_KEY_MISMATCH)
        return query, version

    def upload_history(
        self,
        ref: common_pb2.KeyRef,
        ciphertexts: list[bytes],
        pinned_model: str = "",
        status: KeyStatus | None = None,
        deadline: float | None = None,
    ) -> tuple[str, int, float]:
        """Validates an encrypted history, projects it to E(u) and stores both in the cache;
        returns (reference, expiry, projection milliseconds). ``deadline``: the caller's, as
        ``time.monotonic()`` (a coordinator's calls to its shards end by then)."""
        self._check_model(pinned_model)
        if len(ciphertexts) != self.block_count:
            raise InvalidArgument(
                f"{len(ciphertexts)} history ciphertexts; this catalogue of {self.model.item_count} items"
                f" takes {self.block_count}"
            )
        for blob in ciphertexts:
            self._check_query_size(blob)
        checked = self.keys.usable_version(ref, status)
        loaded = [self._load_history(i, blob) for i, blob in enumerate(ciphertexts)]
        if not self.cache.enabled:
            raise Unavailable("histories are kept in the cache, and none is configured")
        record = HistoryRecord(ref.key_id, checked[1], self.catalogue_sha256, ciphertext_sha256(ciphertexts))
        started = time.perf_counter()
        record, _ = self._project(record, ciphertexts, loaded, checked, deadline)
        millis = 1e3 * (time.perf_counter() - started)
        profile_ref = secrets.token_urlsafe(24)
        if not self._store_history(profile_ref, record, ciphertexts):
            raise Unavailable("the cache is unavailable; upload the history again later")
        return profile_ref, int(time.time()) + self.redis_config.profile_ttl, millis

    def _store_history(self, profile_ref: str, record: HistoryRecord, ciphertexts: list[bytes]) -> bool:
        """E(w) under its own key (read only to project again), then the record with E(u), which
        Score reads: a reader never finds a record without its history."""
        ttl = self.redis_config.profile_ttl
        return self.cache.set(Keys.history(profile_ref), frame_history(ciphertexts), ttl) and self.cache.set(
            Keys.profile(profile_ref), record.to_bytes(), ttl
        )

    def _load_history(self, i: int, blob: bytes) -> openfhe.Ciphertext:
        try:
            return self.codec.load_query(blob)
        except MaterialError as exc:  # the same checks, and status, as a query's
            raise MaterialError(f"history ciphertext {i}: {exc}") from None

    def _project(
        self,
        record: HistoryRecord,
        blobs: list[bytes],
        loaded: list[openfhe.Ciphertext],
        checked: tuple[KeyStatus, int],
        deadline: float | None = None,
    ) -> tuple[HistoryRecord, openfhe.Ciphertext]:
        """E(u) for the serving model, with the client's keys installed (``blobs``: the
        validated ciphertexts ``loaded`` came from)."""
        with self.keys.holding(record.key_id, checked) as (tag, version):
            for ct in loaded:
                ct.SetKeyTag(tag)
            profile, timing = self.history.project(loaded)
        log.info(
            "projected a %d-block history for key %s v%d: inputs %.1f ms, products %.1f ms, rotations %.1f ms",
            len(loaded),
            record.key_id[:16],
            version,
            timing.inputs_ms,
            timing.products_ms,
            timing.rotations_ms,
        )
        return record.with_profile(self.model_version, self.history.export(profile)), profile

    def _check_model(self, pinned_model: str) -> None:
        if pinned_model and pinned_model != self.model_version:
            raise ModelMismatchError(
                f"model {pinned_model[:16]} requested; this recommender serves {self.model_version[:16]}",
                metadata={"serving_model": self.model_version},
            )

    def score(
        self,
        ref: common_pb2.KeyRef,
        query: bytes | None,
        profile_ref: str = "",
        pinned_model: str = "",
        status: KeyStatus | None = None,
        deadline: float | None = None,
    ) -> ScoreResult:
        """``deadline``: the caller's, as ``time.monotonic()`` (see ``upload_history``)."""
        self._check_model(pinned_model)
        started = time.perf_counter()
        if query is None:
            stored = self._profile(profile_ref, ref)
            if isinstance(stored, HistoryRecord):
                return self._score_history(profile_ref, stored, started, deadline)
            query, profile_version = stored
            ref = common_pb2.KeyRef(key_id=ref.key_id, version=profile_version)
        self._check_query_size(query)
        query_sha256 = hashlib.sha256(query).digest()
        checked = self.keys.usable_version(ref, status)  # a disabled key is refused, even from the cache
        version = checked[1]
        result_key = Keys.result(self.model_version, ref.key_id, version, query_sha256.hex())
        cached = self.results.get(result_key)
        if cached is not None:
            blobs = _unframe_blobs(cached)
            return self._result(blobs, query_sha256, started, ref.key_id, version, from_cache=True)
        key = common_pb2.KeyRef(key_id=ref.key_id, version=version)
        blobs, response_sha256, timing, version = self._score_encrypted(key, checked, query, None, deadline)
        self.results.set(result_key, _frame_blobs(blobs), self.redis_config.result_ttl)
        result = self._result(blobs, query_sha256, started, ref.key_id, version, False, response_sha256)
        log.info(
            "scored %d items for key %s v%d: rotations %.1f ms, blocks %.1f ms, total %.1f ms",
            self.model.item_count,
            ref.key_id[:16],
            version,
            timing.rotations_ms,
            timing.blocks_ms,
            result.server_millis,
        )
        return result

    def _score_encrypted(
        self,
        ref: common_pb2.KeyRef,
        checked: tuple[KeyStatus, int],
        query: bytes | None,
        profile: bytes | None,
        deadline: float | None = None,
    ) -> tuple[list[bytes], bytes, ScoreTiming, int]:
        """Every block's packed scores of a validated inline ``query`` or a history's lifted
        ``profile`` (``HistoryProjector.export`` words), their response digest, the timing and
        the key version that served."""
        if query is not None:
            blobs, digest, timing, version = self._score_local(ref, checked, self.codec.load_query(query), False)
        else:
            assert profile is not None
            blobs, digest, timing, version = self._score_local(ref, checked, self.history.restore(profile), True)
        return blobs, digest.digest(), timing, version

    def _score_local(
        self,
        ref: common_pb2.KeyRef,
        checked: tuple[KeyStatus, int],
        ct: openfhe.Ciphertext,
        lifted: bool,
        shipped: rnsmac.Words | None = None,
    ) -> tuple[list[bytes], OrderedDigest, ScoreTiming, int]:
        """This recommender's blocks scored, with the client's keys installed (``shipped``: the
        query's rotations as a coordinator made them)."""
        with self.keys.holding(ref.key_id, checked) as (tag, version):
            ct.SetKeyTag(tag)
            digest = OrderedDigest(self.scorer.block_count)  # hashed as the blocks come in
            blobs, timing = self.scorer.score(
                ct, finish=functools.partial(self._encode_scores, digest=digest), lifted=lifted, shipped=shipped
            )
        return blobs, digest, timing, version

    # -- a shard's blocks, for a coordinator (RecommenderShard) ---------------------------------

    def _check_shard_request(self, ref: common_pb2.KeyRef, pinned_model: str) -> tuple[KeyStatus, int]:
        if pinned_model != self.model_version:  # required: a shard never guesses which model is meant
            raise ModelMismatchError(
                f"model {echo(pinned_model[:16])} asked of a shard serving {self.model_version[:16]}",
                metadata={"serving_model": self.model_version},
            )
        if ref.version == 0:
            raise InvalidArgument("a shard is asked for a concrete key version", reason=Reason.FIELD_INVALID)
        # The coordinator checked the owner and the rate; the key's state is checked again here,
        # so a key disabled meanwhile is refused by every shard, not only by the coordinator.
        return self.keys.usable_version(ref)

    def score_blocks(
        self,
        ref: common_pb2.KeyRef,
        pinned_model: str,
        query: bytes | None,
        profile: bytes | None,
        rotations: bytes = b"",
    ) -> tuple[list[bytes], float]:
        """This recommender's blocks' packed scores of an inline query or a lifted profile, and
        the milliseconds they took. ``rotations``: the query's rotations as the coordinator made
        them once for every shard (``EncryptedScorer.rotation_words``); empty: made here."""
        checked = self._check_shard_request(ref, pinned_model)
        started = time.perf_counter()
        shipped = self._shipped_rotations(rotations) if rotations else None  # the openfhe kernel ignores them
        if query is not None:
            self._check_query_size(query)
            ct = self.codec.load_query(query)
        elif profile is not None:
            try:
                ct = self.history.restore(profile)
            except HistoryError as exc:
                raise InvalidArgument(f"lifted profile: {exc}", reason=Reason.HE_MATERIAL_INVALID) from None
        else:
            raise InvalidArgument("a query ciphertext or a lifted profile is required", reason=Reason.FIELD_REQUIRED)
        blobs, _, timing, version = self._score_local(ref, checked, ct, profile is not None, shipped)
        millis = 1e3 * (time.perf_counter() - started)
        log.info(
            "scored blocks %d..%d for key %s v%d: rotations %.1f ms%s, blocks %.1f ms, total %.1f ms",
            self.blocks.first,
            self.blocks.stop - 1,
            ref.key_id[:16],
            version,
            timing.rotations_ms,
            " (shipped)" if shipped is not None and self.scorer.kernel == "native" else "",
            timing.blocks_ms,
            millis,
        )
        return blobs, millis

    def _shipped_rotations(self, data: bytes) -> rnsmac.Words:
        """A coordinator's rotation words, checked: the exact size, every word below q0 (the
        kernel's arithmetic assumes reduced inputs)."""
        shape = self.scorer.rotation_shape
        if len(data) != 8 * shape[0] * shape[1] * shape[2]:
            raise InvalidArgument(
                f"query rotations of {len(data)} bytes; this scorer takes {shape} words",
                reason=Reason.HE_MATERIAL_INVALID,
            )
        words = np.frombuffer(data, dtype="<u8").reshape(shape)
        if int(words.max(initial=0)) >= self.scorer.modulus:
            raise InvalidArgument("query rotations hold a word not below q0", reason=Reason.HE_MATERIAL_INVALID)
        return words.astype(np.uint64, copy=False)

    def project_blocks(
        self, ref: common_pb2.KeyRef, pinned_model: str, first_block: int, ciphertexts: list[bytes]
    ) -> tuple[bytes, float]:
        """This recommender's share of a history's t_q (``HistoryProjector.partial_sums``)."""
        checked = self._check_shard_request(ref, pinned_model)
        if first_block != self.blocks.first or len(ciphertexts) != self.blocks.blocks:
            raise InvalidArgument(
                f"history blocks {first_block}..+{len(ciphertexts)} asked of the shard of blocks"
                f" {self.blocks.first}..+{self.blocks.blocks}"
            )
        for blob in ciphertexts:
            self._check_query_size(blob)
        loaded = [self._load_history(self.blocks.first + i, blob) for i, blob in enumerate(ciphertexts)]
        started = time.perf_counter()
        with self.keys.holding(ref.key_id, checked) as (tag, _):  # input rotations use the client's keys
            for ct in loaded:
                ct.SetKeyTag(tag)
            shares = self.history.partial_sums(loaded)
        return shares, 1e3 * (time.perf_counter() - started)

    def _score_history(
        self, profile_ref: str, record: HistoryRecord, started: float, deadline: float | None = None
    ) -> ScoreResult:
        """Scores a history profile: its E(u) under the serving model, projected again from the
        stored E(w) first if another model made it (a model update needs no new upload)."""
        ref = common_pb2.KeyRef(key_id=record.key_id, version=record.key_version)
        query_sha256 = record.history_sha256
        checked = self.keys.usable_version(ref)
        version = checked[1]
        result_key = Keys.result(self.model_version, ref.key_id, version, query_sha256.hex())
        cached = self.results.get(result_key)
        if cached is not None:
            blobs = _unframe_blobs(cached)
            return self._result(blobs, query_sha256, started, ref.key_id, version, from_cache=True)
        profile = record.profile if record.model_version == self.model_version else b""
        if profile:
            try:
                self.history.check_words(profile, 1, "a stored profile")
            except HistoryError:
                log.warning("stored history profile %s does not load; projecting it again", profile_ref[:8])
                profile = b""
        if not profile:  # another model projected it (or nothing did): project it again
            stored = self.cache.get(Keys.history(profile_ref))
            if stored is None:
                raise UnknownProfileError("the history expired; upload it again")
            try:
                blobs = unframe_history(stored, record.history_sha256)
            except HistoryError:
                raise UnknownProfileError("stored history is unreadable; upload it again") from None
            loaded = [self._load_history(i, blob) for i, blob in enumerate(blobs)]
            record, _ = self._project(record, blobs, loaded, checked, deadline)
            self._store_history(profile_ref, record, blobs)
            profile = record.profile
        blobs, response_sha256, timing, version = self._score_encrypted(ref, checked, None, profile, deadline)
        self.results.set(result_key, _frame_blobs(blobs), self.redis_config.result_ttl)
        result = self._result(blobs, query_sha256, started, ref.key_id, version, False, response_sha256)
        log.info(
            "scored %d items by history for key %s v%d: rotations %.1f ms, blocks %.1f ms, total %.1f ms",
            self.model.item_count,
            ref.key_id[:16],
            version,
            timing.rotations_ms,
            timing.blocks_ms,
            result.server_millis,
        )
        return result

    def _encode_scores(self, b: int, blob: bytes, digest: OrderedDigest) -> bytes:
        packed = wire.pack(blob, (self.params.ring_dimension,), self.scorer.vector_runs(blob))
        digest.add(b, packed)
        return packed

    def _result(
        self,
        blobs: list[bytes],
        query_sha256: bytes,
        started: float,
        key_id: str,
        version: int,
        from_cache: bool,
        response_sha256: bytes | None = None,
    ) -> ScoreResult:
        if response_sha256 is None:
            response_sha256 = ciphertext_sha256(blobs)
        receipt_id, when = "", 0
        if self.receipts is not None:  # one receipt per answer, cached or not: a bounded enqueue
            when = _now_ms()
            receipt = Receipt(query_sha256.hex(), response_sha256.hex(), self.model_version, key_id, version, when)
            self.receipts.put(receipt)
            receipt_id = receipt.receipt_id
        return ScoreResult(
            model_version=self.model_version,
            item_count=self.model.item_count,
            items_per_ciphertext=self.params.items_per_ciphertext,
            tail_fold=self.tail_fold,
            slots=self.params.slots,
            ciphertexts=blobs,
            query_sha256=query_sha256,
            response_sha256=response_sha256,
            server_millis=1e3 * (time.perf_counter() - started),
            from_cache=from_cache,
            key_version=version,
            receipt_id=receipt_id,
            receipt_unix_millis=when,
        )

    def manifest(self, pinned_model: str = "") -> EncodedManifest:
        """The catalogue manifest of the serving model, encoded on first use (a 1M-item catalogue
        takes seconds, which a server that is never asked for it should not pay at start)."""
        if pinned_model and pinned_model != self.model_version:
            raise ModelMismatchError(
                f"manifest of model {pinned_model[:16]} requested; this recommender serves {self.model_version[:16]}"
            )
        with self._manifest_lock:
            if self._manifest is None:
                m = self.model
                t0 = time.perf_counter()
                encoded = manifest.encode(
                    self.model_version,
                    m.item_ids,
                    m.creator_index,
                    m.creator_ids,
                    m.creator_nicknames,
                    m.posted_unix,
                    m.popularity,
                )
                self._manifest = EncodedManifest(self.model_version, encoded, hashlib.sha256(encoded).digest())
                log.info(
                    "catalogue manifest: %d items in %d bytes (%.1f B/item), encoded in %.2f s",
                    m.item_count,
                    len(encoded),
                    len(encoded) / max(1, m.item_count),
                    time.perf_counter() - t0,
                )
            return self._manifest

    def items(self, indices: list[int], item_ids: list[str]) -> list[ItemView]:
        if len(indices) + len(item_ids) > MAX_ITEMS_PER_REQUEST:
            raise OversizeError(
                f"at most {MAX_ITEMS_PER_REQUEST} items per request",
                reason=Reason.COUNT_LIMIT,
                metadata={"field": "indices+item_ids", "limit": MAX_ITEMS_PER_REQUEST},
            )
        resolved = list(indices)
        for item_id in item_ids:
            found = self._index.get(item_id)
            if found is None:
                raise UnknownItemError(f"unknown item id {echo(item_id)}")
            resolved.append(found)
        m = self.model
        views = []
        for i in resolved:
            if not 0 <= i < m.item_count:
                raise UnknownItemError(f"item index {i} is outside the catalogue (0..{m.item_count - 1})")
            creator = int(m.creator_index[i])
            views.append(
                ItemView(
                    index=i,
                    item_id=m.item_ids[i],
                    creator_id=m.creator_ids[creator],
                    creator_nickname=m.creator_nicknames[creator],
                    url=item_url(m.creator_ids[creator], m.item_ids[i]),
                    popularity=float(m.popularity[i]),
                    posted_unix=int(m.posted_unix[i]),
                )
            )
        return views


def item_url(creator_id: str, item_id: str) -> str:
    template = manifest.SYNTHETIC_URL if creator_id.startswith("syn-") else manifest.TIKTOK_URL
    return template.format(creator_id=creator_id, item_id=item_id)


HISTORY_PREFIX = b"CFHIST"


def _frame_profile(key_id: str, version: int, query: bytes) -> bytes:
    kid = key_id.encode()
    return b"CFPROF1" + len(kid).to_bytes(1, "big") + kid + version.to_bytes(4, "big") + query


def _unframe_profile(blob: bytes) -> tuple[str, int, bytes]:
    if not blob.startswith(b"CFPROF1"):
        raise UnknownProfileError("stored profile is unreadable; upload it again")
    n = blob[7]
    key_id = blob[8 : 8 + n].decode()
    version = int.from_bytes(blob[8 + n : 12 + n], "big")
    return key_id, version, blob[12 + n :]


def _frame_blobs(blobs: list[bytes]) -> bytes:
    return len(blobs).to_bytes(4, "big") + b"".join(len(b).to_bytes(8, "big") + b for b in blobs)


def _unframe_blobs(data: bytes) -> list[bytes]:
    count = int.from_bytes(data[:4], "big")
    pos, blobs = 4, []
    for _ in range(count):
        size = int.from_bytes(data[pos : pos + 8], "big")
        blobs.append(data[pos + 8 : pos + 8 + size])
        pos += 8 + size
    return blobs


def _now_ms() -> int:
    return int(time.time() * 1000)
