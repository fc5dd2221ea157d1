"""The sharding coordinator: the recommender clients talk to when the catalogue is sharded.

It does everything a recommender does for a request (owner authorization, rate limits, key
state, the result and profile caches, the receipt) except the encrypted work on the catalogue's
blocks, which it asks every shard for at once (``RecommenderShard``, over mutual TLS, callable
only by the recommender identity) under the request's own deadline:

* Score: the same query (or a history's lifted E(u)) to every shard, with its rotations made once
  here (native kernel): every block needs the same 15 rotated queries, and making them on every
  shard repeated a third of a shard's work per shard; the packed score blocks come
  back in catalogue order, are joined in shard order and hashed as one response, and one receipt
  covers them all: the client sees exactly the answer (and receipt form) one recommender gives.
* UploadHistory: each shard gets its blocks of E(w) and returns its share of the products
  ``t_q`` (summed before any rotation); the coordinator adds the shares mod q (no key needed) and
  makes the rotations of the projection once, with the client's rotation keys. E(u) is then
  bit-identical to one recommender's, and stored in the coordinator's profile cache as before.

Any shard failing, late, or answering for another model or block range fails the whole request
with UNAVAILABLE: a partial feed is never presented as a whole one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import openfhe

from cipherfeed import tls as mtls
from cipherfeed.config import GrpcLimits, TlsConfig
from cipherfeed.errors import CipherfeedError, FailedPrecondition, NotFound, Reason, Unavailable
from cipherfeed.grpcutil import reason_of
from cipherfeed.he.codec import ciphertext_sha256
from cipherfeed.keystate import KeyStatus
from cipherfeed.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from services.recommender.artifact import ModelArtifact
from services.recommender.core import RecommenderCore
from services.recommender.history import HistoryError, HistoryProjector, HistoryRecord
from services.recommender.scoring import EncryptedScorer, ScoreTiming
from services.recommender.sharding import (
    BlockRange,
    block_range,
    history_input_rotations,
    kernel_name,
    scoring_strategy,
)

log = logging.getLogger(__name__)
SAFETY_MARGIN_SECONDS = 0.05  # left of the caller's deadline to merge and answer
# A restarted shard is found again within seconds (grpc's default backoff grows to 120 s): until
# then every Score fails fast with UNAVAILABLE, which clients retry.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]
# Refusals of a shard about the key itself: the client's own problem, passed on as they are.
KEY_REASONS = {Reason.KEY_NOT_ENABLED, Reason.KEY_VERSION_UNAVAILABLE, Reason.KEY_VERSION_RETIRED, Reason.KEY_NOT_FOUND}


class ShardError(Unavailable):
    """A shard failed, was late, or answered for another model or range: the request fails whole."""

    reason = Reason.DEPENDENCY_UNAVAILABLE


@dataclass(frozen=True)
class Shard:
    target: str
    blocks: BlockRange
    stub: Any  # shard_pb2_grpc.RecommenderShardStub


class ShardFanOut:
    """Channels to the shards (shard i at ``targets[i]``) and concurrent calls to all of them."""

    def __init__(self, targets: Sequence[str], limits: GrpcLimits, tls: TlsConfig, deadline_seconds: float) -> None:
        if not targets:
            raise ValueError("a coordinator needs at least one shard target")
        self.targets = tuple(targets)
        self.deadline_seconds = deadline_seconds
        self._channels = [_shard_channel(t, limits, tls) for t in self.targets]
        self.shards: list[Shard] = []

    def bind(self, catalogue_blocks: int) -> None:
        n = len(self.targets)
        self.shards = [
            Shard(t, block_range(catalogue_blocks, i, n), shard_pb2_grpc.RecommenderShardStub(ch))
            for i, (t, ch) in enumerate(zip(self.targets, self._channels, strict=True))
        ]

    def close(self) -> None:
        for ch in self._channels:
            ch.close()

    def wait_ready(self, timeout: float) -> bool:
        """True once every shard's channel is connected (within ``timeout`` seconds each)."""
        try:
            for ch in self._channels:
                inner = ch.current()[1] if isinstance(ch, mtls.RenewingChannel) else ch
                grpc.channel_ready_future(inner).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            return False
        return True

    def _timeout(self, deadline: float | None) -> float:
        timeout = self.deadline_seconds
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic() - SAFETY_MARGIN_SECONDS)
        if timeout <= 0:
            raise ShardError("no time is left before the deadline to ask the shards", metadata={"dependency": "shard"})
        return timeout

    def call(self, method: str, requests: Sequence[Any], deadline: float | None) -> list[Any]:
        """``method`` on every shard at once (request i to shard i); every answer, or the first
        failure (the other calls are cancelled)."""
        timeout = self._timeout(deadline)
        calls = zip(self.shards, requests, strict=True)
        futures = [getattr(s.stub, method).future(r, timeout=timeout) for s, r in calls]
        answers = []
        try:
            for i, future in enumerate(futures):
                try:
                    answers.append(future.result())
                except grpc.RpcError as exc:
                    raise _refusal(i, self.shards[i].target, exc) from None
        finally:
            if len(answers) < len(futures):
                for future in futures:
                    future.cancel()
        return answers

    def check(self, model_version: str, context_sha256: bytes, timeout: float) -> list[str]:
        """Asks each shard what it serves; raises RuntimeError if one serves another model, range
        or context (the mesh must not start so); returns the targets that did not answer."""
        silent = []
        for i, shard in enumerate(self.shards):
            try:
                info = shard.stub.GetShardInfo(shard_pb2.GetShardInfoRequest(), timeout=timeout)
            except grpc.RpcError as exc:
                log.warning("shard %d at %s does not answer yet (%s)", i, shard.target, exc.code().name)
                silent.append(shard.target)
                continue
            problem = _disagreement(info, shard.blocks, model_version, context_sha256)
            if problem:
                raise RuntimeError(f"shard {i} at {shard.target} {problem}: refusing to coordinate")
        return silent


