# pragma version ~=0.4.3
"""
@title cipherfeed checkpoint anchor
@notice Records the roots of a transparency log's signed checkpoints. Only the owner anchors;
        tree sizes strictly increase, so a checkpoint is never anchored twice or out of order.
"""

event Anchored:
    size: indexed(uint256)
    root: bytes32
    anchored_at: uint256

owner: public(address)
latest_size: public(uint256)
latest_root: public(bytes32)
root_at: public(HashMap[uint256, bytes32])
anchor_count: public(uint256)


@deploy
def __init__():
    self.owner = msg.sender


@external
def anchor(root: bytes32, size: uint256):
    assert msg.sender == self.owner, "only the owner anchors"
    assert size > self.latest_size, "tree sizes must strictly increase"
    assert root != empty(bytes32), "empty root"
    self.latest_size = size
    self.latest_root = root
    self.root_at[size] = root
    self.anchor_count += 1
    log Anchored(size=size, root=root, anchored_at=block.timestamp)


@view
@external
def latest() -> (uint256, bytes32):
    return self.latest_size, self.latest_root
