"""gRPC transport for the recommender: proto <-> domain, domain errors -> status codes."""

from __future__ import annotations

import time

import grpc

from cipherfeed.grpcutil import grpc_errors
from cipherfeed.v1 import common_pb2, recommender_pb2, recommender_pb2_grpc
from services.recommender.core import RecommenderCore

SERVICE = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name


def method(name: str) -> str:
    """What owner signatures name: ``cipherfeed.v1.Recommender/<name>``."""
    return f"{SERVICE}/{name}"


class RecommenderServicer(recommender_pb2_grpc.RecommenderServicer):
    def __init__(self, core: RecommenderCore) -> None:
        self.core = core
        p = core.params
        self._params = common_pb2.HEParameters(
            ring_dimension=p.ring_dimension,
            first_mod_bits=p.first_mod_bits,
            scaling_mod_bits=p.scaling_mod_bits,
            multiplicative_depth=p.multiplicative_depth,
            key_switch_digit_bits=p.key_switch_digit_bits,
            security_level=p.security_level,
            scaling_technique=p.scaling_technique,
            key_switch_technique=p.key_switch_technique,
            embedding_dim=p.embedding_dim,
            rotation_indices=p.rotation_indices,
            context_sha256=core.codec.fingerprint,
        )

    @grpc_errors
    def GetParams(
        self, request: recommender_pb2.GetParamsRequest, context: grpc.ServicerContext
    ) -> recommender_pb2.GetParamsResponse:
        return recommender_pb2.GetParamsResponse(params=self._params, model_version=self.core.model_version)

    @grpc_errors
    def GetModelInfo(
        self, request: recommender_pb2.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> common_pb2.ModelVersion:
        m = self.core.model
        manifest = self.core.manifest()
        return common_pb2.ModelVersion(
            version=self.core.model_version,
            created_by=m.created_by,
            item_count=m.item_count,
            embedding_dim=m.dim,
            popularity_weight=m.popularity_weight,
            manifest_sha256=manifest.sha256,
            manifest_bytes=len(manifest.encoded),
        )

    @grpc_errors
    def UploadProfile(
        self, request: recommender_pb2.UploadProfileRequest, context: grpc.ServicerContext
    ) -> recommender_pb2.ProfileRef:
        status = self.core.authorize(method("UploadProfile"), request, request.key.key_id)
        ref, expires = self.core.upload_profile(request.key, request.query_ciphertext, status)
        return recommender_pb2.ProfileRef(profile_ref=ref, expires_unix=expires)

    @grpc_errors
    def UploadHistory(
        self, request: recommender_pb2.UploadHistoryRequest, context: grpc.ServicerContext
    ) -> recommender_pb2.ProfileRef:
        status = self.core.authorize(method("UploadHistory"), request, request.key.key_id)
        ref, expires, _ = self.core.upload_history(
            request.key,
            list(request.history_ciphertexts),
            pinned_model=request.model_version,
            status=status,
            deadline=_deadline(context),
        )
        return recommender_pb2.ProfileRef(profile_ref=ref, expires_unix=expires)

    @grpc_errors
    def Score(
        self, request: recommender_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> recommender_pb2.ScoreResponse:
        status = self.core.authorize(method("Score"), request, request.key.key_id)
        self.core.owners.admit_score(status)
        which = request.WhichOneof("query")
        result = self.core.score(
            request.key,
            request.query_ciphertext if which != "profile_ref" else None,
            profile_ref=request.profile_ref,
            pinned_model=request.model_version,
            status=status,
            deadline=_deadline(context),
        )
        return recommender_pb2.ScoreResponse(
            model_version=result.model_version,
            layout=common_pb2.ScoreLayout(
                item_count=result.item_count,
                items_per_ciphertext=result.items_per_ciphertext,
                slots=result.slots,
                tail_fold=result.tail_fold,
            ),
            score_ciphertexts=result.ciphertexts,
            query_sha256=result.query_sha256,
            response_sha256=result.response_sha256,
            server_millis=result.server_millis,
            from_cache=result.from_cache,
            receipt_id=result.receipt_id,
            receipt_unix_millis=result.receipt_unix_millis,
            key_version=result.key_version,
        )

    @grpc_errors
    def GetItems(
        self, request: recommender_pb2.GetItemsRequest, context: grpc.ServicerContext
    ) -> recommender_pb2.GetItemsResponse:
        views = self.core.items(list(request.indices), list(request.item_ids))
        return recommender_pb2.GetItemsResponse(
            model_version=self.core.model_version,
            items=[
                recommender_pb2.Item(
                    index=v.index,
                    item_id=v.item_id,
                    creator_id=v.creator_id,
                    creator_nickname=v.creator_nickname,
                    url=v.url,
                    popularity=v.popularity,
                    posted_unix=v.posted_unix,
                )
                for v in views
            ],
        )

    @grpc_errors
    def GetCatalogueManifest(
        self, request: recommender_pb2.GetCatalogueManifestRequest, context: grpc.ServicerContext
    ) -> recommender_pb2.CatalogueManifest:
        manifest = self.core.manifest(pinned_model=request.model_version)
        return recommender_pb2.CatalogueManifest(
            model_version=manifest.model_version, encoded=manifest.encoded, sha256=manifest.sha256
        )


def _deadline(context: grpc.ServicerContext) -> float | None:
    """The caller's deadline as ``time.monotonic()``: a coordinator's shard calls end by then."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
