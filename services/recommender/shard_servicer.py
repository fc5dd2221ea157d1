"""gRPC transport of a recommender shard (``RecommenderShard``): proto <-> domain, errors -> status."""

from __future__ import annotations

import grpc

from cipherfeed.grpcutil import grpc_errors
from cipherfeed.v1 import shard_pb2, shard_pb2_grpc
from services.recommender.core import RecommenderCore

SERVICE = shard_pb2.DESCRIPTOR.services_by_name["RecommenderShard"].full_name


class RecommenderShardServicer(shard_pb2_grpc.RecommenderShardServicer):
    def __init__(self, core: RecommenderCore) -> None:
        self.core = core

    @grpc_errors
    def GetShardInfo(
        self, request: shard_pb2.GetShardInfoRequest, context: grpc.ServicerContext
    ) -> shard_pb2.ShardInfo:
        b = self.core.blocks
        return shard_pb2.ShardInfo(
            model_version=self.core.model_version,
            shard_index=b.index,
            shard_count=b.count,
            first_block=b.first,
            block_count=b.blocks,
            catalogue_blocks=b.catalogue_blocks,
            context_sha256=self.core.codec.fingerprint,
        )

    @grpc_errors
    def ScoreBlocks(
        self, request: shard_pb2.ScoreBlocksRequest, context: grpc.ServicerContext
    ) -> shard_pb2.ScoreBlocksResponse:
        which = request.WhichOneof("query")
        blobs, millis = self.core.score_blocks(
            request.key,
            request.model_version,
            request.query_ciphertext if which == "query_ciphertext" else None,
            request.lifted_profile if which == "lifted_profile" else None,
            request.query_rotations,
        )
        return shard_pb2.ScoreBlocksResponse(
            model_version=self.core.model_version,
            first_block=self.core.blocks.first,
            score_ciphertexts=blobs,
            server_millis=millis,
        )

    @grpc_errors
    def ProjectHistoryBlocks(
        self, request: shard_pb2.ProjectHistoryBlocksRequest, context: grpc.ServicerContext
    ) -> shard_pb2.ProjectHistoryBlocksResponse:
        shares, millis = self.core.project_blocks(
            request.key, request.model_version, request.first_block, list(request.history_ciphertexts)
        )
        return shard_pb2.ProjectHistoryBlocksResponse(
            model_version=self.core.model_version,
            first_block=self.core.blocks.first,
            partial_sums=shares,
            server_millis=millis,
        )
