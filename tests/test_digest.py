"""The response digest of a receipt is the same whichever order the blocks finish in."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from cipherfeed.he.codec import OrderedDigest, ciphertext_sha256

BLOBS = [bytes([i]) * (1000 + 37 * i) for i in range(13)]


@pytest.mark.parametrize("order", [range(13), reversed(range(13)), [3, 0, 12, 1, 2, 5, 4, 11, 6, 7, 10, 9, 8]])
def test_any_arrival_order_gives_the_sequential_digest(order):
    digest = OrderedDigest(len(BLOBS))
    for i in order:
        digest.add(i, BLOBS[i])
    assert digest.digest() == ciphertext_sha256(BLOBS)


def test_blobs_from_many_threads_give_the_sequential_digest():
    digest = OrderedDigest(len(BLOBS))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: digest.add(i, BLOBS[i]), [7, 1, 12, 0, 3, 2, 9, 4, 5, 6, 8, 11, 10]))
    assert digest.digest() == ciphertext_sha256(BLOBS)


def test_a_missing_repeated_or_foreign_blob_is_refused():
    digest = OrderedDigest(3)
    digest.add(1, b"b")
    with pytest.raises(ValueError, match="already added"):
        digest.add(1, b"b")
    with pytest.raises(ValueError, match="out of range"):
        digest.add(3, b"d")
    with pytest.raises(RuntimeError, match="3 of 3 blobs are missing"):
        digest.digest()  # blob 0 is not in, so nothing could be hashed yet
    digest.add(0, b"a")
    with pytest.raises(ValueError):
        digest.add(0, b"a")  # already hashed
    with pytest.raises(RuntimeError, match="1 of 3"):
        digest.digest()