def _shard_channel(target: str, limits: GrpcLimits, tls: TlsConfig) -> grpc.Channel:
    """As ``grpcutil.channel`` to a recommender, with a short reconnect backoff."""
    options = limits.channel_options() + RECONNECT_OPTIONS
    if tls.insecure_dev:
        mtls.warn_insecure("client")
        return grpc.insecure_channel(target, options=options)
    return mtls.RenewingChannel(target, options, tls, "recommender")


def _disagreement(info: shard_pb2.ShardInfo, want: BlockRange, model_version: str, context: bytes) -> str:
    if info.model_version != model_version:
        return f"serves model {info.model_version[:16]}, this coordinator {model_version[:16]}"
    if info.context_sha256 != context:
        return "uses another CKKS context"
    got = (info.shard_index, info.shard_count, info.first_block, info.block_count, info.catalogue_blocks)
    if got != (want.index, want.count, want.first, want.blocks, want.catalogue_blocks):
        return f"serves shard {info.shard_index} of {info.shard_count} (blocks {info.first_block}..+{info.block_count})"
    return ""


def _refusal(i: int, target: str, exc: grpc.RpcError) -> CipherfeedError:
    reason = reason_of(exc)
    if reason in {r.value for r in KEY_REASONS}:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return NotFound(exc.details() or "key not found", reason=Reason(reason))
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
            return FailedPrecondition(exc.details() or "key refused", reason=Reason(reason))
    if reason == Reason.MODEL_MISMATCH.value:
        message = f"shard {i} serves another model than this coordinator"
    else:
        message = f"shard {i} did not answer ({exc.code().name})"
    return ShardError(
        f"{message}; the whole catalogue cannot be scored: retry", metadata={"dependency": "shard", "shard": str(i)}
    )


