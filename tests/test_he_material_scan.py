"""Every byte of HE material outside coefficient words, changed, is refused before OpenFHE sees it.

Each kind (query, public key, rotation-key map, in every legitimate layout) is scanned: every
non-coefficient byte XORed with several values. Probes run in forked children under an
address-space cap, in batches, so that an abort, a crash, a hang or a large allocation is seen as
what it is instead of taking the test run down. A refused probe must raise ``MaterialError``
(INVALID_ARGUMENT on the wire), and its peak memory stay within 2x that of loading valid material.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import select
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import openfhe
import pytest

from cipherfeed import grpcutil
from cipherfeed.client import keystore
from cipherfeed.client.sdk import KEYSERVICE, RECOMMENDER
from cipherfeed.config import GrpcLimits
from cipherfeed.he import keymap
from cipherfeed.he.codec import Kind, MaterialCodec, MaterialError, StructureTemplate, serialize
from cipherfeed.he.keymap import KeyMaterial
from cipherfeed.he.params import MESH_PARAMS
from cipherfeed.v1 import common_pb2, keyservice_pb2, keyservice_pb2_grpc, recommender_pb2, recommender_pb2_grpc
from tests.conftest import mesh_pki

XORS = (0x01, 0x20, 0x80, 0xFF)
ADDRESS_SPACE_HEADROOM = 1 << 30  # a child may map 1 GiB above what it inherited
BATCH_TIMEOUT_SECONDS = 300  # a hang detector only: a batch takes well under a second
HEX = frozenset(b"0123456789abcdef")


def _peak_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM"))


def _reset_peak() -> int:
    """Resets the peak RSS to the current RSS (Linux clear_refs) and returns it, in KiB."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _peak_kib()


def _address_space() -> int:
    with open("/proc/self/status") as fh:
        return 1024 * next(int(line.split()[1]) for line in fh if line.startswith("VmSize"))


@dataclass
class ScanResult:
    probes: int = 0
    refused: int = 0
    accepted: int = 0
    wrong_error: list[str] = field(default_factory=list)
    signals: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    peak_kib: int = 0  # the largest peak-RSS increase of a refused probe


def run_forked(
    load: Callable[[bytearray], None], blob: bytes, probes: list[tuple[int, int]], batch: int, measure: str = "refused"
) -> tuple[ScanResult, list[str]]:
    """Runs ``load`` on ``blob`` with byte ``offset`` XORed by ``value`` for every probe, ``batch``
    probes per forked child (mutated in place and restored: no copy per probe). Returns the tally
    (its peak is that of ``measure`` outcomes) and each probe's outcome ("refused", "accepted" or
    "error:<type>")."""
    result = ScanResult()
    outcomes: list[str] = []
    for first in range(0, len(probes), batch):
        chunk = probes[first : first + batch]
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read_fd)
            try:
                cap = _address_space() + ADDRESS_SPACE_HEADROOM
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
                buf = bytearray(blob)
                with os.fdopen(write_fd, "w", buffering=1) as out:
                    for offset, value in chunk:
                        base = _reset_peak()
                        buf[offset] ^= value
                        try:
                            load(buf)
                            outcome = "accepted"
                        except MaterialError:
                            outcome = "refused"
                        except BaseException as exc:  # every other outcome is a finding
                            outcome = f"error:{type(exc).__name__}"
                        buf[offset] ^= value
                        out.write(json.dumps([outcome, _peak_kib() - base]) + "\n")
            finally:
                os._exit(0)
        os.close(write_fd)
        lines, deadline = b"", time.monotonic() + BATCH_TIMEOUT_SECONDS
        with os.fdopen(read_fd, "rb") as pipe:
            while True:
                ready, _, _ = select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    os.kill(pid, signal.SIGKILL)
                    break
                data = os.read(pipe.fileno(), 1 << 16)
                if not data:
                    break
                lines += data
        _, status = os.waitpid(pid, 0)
        done = [json.loads(line) for line in lines.splitlines()]
        for outcome, peak in done:
            outcomes.append(outcome)
            if outcome == measure:
                result.peak_kib = max(result.peak_kib, peak)
        if len(done) < len(chunk):
            offset, value = chunk[len(done)]
            where = f"byte {offset} ^ {value:#x}"
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) != signal.SIGKILL:
                result.signals.append(f"{where}: {signal.Signals(os.WTERMSIG(status)).name}")
            else:
                result.hangs.append(where)
            outcomes += ["lost"] * (len(chunk) - len(done))
    result.probes = len(outcomes)
    result.refused = outcomes.count("refused")
    result.accepted = outcomes.count("accepted")
    result.wrong_error = [
        f"byte {o} ^ {v:#x}: {x}" for (o, v), x in zip(probes, outcomes, strict=True) if x.startswith("error")
    ]
    return result, outcomes


