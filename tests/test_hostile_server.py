"""A hostile recommender cannot crash, hang or exhaust the device (issue 11, item 1, on the device).

A real gRPC server on loopback, set up as the mesh's servers are (mutual TLS as the recommender, the
policy), serves the Recommender API with a hostile servicer: GetParams is forwarded to the real
recommender, and Score answers the real recommender's own ScoreResponse for the device's query,
changed as the probe asks (the hashes and the receipt made to match, as a hostile server would).
The real SDK, in child processes under an address-space cap (``tests/hostile_device.py``), asks for
every probe: every byte outside the coefficient words of each score-ciphertext layout in the answer
XORed with several values, cuts and appendices of the serialization and of its wire packing, length
words set to 2^29 and 2^64 - 1, every framing byte of the packing, and the answer's other fields
(layout, counts, hashes, key version). Each must be refused with ``ResponseRefused`` and the precise
reason and block: no signal, no hang, a peak memory within 2x that of decrypting the valid answer;
and the valid answer still decrypts to the right scores, before and after.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cipherfeed.client.sdk import RECOMMENDER, Refusal
from cipherfeed.grpcutil import start_server
from cipherfeed.he import packing, scorecheck, wire
from cipherfeed.he.codec import ciphertext_sha256
from cipherfeed.he.keymap import installed_tag
from cipherfeed.he.params import MESH_PARAMS
from cipherfeed.receipts import Receipt
from cipherfeed.v1 import common_pb2, recommender_pb2, recommender_pb2_grpc
from tests.conftest import TEST_LIMITS, mesh_pki

N = MESH_PARAMS.ring_dimension
XORS = (0x01, 0x80, 0xFF)
SILENCE_SECONDS = 120  # a hang detector only: a probe takes milliseconds
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Probe:
    """One change to the real answer: ``edit`` at ``at`` with ``value`` in score ciphertext
    ``block`` (or in the field ``name``), and the refusal it must get."""

    edit: str
    block: int = 0
    at: int = 0
    value: int = 0
    name: str = ""
    reason: Refusal | None = Refusal.CIPHERTEXT_INVALID  # None: a valid answer, accepted

    @property
    def expected(self) -> str:
        if self.reason is None:
            return "accepted"
        block = self.block if self.reason is Refusal.CIPHERTEXT_INVALID else None
        return f"refused:ResponseRefused:{self.reason.value}:{block}"

    def __str__(self) -> str:
        return f"{self.edit} {self.name or f'block {self.block}'} at {self.at} value {self.value:#x}"


def framing_offsets(packed: bytes) -> list[int]:
    """The bytes of the wire packing's own framing: magic, counts, segment headers, tail length."""
    offsets = list(range(len(wire.MAGIC) + 4))
    (count,) = struct.unpack_from("<I", packed, len(wire.MAGIC))
    pos = len(wire.MAGIC) + 4
    for _ in range(count):
        raw_len, n, bits = struct.unpack_from("<IIB", packed, pos)
        offsets += range(pos, pos + 9)
        pos += 9 + raw_len + wire._packed_size(n, bits)
    return offsets + list(range(pos, pos + 4))