class CoordinatorCore(RecommenderCore):
    """A recommender whose blocks are all served by shards (see the module doc)."""

    def __init__(self, *args: Any, shards: ShardFanOut, startup_check_seconds: float = 5.0, **kwargs: Any) -> None:
        self.shards = shards
        super().__init__(*args, **kwargs)
        try:
            silent = shards.check(self.model_version, self.codec.fingerprint, startup_check_seconds)
        except RuntimeError:
            self.close()
            raise
        log.info(
            "coordinating %d shards (%s)%s",
            len(shards.shards),
            ", ".join(f"{s.target}: blocks {s.blocks.first}..{s.blocks.stop - 1}" for s in shards.shards),
            f"; not answering yet: {', '.join(silent)}" if silent else "",
        )

    def _build_engines(self, model: ModelArtifact, shard: tuple[int, int] | None) -> None:
        self.blocks = block_range(self.block_count, 0, 1)
        self.shards.bind(self.block_count)
        t0 = time.perf_counter()
        # No plaintexts of the model: only the adding of shares and the projection's rotations.
        self.history = HistoryProjector(
            model,
            self.params,
            self.pool,
            kernel=kernel_name(),
            input_rotations=history_input_rotations(self.block_count),
            diagonals=False,
        )
        log.info("history combiner ready in %.1f s (no model plaintexts held)", time.perf_counter() - t0)
        # The query's rotations for every shard, with the whole catalogue's strategy (so the
        # shards' blocks get what they would have made themselves); no model plaintexts either.
        kernel = kernel_name()
        self.rotator: EncryptedScorer | None = None
        if kernel == "native":
            strategy = scoring_strategy(self.block_count, kernel)
            self.rotator = EncryptedScorer(model, self.params, self.pool, strategy, kernel=kernel, diagonals=False)

    def close(self) -> None:
        super().close()
        self.shards.close()

    def _check_answer(self, i: int, model_version: str, first_block: int, count: int) -> None:
        want = self.shards.shards[i].blocks
        if model_version != self.model_version or first_block != want.first or count != want.blocks:
            raise ShardError(
                f"shard {i} answered for model {model_version[:16]}, blocks {first_block}..+{count};"
                f" expected {self.model_version[:16]}, blocks {want.first}..+{want.blocks}: retry",
                metadata={"dependency": "shard", "shard": str(i)},
            )

    def _score_encrypted(
        self,
        ref: common_pb2.KeyRef,
        checked: tuple[KeyStatus, int],
        query: bytes | None,
        profile: bytes | None,
        deadline: float | None = None,
    ) -> tuple[list[bytes], bytes, ScoreTiming, int]:
        started = time.perf_counter()
        key = common_pb2.KeyRef(key_id=ref.key_id, version=checked[1])
        if query is not None:
            ct = self.codec.load_query(query)  # refused here, precisely, before any shard is asked
            request = shard_pb2.ScoreBlocksRequest(key=key, model_version=self.model_version, query_ciphertext=query)
        else:
            assert profile is not None
            ct = self.history.restore(profile)
            request = shard_pb2.ScoreBlocksRequest(key=key, model_version=self.model_version, lifted_profile=profile)
        if self.rotator is not None:
            key.version = self._rotate_for_shards(ref, checked, ct, profile is not None, request)
        rotated = time.perf_counter()
        answers = self.shards.call("ScoreBlocks", [request] * len(self.shards.shards), deadline)
        blobs: list[bytes] = []
        for i, answer in enumerate(answers):
            self._check_answer(i, answer.model_version, answer.first_block, len(answer.score_ciphertexts))
            blobs.extend(answer.score_ciphertexts)
        done = time.perf_counter()
        # rotations: made here (or none); blocks: the fan-out, the slowest shard's blocks included
        timing = ScoreTiming(rotations_ms=1e3 * (rotated - started), blocks_ms=1e3 * (done - rotated))
        return blobs, ciphertext_sha256(blobs), timing, key.version

    def _rotate_for_shards(
        self,
        ref: common_pb2.KeyRef,
        checked: tuple[KeyStatus, int],
        ct: openfhe.Ciphertext,
        lifted: bool,
        request: shard_pb2.ScoreBlocksRequest,
    ) -> int:
        """Puts the query's rotations (made with the client's keys) into ``request``; returns the
        key version used."""
        assert self.rotator is not None
        with self.keys.holding(ref.key_id, checked) as (tag, version):
            ct.SetKeyTag(tag)
            request.key.version = version
            request.query_rotations = self.rotator.rotation_words(ct, lifted).tobytes()
        return version

    def _project(
        self,
        record: HistoryRecord,
        blobs: list[bytes],
        loaded: list[openfhe.Ciphertext],
        checked: tuple[KeyStatus, int],
        deadline: float | None = None,
    ) -> tuple[HistoryRecord, openfhe.Ciphertext]:
        key = common_pb2.KeyRef(key_id=record.key_id, version=checked[1])
        requests = [
            shard_pb2.ProjectHistoryBlocksRequest(
                key=key,
                model_version=self.model_version,
                first_block=s.blocks.first,
                history_ciphertexts=blobs[s.blocks.first : s.blocks.stop],
            )
            for s in self.shards.shards
        ]
        t0 = time.perf_counter()
        answers = self.shards.call("ProjectHistoryBlocks", requests, deadline)
        shares_ms = 1e3 * (time.perf_counter() - t0)
        for i, answer in enumerate(answers):
            self._check_answer(i, answer.model_version, answer.first_block, self.shards.shards[i].blocks.blocks)
        with self.keys.holding(record.key_id, checked) as (tag, version):
            try:
                profile, timing = self.history.from_partials([a.partial_sums for a in answers], tag)
            except HistoryError as exc:
                raise ShardError(f"a shard's share is malformed ({exc}): retry") from None
        log.info(
            "projected a %d-block history on %d shards for key %s v%d: shares %.1f ms, sums %.1f ms, rotations %.1f ms",
            len(blobs),
            len(answers),
            record.key_id[:16],
            version,
            shares_ms,
            timing.products_ms,
            timing.rotations_ms,
        )
        return record.with_profile(self.model_version, self.history.export(profile)), profile