def legitimate(template: StructureTemplate, blob: bytes, offset: int, value: int) -> bool:
    """Whether the change leaves a valid object: a single-tag object with another hex tag."""
    in_tag = any(t <= offset < t + template.tag_length for t in template.tags)
    return in_tag and len(template.tags) == 1 and blob[offset] ^ value in HEX


@dataclass(frozen=True)
class Material:
    keys: keystore.ClientKeys
    query: bytes
    reloaded_query: bytes
    reloaded_public_key: bytes


@pytest.fixture(scope="module")
def codec() -> MaterialCodec:
    codec = MaterialCodec(MESH_PARAMS)
    codec.warm_up()
    return codec


@pytest.fixture(scope="module")
def material(codec: MaterialCodec) -> Material:
    keys = keystore.generate(MESH_PARAMS)
    cc = keys.cc
    reloaded_pk = openfhe.DeserializePublicKeyString(keys.public_key_bytes, openfhe.BINARY)

    def encrypt(pk: openfhe.PublicKey) -> bytes:
        return serialize(cc.Encrypt(pk, cc.MakeCKKSPackedPlaintext(np.full(MESH_PARAMS.slots, 0.25 + 0.5j))))

    return Material(keys, encrypt(keys.public_key), encrypt(reloaded_pk), serialize(reloaded_pk))


def loaders(codec: MaterialCodec, material: Material) -> dict[str, Callable[[bytearray], None]]:
    """What each service does with each kind (the key service validates a pair; the recommender
    loads a query and adds it to its own ciphertext)."""
    keys = material.keys

    def checked_first(kind: Kind, load: Callable[[bytes], object]) -> Callable[[bytearray], None]:
        def run(b: bytearray) -> None:
            codec.check(kind, b)  # what ``load`` does first, without copying the buffer per probe
            load(bytes(b))

        return run

    return {
        "query": checked_first(Kind.QUERY, codec.load_query),
        "public key": checked_first(
            Kind.PUBLIC_KEY, lambda b: keymap.validate(codec, KeyMaterial(b, keys.rotation_key_bytes))
        ),
        "rotation key map": checked_first(
            Kind.ROTATION_KEYS, lambda b: keymap.validate(codec, KeyMaterial(keys.public_key_bytes, b))
        ),
    }


def scan(codec: MaterialCodec, kind: Kind, blob: bytes, load: Callable[[bytearray], None], batch: int) -> ScanResult:
    template = codec.check(kind, blob)
    probes = [(int(o), x) for o in template.structure_offsets for x in XORS]
    result, outcomes = run_forked(load, blob, probes, batch)
    valid_but_refused = [
        f"byte {o} ^ {x:#x}"
        for (o, x), got in zip(probes, outcomes, strict=True)
        if legitimate(template, blob, o, x) and got != "accepted"
    ]
    invalid_but_accepted = [
        f"byte {o} ^ {x:#x}"
        for (o, x), got in zip(probes, outcomes, strict=True)
        if not legitimate(template, blob, o, x) and got == "accepted"
    ]
    print(
        f"{kind.value} ({len(blob)} bytes): {result.probes} probes over {len(template.structure_offsets)} bytes,"
        f" {result.refused} refused, {result.accepted} accepted (another hex tag), {len(result.signals)} signals,"
        f" {len(result.hangs)} hangs, peak +{result.peak_kib} KiB"
    )
    assert not result.signals, result.signals[:5]
    assert not result.hangs, result.hangs[:5]
    assert not result.wrong_error, result.wrong_error[:5]
    assert not invalid_but_accepted, invalid_but_accepted[:5]
    assert not valid_but_refused, valid_but_refused[:5]
    return result


