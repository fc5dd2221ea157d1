"""Which blocks of the catalogue a shard serves, and the model slice it scores with.

A catalogue of ``B`` blocks (``packing.block_count``) is split into ``count`` contiguous ranges of
``B // count`` or ``B // count + 1`` blocks, shard 0 first. A shard encodes only its blocks, but
every choice that changes the bytes of a score (the scorer's strategy, the history projector's
input rotations) is the one the *whole* catalogue takes, so that the merged answer is the one a
single recommender gives, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from cipherfeed.he import packing, rnsmac
from services.recommender.artifact import ModelArtifact
from services.recommender.history import ROTATE_INPUTS_MAX_BLOCKS
from services.recommender.scoring import BSGS_MAX_BLOCKS


@dataclass(frozen=True)
class BlockRange:
    index: int
    count: int
    first: int  # first block of the catalogue this shard serves
    blocks: int  # how many
    catalogue_blocks: int

    @property
    def stop(self) -> int:
        return self.first + self.blocks

    @property
    def whole(self) -> bool:
        return self.blocks == self.catalogue_blocks


def block_range(catalogue_blocks: int, index: int, count: int) -> BlockRange:
    """Shard ``index`` of ``count``: a non-empty contiguous range; ValueError if the catalogue has
    fewer blocks than shards (an empty shard would be a process with nothing to do)."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index} is outside 0..{count - 1}")
    if catalogue_blocks < count:
        raise ValueError(f"{count} shards for a catalogue of {catalogue_blocks} blocks: at most one shard per block")
    first = index * catalogue_blocks // count
    stop = (index + 1) * catalogue_blocks // count
    return BlockRange(index, count, first, stop - first, catalogue_blocks)


def catalogue_blocks(model: ModelArtifact, items_per_block: int) -> int:
    return packing.block_count(model.item_count, items_per_block)


def model_slice(model: ModelArtifact, blocks: BlockRange, items_per_block: int) -> ModelArtifact:
    """The items of ``blocks`` as a model of their own (its version is not the catalogue's: the
    shard names the catalogue's model)."""
    if blocks.whole:
        return model
    lo = blocks.first * items_per_block
    hi = min(blocks.stop * items_per_block, model.item_count)
    return ModelArtifact(
        embeddings=model.embeddings[lo:hi],
        popularity=model.popularity[lo:hi],
        posted_unix=model.posted_unix[lo:hi],
        item_ids=model.item_ids[lo:hi],
        creator_index=model.creator_index[lo:hi],
        creator_ids=model.creator_ids,
        creator_nicknames=model.creator_nicknames,
        popularity_weight=model.popularity_weight,
        created_by=model.created_by,
    )


def kernel_name() -> str:
    return "native" if rnsmac.available() else "openfhe"


def scoring_strategy(catalogue_blocks: int, kernel: str) -> str:
    """What ``EncryptedScorer(strategy="auto")`` picks for the whole catalogue."""
    return "bsgs" if catalogue_blocks <= BSGS_MAX_BLOCKS[kernel] else "flat"


def history_input_rotations(catalogue_blocks: int) -> int:
    """What ``HistoryProjector(input_rotations=0)`` picks for the whole catalogue."""
    return 4 if catalogue_blocks <= ROTATE_INPUTS_MAX_BLOCKS else 1
