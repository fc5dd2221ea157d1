"""The catalogue manifest: compact, exact, hostile bytes refused, cached per model version on the
device and checked against the published digest; feeds are displayed from it."""

import hashlib
import lzma
import os
import stat

import grpc
import numpy as np
import pytest

from cipherfeed import manifest as mf
from cipherfeed.client.catalogue import ManifestCache
from cipherfeed.client.interest import Engagement
from cipherfeed.client.sdk import ClientError
from cipherfeed.v1 import recommender_pb2
from tests.conftest import client_for


def encode_model(m) -> bytes:
    return mf.encode(
        m.version, m.item_ids, m.creator_index, m.creator_ids, m.creator_nicknames, m.posted_unix, m.popularity
    )


@pytest.fixture(scope="module")
def tiktok_manifest(tiktok_model) -> bytes:
    return encode_model(tiktok_model)


def test_manifest_round_trips_every_display_field_compactly(tiktok_model, tiktok_manifest):
    m = tiktok_model
    d = mf.decode(tiktok_manifest, expected_sha256=hashlib.sha256(tiktok_manifest).digest())
    assert d.model_version == m.version and d.item_ids == m.item_ids
    assert d.creator_ids == m.creator_ids and d.creator_nicknames == m.creator_nicknames
    np.testing.assert_array_equal(d.creator_of, m.creator_index)
    np.testing.assert_array_equal(d.posted_unix, m.posted_unix)
    np.testing.assert_array_equal(d.popularity, m.popularity)  # bit-exact
    item = d.item(123)
    assert item.url == f"https://www.tiktok.com/@{item.creator_id}/video/{item.item_id}"
    assert item.creator_nickname == m.creator_nicknames[m.creator_index[123]]
    # 26,558 items with all their display fields: ~171 KB (6.6 B/item); budget 8 B/item.
    assert len(tiktok_manifest) < 8 * m.item_count
    assert encode_model(m) == tiktok_manifest  # deterministic: the digest names the content


def test_non_numeric_ids_and_any_text_round_trip():
    ids = ["syn-a", "007", "18446744073709551616", "x\u00e9\U0001f600"]
    data = mf.encode(
        "f" * 64, ids, np.array([0, 1, 1, 0]), ["syn-c0", "syn-c1"], ["n\x00ul", ""], np.zeros(4), np.ones(4)
    )
    d = mf.decode(data)
    assert d.item_ids == ids and d.creator_nicknames == ["n\x00ul", ""]
    assert d.item(0).url == "synthetic://syn-c0/syn-a"


def _reheader(data: bytes, mutate) -> bytes:
    import json

    pos = len(mf.MAGIC)
    n = int.from_bytes(data[pos : pos + 4], "big")
    header = json.loads(data[pos + 4 : pos + 4 + n])
    body = data[pos + 4 + n :]
    body = mutate(header, body) or body
    head = json.dumps(header).encode()
    return mf.MAGIC + len(head).to_bytes(4, "big") + head + body


def test_hostile_manifest_bytes_are_refused_precisely(tiktok_manifest):
    good = tiktok_manifest
    bomb = lzma.compress(b"\0" * (64 << 20), format=lzma.FORMAT_XZ)

    def lie_items(h, b):
        h["items"] = 1 << 40

    def bomb_body(h, b):
        return bomb

    def bad_index(h, b):
        raw = bytearray(lzma.decompress(b))
        at = h["columns"][0]["nbytes"]
        raw[at : at + 4] = (10**6).to_bytes(4, "little")
        return lzma.compress(bytes(raw), format=lzma.FORMAT_XZ)

    def unknown_template(h, b):
        h["url_template"] = "https://evil.example/{item_id}"

    def trailing(h, b):
        return b + b"\0"

    cases = {
        "empty": b"",
        "bad magic": b"X" + good[1:],
        "truncated header": good[: len(mf.MAGIC) + 10],
        "truncated body": good[:-100],
        "flipped body byte": good[:-50] + bytes([good[-50] ^ 1]) + good[-49:],
        "items lie": _reheader(good, lie_items),
        "decompression bomb": _reheader(good, bomb_body),
        "creator index out of range": _reheader(good, bad_index),
        "unknown url template": _reheader(good, unknown_template),
        "trailing bytes": _reheader(good, trailing),
    }
    for name, data in cases.items():
        with pytest.raises(mf.ManifestError):
            mf.decode(data)
        assert name
    with pytest.raises(mf.ManifestError, match="digest"):
        mf.decode(good, expected_sha256=b"\0" * 32)