def make_probes(real: recommender_pb2.ScoreResponse, tag: str) -> tuple[list[Probe], dict[str, int]]:
    checker = scorecheck.for_params(MESH_PARAMS)
    blobs = list(real.score_ciphertexts)
    layouts: dict[int, int] = {}  # serialization length -> the first block of that layout
    for b, blob in enumerate(blobs):
        layouts.setdefault(len(wire.unpack(blob)), b)
    probes: list[Probe] = []
    structural = {}
    for length, b in sorted(layouts.items()):
        raw = wire.unpack(blobs[b])
        template = checker.templates(len(tag)).check(raw, tag.encode())
        offsets = [int(o) for o in template.structure_offsets]
        structural[f"block {b} ({length} bytes)"] = len(offsets)
        probes += [Probe("xor", b, o, x) for o in offsets for x in XORS]
        run = template.runs[0]
        for at in sorted({0, 1, 8, run.start - 8, run.start, run.end, length // 2, length - 8, length - 1}):
            probes.append(Probe("cut", b, at))
        probes += [Probe("append", b, value=v) for v in (1, 8, 3900, length)]
        for r in template.runs:
            probes += [Probe("word", b, r.start - 8, v) for v in (1 << 29, 2**64 - 1, N + 1)]
            probes += [Probe("word", b, r.end - 8, v) for v in (r.modulus, 2**64 - 1)]
        probes.append(Probe("word", b, run.start, run.modulus - 1, reason=None))  # in range: a valid ciphertext
        probes += [Probe("packed_xor", b, o, x) for o in framing_offsets(blobs[b]) for x in XORS]
        probes += [Probe("packed_cut", b, at) for at in (0, 4, len(wire.MAGIC) + 4, len(blobs[b]) - 1)]
        probes += [Probe("packed_append", b, value=v) for v in (1, 4096)]
        probes.append(Probe("replace", b, value=0))  # an empty blob
        probes.append(Probe("replace", b, value=256 << 10))  # longer than any score ciphertext: refused unread
    layout, last = real.layout, len(blobs) - 1
    # The unchanged answer now and then: the valid answers' peak memory is the bound's base.
    probes = [p for i, p in enumerate(probes) for p in ((Probe("none", reason=None), p) if i % 250 == 0 else (p,))]
    probes += [
        Probe("field", name="item_count", value=0, reason=Refusal.LAYOUT_INVALID),
        Probe(
            "field",
            name="item_count",
            value=layout.item_count + layout.items_per_ciphertext,
            reason=Refusal.COUNT_INVALID,
        ),
        Probe("field", name="item_count", value=2**32 - 1, reason=Refusal.COUNT_INVALID),
        Probe("field", name="slots", value=layout.slots // 2, reason=Refusal.LAYOUT_INVALID),
        Probe("field", name="items_per_ciphertext", value=1, reason=Refusal.LAYOUT_INVALID),
        Probe("field", name="tail_fold", value=3, reason=Refusal.LAYOUT_INVALID),
        Probe("field", name="query_sha256", reason=Refusal.QUERY_MISMATCH),
        Probe("field", name="response_sha256", reason=Refusal.RESPONSE_HASH_MISMATCH),
        Probe("field", name="key_version", value=real.key_version + 1, reason=Refusal.KEY_VERSION_MISMATCH),
        Probe("field", name="key_version", value=2**32 - 1, reason=Refusal.KEY_VERSION_MISMATCH),
        Probe("drop", last, reason=Refusal.COUNT_INVALID),
        Probe("extra", last, reason=Refusal.COUNT_INVALID),
    ]
    return probes, structural


def answer(real: recommender_pb2.ScoreResponse, probe: Probe, key_id: str) -> recommender_pb2.ScoreResponse:
    """The real answer with ``probe`` applied, its hashes and receipt id made to match."""
    blobs = list(real.score_ciphertexts)
    b = probe.block
    if probe.edit in ("xor", "word", "cut", "append"):
        raw = bytearray(wire.unpack(blobs[b]))
        if probe.edit == "xor":
            raw[probe.at] ^= probe.value
        elif probe.edit == "word":
            raw[probe.at : probe.at + 8] = probe.value.to_bytes(8, "little")
        elif probe.edit == "cut":
            del raw[probe.at :]
        else:
            raw += bytes(i * 37 % 256 for i in range(probe.value))
        blobs[b] = wire.pack(bytes(raw), (N,))
    elif probe.edit == "packed_xor":
        packed = bytearray(blobs[b])
        packed[probe.at] ^= probe.value
        blobs[b] = bytes(packed)
    elif probe.edit == "packed_cut":
        blobs[b] = blobs[b][: probe.at]
    elif probe.edit == "packed_append":
        blobs[b] += b"\xa5" * probe.value
    elif probe.edit == "replace":
        blobs[b] = wire.MAGIC + b"\xa5" * probe.value if probe.value else b""
    elif probe.edit == "drop":
        del blobs[b]
    elif probe.edit == "extra":
        blobs.append(blobs[b])
    response = recommender_pb2.ScoreResponse()
    response.CopyFrom(real)
    del response.score_ciphertexts[:]
    response.score_ciphertexts.extend(blobs)
    response.response_sha256 = ciphertext_sha256(blobs)
    if probe.edit == "field":
        if probe.name in ("query_sha256", "response_sha256"):
            setattr(response, probe.name, bytes(32))
        elif probe.name == "key_version":
            response.key_version = probe.value
        else:
            setattr(response.layout, probe.name, probe.value)
    if response.receipt_id:
        response.receipt_id = Receipt(
            query_sha256=response.query_sha256.hex(),
            response_sha256=response.response_sha256.hex(),
            model_version=response.model_version,
            key_id=key_id,
            key_version=response.key_version,
            unix_millis=response.receipt_unix_millis,
        ).receipt_id
    return response


class HostileRecommender(recommender_pb2_grpc.RecommenderServicer):
    """GetParams from the real recommender; Score: the real answer, changed as ``cf-probe`` says."""

    def __init__(self, real_stub: Any, real: recommender_pb2.ScoreResponse, probes: list[Probe], key_id: str):
        self.real_stub, self.real, self.probes, self.key_id = real_stub, real, probes, key_id

    def GetParams(self, request: Any, context: Any) -> Any:
        return self.real_stub.GetParams(request, timeout=30)

    def Score(self, request: Any, context: Any) -> Any:
        number = int(dict(context.invocation_metadata()).get("cf-probe", "-1"))
        if number < 0:
            return self.real
        return answer(self.real, self.probes[number], self.key_id)


@dataclass
class Scan:
    outcomes: dict[int, str]
    peaks: dict[int, int]
    signals: list[str]
    hangs: list[str]
    ready: list[dict[str, Any]]
    done: list[dict[str, Any]]


def run_devices(spec: Path, probes: int, env: dict[str, str], log: Path) -> Scan:
    """Runs ``tests.hostile_device`` over every probe; a device that dies or falls silent is
    recorded against the probe it was on and a new one continues after it."""
    scan = Scan({}, {}, [], [], [], [])
    first = 0
    while first <= probes and len(scan.signals) + len(scan.hangs) < 20:
        with open(log, "ab") as err:
            child = subprocess.Popen(
                [sys.executable, "-m", "tests.hostile_device", str(spec), str(first)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        assert child.stdout is not None
        buffered, finished = b"", False
        while True:
            ready, _, _ = select.select([child.stdout], [], [], SILENCE_SECONDS)
            if not ready:
                child.kill()
                break
            data = os.read(child.stdout.fileno(), 1 << 16)
            if not data:
                break
            buffered += data
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                record = json.loads(line)
                if "probe" in record:
                    scan.outcomes[record["probe"]] = record["outcome"]
                    scan.peaks[record["probe"]] = record["peak_kib"]
                    first = record["probe"] + 1
                elif "ready" in record:
                    scan.ready.append(record)
                else:
                    scan.done.append(record)
                    finished = True
        status = child.wait()
        child.stdout.close()
        if finished:
            break
        where = f"probe {first}" if first < probes else "the final valid answer"
        if status < 0 and status != -9:
            scan.signals.append(f"{where}: signal {-status}")
        else:
            scan.hangs.append(f"{where}: exit {status}")
        first += 1
    return scan


@pytest.fixture(scope="module")
def hostile(recommender, keyservice, client, tmp_path_factory):
    port, core = recommender
    rng = np.random.default_rng(11)
    u = rng.standard_normal(core.model.dim)
    u /= np.linalg.norm(u)
    query = client.encrypt_query(u)
    key = common_pb2.KeyRef(key_id=client.key_id, version=client.key_version)
    request = recommender_pb2.ScoreRequest(key=key, query_ciphertext=query)
    pki = mesh_pki()
    real_channel = pki.channel(port, "recommender", "device")
    real_stub = recommender_pb2_grpc.RecommenderStub(real_channel)
    real = real_stub.Score(client._authorize(RECOMMENDER, "Score", client.key_id, request), timeout=120)
    tag = installed_tag(client.key_id, real.key_version)
    probes, structural = make_probes(real, tag)
    servicer = HostileRecommender(real_stub, real, probes, client.key_id)
    server = start_server(
        lambda s: recommender_pb2_grpc.add_RecommenderServicer_to_server(servicer, s),
        [recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name],
        "127.0.0.1:0",
        TEST_LIMITS,
        4,
        pki.tls("recommender"),
    )
    work = tmp_path_factory.mktemp("hostile")
    (work / "query").write_bytes(query)
    m = core.model
    np.save(work / "expected.npy", packing.plaintext_scores(m.embeddings, u, m.popularity, m.popularity_weight))
    spec = {
        "target": f"127.0.0.1:{server.port}",
        "keyservice": f"127.0.0.1:{keyservice[0]}",
        "home": str(work / "device"),
        "keys": str(client.config.home / "keys"),
        "key_id": client.key_id,
        "key_version": client.key_version,
        "query": str(work / "query"),
        "expected": str(work / "expected.npy"),
        "probes": len(probes),
    }
    (work / "spec.json").write_text(json.dumps(spec))
    # glibc keeps freed memory instead of handing it back between probes, so a probe's peak-RSS
    # growth is what it allocated beyond the device's working set, not pages faulted in again.
    trim = {"MALLOC_TRIM_THRESHOLD_": str(1 << 28), "MALLOC_MMAP_THRESHOLD_": str(1 << 28)}
    env = {**os.environ, **pki.env("device"), **trim, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    scan = run_devices(work / "spec.json", len(probes), env, work / "device.log")
    print(
        f"hostile server: {len(probes)} probes over {structural} structural bytes and the other fields,"
        f" {time.monotonic() - started:.1f} s, {len(scan.ready)} device process(es)"
    )
    yield probes, scan, work
    server.stop(grace=0)
    real_channel.close()


def test_a_hostile_recommender_is_refused_precisely_without_signal_hang_or_big_allocation(hostile):
    probes, scan, work = hostile
    log = (work / "device.log").read_text()[-3000:]
    assert not scan.signals, (scan.signals[:5], log)
    assert not scan.hangs, (scan.hangs[:5], log)
    wrong = [
        f"{p}: got {scan.outcomes.get(i)}, expected {p.expected}"
        for i, p in enumerate(probes)
        if scan.outcomes.get(i) != p.expected
    ]
    assert not wrong, (len(wrong), wrong[:10])
    valid_peak = max(kib for i, kib in scan.peaks.items() if probes[i].reason is None)
    refused = sorted(((kib, i) for i, kib in scan.peaks.items() if probes[i].reason is not None), reverse=True)
    top = [f"{probes[i]}: +{kib} KiB" for kib, i in refused[:5]]
    print(f"peak RSS growth: valid answer +{valid_peak} KiB, largest refused {top}")
    assert refused[0][0] <= 2 * valid_peak, (valid_peak, top)


def test_the_valid_answer_decrypts_to_the_right_scores_before_and_after(hostile):
    _, scan, _ = hostile
    assert scan.ready and scan.done
    assert all(r["max_error"] < 1e-4 for r in scan.ready), scan.ready
    assert scan.done[-1]["max_error"] < 1e-4, scan.done