@pytest.fixture(scope="module")
def valid_peak_kib(codec: MaterialCodec, material: Material) -> int:
    """The largest peak-RSS increase of loading valid material (the bound is twice it)."""
    peaks = []
    blobs = {"query": material.query, "public key": material.keys.public_key_bytes}
    blobs["rotation key map"] = material.keys.rotation_key_bytes
    for name, load in loaders(codec, material).items():
        result, outcomes = run_forked(load, blobs[name], [(0, 0)], 1, measure="accepted")
        assert outcomes == ["accepted"], (name, outcomes)
        peaks.append(result.peak_kib)
    print(f"valid material, peak +KiB (query, public key, rotation keys): {peaks}")
    return max(peaks)


def kinds(material: Material) -> Iterator[tuple[Kind, str, bytes]]:
    yield Kind.QUERY, "query", material.query
    yield Kind.QUERY, "query", material.reloaded_query
    yield Kind.PUBLIC_KEY, "public key", material.keys.public_key_bytes
    yield Kind.PUBLIC_KEY, "public key", material.reloaded_public_key
    yield Kind.ROTATION_KEYS, "rotation key map", material.keys.rotation_key_bytes


@pytest.mark.parametrize("index", range(5), ids=["query", "query-reloaded-key", "pk", "pk-reloaded", "rotation-keys"])
def test_every_structural_byte_changed_is_refused_without_abort(codec, material, valid_peak_kib, index):
    kind, name, blob = list(kinds(material))[index]
    result = scan(codec, kind, blob, loaders(codec, material)[name], batch=2000)
    assert result.refused >= 0.9 * result.probes
    assert result.peak_kib <= 2 * valid_peak_kib, (result.peak_kib, valid_peak_kib)


def test_material_error_is_invalid_argument():
    code = next(c for t, c in grpcutil.STATUS_FOR if issubclass(MaterialError, t))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_trailing_and_missing_bytes_are_refused(codec, material):
    for kind, _, blob in kinds(material):
        for bad in (blob + b"\x00", blob + os.urandom(3900), blob[:-1], blob[:-200], b""):
            with pytest.raises(MaterialError, match=r"bytes|byte \d+ is not"):
                codec.check(kind, bad)


def test_coefficient_at_or_above_its_modulus_is_refused(codec, material):
    for kind, name, blob in kinds(material):
        template = codec.check(kind, blob)
        for run in (template.runs[0], template.runs[-1]):
            for value in (run.modulus, run.modulus + 1, 2**64 - 1):
                bad = bytearray(blob)
                bad[run.end - 8 : run.end] = value.to_bytes(8, "little")
                with pytest.raises(MaterialError, match="modulus"):
                    loaders(codec, material)[name](bad)
            ok = bytearray(blob)
            ok[run.start : run.start + 8] = (run.modulus - 1).to_bytes(8, "little")
            codec.check(kind, ok)


def test_rotation_key_tags_must_agree_and_be_hex(codec, material):
    blob = material.keys.rotation_key_bytes
    template = codec.check(Kind.ROTATION_KEYS, blob)
    assert len(template.tags) == len(MESH_PARAMS.rotation_indices) + 1  # and the conjugation key
    assert template.tag_length == 32
    tag = blob[template.tags[0] : template.tags[0] + 32]
    other = bytes(b"0123456789abcdef"[(b"0123456789abcdef".index(c) + 1) % 16] for c in tag)
    everywhere = bytearray(blob)
    for t in template.tags:
        everywhere[t : t + 32] = other
    codec.check(Kind.ROTATION_KEYS, everywhere)  # another key's tag, consistently: fine
    upper = bytearray(everywhere)
    for t in template.tags:
        upper[t : t + 32] = other.upper() if other.upper() != other else b"G" * 32
    with pytest.raises(MaterialError, match="tag"):
        codec.check(Kind.ROTATION_KEYS, upper)


