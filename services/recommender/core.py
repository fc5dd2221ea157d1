"""The recommender's domain core: everything the gRPC servicer exposes, with typed errors."""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cipherfeed.config import GrpcLimits
from cipherfeed.he.codec import MaterialCodec, ciphertext_sha256, serialize
from cipherfeed.he.params import HEParams
from services.recommender.artifact import ModelArtifact
from services.recommender.evalkeys import EvalKeyRegistry
from services.recommender.scoring import EncryptedScorer

log = logging.getLogger(__name__)
MAX_ITEMS_PER_REQUEST = 1000


class OversizeError(ValueError):
    """A request field exceeds its configured limit."""


class UnknownItemError(LookupError):
    """An item index or id is not in the catalogue."""


class ModelMismatchError(RuntimeError):
    """The client pinned a model version that is not the one serving."""


@dataclass(frozen=True)
class ScoreResult:
    model_version: str
    item_count: int
    items_per_ciphertext: int
    slots: int
    ciphertexts: list[bytes]
    query_sha256: bytes
    response_sha256: bytes
    server_millis: float


@dataclass(frozen=True)
class ItemView:
    index: int
    item_id: str
    creator_id: str
    creator_nickname: str
    url: str
    popularity: float
    posted_unix: int
    embedding: list[float] | None


class RecommenderCore:
    def __init__(
        self, model: ModelArtifact, params: HEParams, threads: int, max_keys: int, limits: GrpcLimits
    ) -> None:
        self.model = model
        self.params = params
        self.limits = limits
        self.model_version = model.version
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckks")
        self.codec = MaterialCodec(params)
        t0 = time.perf_counter()
        self.scorer = EncryptedScorer(model, params, self.pool)
        log.info(
            "model %s: %d items encoded into %d blocks in %.1f s",
            self.model_version[:16],
            model.item_count,
            self.scorer.block_count,
            time.perf_counter() - t0,
        )
        self.registry = EvalKeyRegistry(self.codec, max_keys)
        t0 = time.perf_counter()
        self.codec.warm_up()
        log.info("learned the byte templates of queries and keys in %.1f s", time.perf_counter() - t0)
        self._index = {item_id: i for i, item_id in enumerate(model.item_ids)}

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def register_keys(self, public_key: bytes, rotation_keys: bytes) -> str:
        if len(rotation_keys) > self.limits.max_eval_key_bytes:
            raise OversizeError(
                f"rotation key map is {len(rotation_keys)} bytes; "
                f"the limit is {self.limits.max_eval_key_bytes}"
            )
        key_id = self.registry.register(public_key, rotation_keys)
        log.info("registered rotation keys %s (%d held)", key_id[:16], len(self.registry))
        return key_id

    def score(self, key_id: str, query: bytes, pinned_model: str = "") -> ScoreResult:
        if pinned_model and pinned_model != self.model_version:
            raise ModelMismatchError(
                f"model {pinned_model[:16]} requested; this recommender serves {self.model_version[:16]}"
            )
        if len(query) > self.limits.max_query_bytes:
            raise OversizeError(f"query is {len(query)} bytes; the limit is {self.limits.max_query_bytes}")
        started = time.perf_counter()
        ct = self.codec.load_query(query)
        with self.registry.use(key_id) as tag:
            ct.SetKeyTag(tag)
            outputs, timing = self.scorer.score(ct)
        blobs = list(self.pool.map(serialize, outputs))
        elapsed = 1e3 * (time.perf_counter() - started)
        log.info(
            "scored %d items for key %s: rotations %.1f ms, blocks %.1f ms, total %.1f ms",
            self.model.item_count,
            key_id[:16],
            timing.rotations_ms,
            timing.blocks_ms,
            elapsed,
        )
        return ScoreResult(
            model_version=self.model_version,
            item_count=self.model.item_count,
            items_per_ciphertext=self.params.items_per_ciphertext,
            slots=self.params.slots,
            ciphertexts=blobs,
            query_sha256=hashlib.sha256(query).digest(),
            response_sha256=ciphertext_sha256(blobs),
            server_millis=elapsed,
        )

    def items(self, indices: list[int], item_ids: list[str], include_embedding: bool) -> list[ItemView]:
        if len(indices) + len(item_ids) > MAX_ITEMS_PER_REQUEST:
            raise OversizeError(f"at most {MAX_ITEMS_PER_REQUEST} items per request")
        resolved = list(indices)
        for item_id in item_ids:
            found = self._index.get(item_id)
            if found is None:
                raise UnknownItemError(f"unknown item id {item_id!r}")
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
                    embedding=m.embeddings[i].astype(np.float64).tolist() if include_embedding else None,
                )
            )
        return views


def item_url(creator_id: str, item_id: str) -> str:
    if creator_id.startswith("syn-"):
        return f"synthetic://{creator_id}/{item_id}"
    return f"https://www.tiktok.com/@{creator_id}/video/{item_id}"