def test_model_info_publishes_the_manifest_digest(client, tiktok_manifest):
    info = client.model_info()
    assert info.manifest_sha256 == hashlib.sha256(tiktok_manifest).digest()
    assert info.manifest_bytes == len(tiktok_manifest)
    reply = client.stub.GetCatalogueManifest(
        recommender_pb2.GetCatalogueManifestRequest(model_version=info.version), timeout=30
    )
    assert reply.encoded == tiktok_manifest and reply.sha256 == info.manifest_sha256
    with pytest.raises(grpc.RpcError) as err:
        client.stub.GetCatalogueManifest(
            recommender_pb2.GetCatalogueManifestRequest(model_version="0" * 64), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_manifest_is_downloaded_once_per_model_version_and_cached_on_the_device(recommender, keyservice, tmp_path):
    home = tmp_path / "home"
    with client_for(recommender[0], keyservice[0], home) as first:
        m = first.manifest()
        assert first.manifest_downloads == 1 and first.manifest() is m
    cached = home / "manifests" / f"{m.model_version}.cfmanifest"
    assert cached.is_file() and stat.S_IMODE(cached.stat().st_mode) & 0o022 == 0
    with client_for(recommender[0], keyservice[0], home) as second:  # a new process: from disk
        assert second.manifest().item_ids == m.item_ids and second.manifest_downloads == 0
    data = bytearray(cached.read_bytes())
    data[-10] ^= 0xFF  # corrupt on disk: refused by the published digest, downloaded again
    cached.write_bytes(bytes(data))
    with client_for(recommender[0], keyservice[0], home) as third:
        assert third.manifest().item_ids == m.item_ids and third.manifest_downloads == 1
    assert mf.decode(cached.read_bytes()).sha256 == m.sha256


def test_a_manifest_that_is_not_the_published_one_is_refused(recommender, keyservice, tmp_path, monkeypatch):
    with client_for(recommender[0], keyservice[0], tmp_path) as c:
        real = c.stub.GetCatalogueManifest

        def tampered(request, timeout):
            reply = real(request, timeout=timeout)
            other = mf.decode(reply.encoded)
            forged = mf.encode(
                other.model_version,
                list(reversed(other.item_ids)),  # a reordered catalogue: every index would lie
                other.creator_of[::-1],
                other.creator_ids,
                other.creator_nicknames,
                other.posted_unix,
                other.popularity,
            )
            return recommender_pb2.CatalogueManifest(model_version=reply.model_version, encoded=forged)

        monkeypatch.setattr(c.stub, "GetCatalogueManifest", tampered)
        with pytest.raises(ClientError, match="published digest"):
            c.manifest()
        assert not list((tmp_path / "manifests").glob("*.cfmanifest"))


class CountingStub:
    """Wraps the SDK's recommender stub and counts the calls per method."""

    def __init__(self, stub):
        self._stub, self.calls = stub, []

    def __getattr__(self, name):
        method = getattr(self._stub, name)

        def call(*args, **kwargs):
            self.calls.append(name)
            return method(*args, **kwargs)

        return call


def test_feeds_are_displayed_from_the_manifest_without_a_call_per_feed(client, tiktok_model):
    m = tiktok_model
    client.manifest()
    counting = CountingStub(client.stub)
    client.stub = counting
    try:
        for row in (3, 4, 3):
            own = np.flatnonzero(m.creator_index == row)
            feed, _ = client.recommend([Engagement(m.item_ids[i], liked=True) for i in own], k=6)
            assert len(feed) == 6
            for item in feed:
                i = m.item_ids.index(item.item_id)
                assert item.index == i and item.creator_id == m.creator_ids[m.creator_index[i]]
                assert item.creator_nickname == m.creator_nicknames[m.creator_index[i]]
                assert item.posted_unix == m.posted_unix[i] and item.popularity == m.popularity[i]
    finally:
        client.stub = counting._stub
    # Per feed: the encrypted history when it changed, and one Score. Nothing for display.
    assert counting.calls == ["UploadHistory", "Score", "UploadHistory", "Score", "UploadHistory", "Score"]


def test_the_device_keeps_the_last_three_manifest_versions(tmp_path):
    cache = ManifestCache(tmp_path)
    versions = [f"{n:x}" * 64 for n in range(5)]
    for n, v in enumerate(versions):
        data = mf.encode(v, [str(n)], np.zeros(1), ["c"], ["n"], np.zeros(1), np.zeros(1))
        path = cache.store(v, data)
        os.utime(path, ns=(n * 10**9, n * 10**9))
        assert cache.load(v, hashlib.sha256(data).digest()).item_ids == [str(n)]
    assert cache.versions() == sorted(versions[2:])
    with pytest.raises(mf.ManifestError):
        cache.path("../../etc/passwd")