def test_another_context_registers_with_one_call(codec):
    """A ciphertext kind of another context and level (e.g. a three-limb history)."""
    from cipherfeed.he.params import HEParams, build_context

    other = HEParams(multiplicative_depth=2)
    cc = build_context(other)
    codec.register_ciphertext("history ciphertext", cc, other.slots, level=0)
    kp = cc.KeyGen()
    ct = serialize(cc.Encrypt(kp.publicKey, cc.MakeCKKSPackedPlaintext(np.zeros(other.slots, dtype=complex))))
    template = codec.check("history ciphertext", ct)
    assert {r.modulus for r in template.runs}.__len__() == 3
    with pytest.raises(MaterialError, match="history ciphertext"):
        codec.check("history ciphertext", ct + b"\x00")
    with pytest.raises(MaterialError):
        codec.check(Kind.QUERY, ct)


# Live services on loopback: formerly fatal mutations get INVALID_ARGUMENT and the service serves on.


def _wide(port: int, server: str) -> grpc.Channel:
    """A device's channel whose own limits are far above the servers'."""
    return mesh_pki().channel(port, server, "device", GrpcLimits(max_message_bytes=200 * 2**20))


def _mutations(codec: MaterialCodec, kind: Kind, blob: bytes) -> list[bytes]:
    """The modulus word after the first run, the length word before it set to 2^29, a byte of the
    context header: each aborted or exhausted a service before."""
    template = codec.check(kind, blob)
    run = template.runs[0]
    out = []
    for offset, value in ((run.end, 0x01), (run.end + 7, 0x80)):
        bad = bytearray(blob)
        bad[offset] ^= value
        out.append(bytes(bad))
    huge = bytearray(blob)
    huge[run.start - 8 : run.start] = (1 << 29).to_bytes(8, "little")
    out.append(bytes(huge))
    return out


def test_live_services_refuse_formerly_fatal_material_and_keep_serving(recommender, keyservice, client):
    _, core = recommender
    codec = core.codec
    query = client.encrypt_query(np.eye(64)[0])
    ref = common_pb2.KeyRef(key_id=client.key_id, version=client.key_version)
    keys = client.keys
    with _wide(recommender[0], "recommender") as rch, _wide(keyservice[0], "keyservice") as kch:
        rec = recommender_pb2_grpc.RecommenderStub(rch)
        ks = keyservice_pb2_grpc.KeyServiceStub(kch)

        def signed(method, key_id, r):
            return client._authorize(KEYSERVICE if method == "RegisterKey" else RECOMMENDER, method, key_id, r)

        def register(pk, rk):
            r = keyservice_pb2.RegisterKeyRequest(public_key=pk, rotation_key_map=rk, owner=client.account.address)
            return signed("RegisterKey", hashlib.sha256(pk).hexdigest(), r)

        calls = [
            (
                rec.Score,
                lambda q: signed("Score", ref.key_id, recommender_pb2.ScoreRequest(key=ref, query_ciphertext=q)),
                Kind.QUERY,
                query,
            ),
            (
                rec.UploadProfile,
                lambda q: signed(
                    "UploadProfile", ref.key_id, recommender_pb2.UploadProfileRequest(key=ref, query_ciphertext=q)
                ),
                Kind.QUERY,
                query,
            ),
            (ks.RegisterKey, lambda pk: register(pk, keys.rotation_key_bytes), Kind.PUBLIC_KEY, keys.public_key_bytes),
            (
                ks.RegisterKey,
                lambda rk: register(keys.public_key_bytes, rk),
                Kind.ROTATION_KEYS,
                keys.rotation_key_bytes,
            ),
        ]
        for method, request, kind, blob in calls:
            for bad in _mutations(codec, kind, blob):
                with pytest.raises(grpc.RpcError) as info:
                    method(request(bad), timeout=60)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        reply = rec.Score(
            signed("Score", ref.key_id, recommender_pb2.ScoreRequest(key=ref, query_ciphertext=query)), timeout=60
        )
        assert len(reply.score_ciphertexts) == core.scorer.block_count
        key = ks.GetKey(keyservice_pb2.GetKeyRequest(key_id=client.key_id), timeout=10)
        assert key.key.key_id == client.key_id
