"""A device for test_hostile_server: the real SDK scoring one query against a hostile recommender.

Run as ``python -m tests.hostile_device SPEC FIRST``: it loads the device's keys, checks that the
hostile server's unmutated answer decrypts to the right scores, caps its own address space, then
asks for probes FIRST, FIRST + 1, ... (the probe number travels in the ``cf-probe`` metadata
header) and prints one JSON line per probe: its number, the outcome (``refused:<error
class>:<reason>:<block>``, ``accepted``, or ``error:<type>: <message>``) and the peak-RSS growth in
KiB (see below). A fresh process (fork + exec) rather than a fork of the test: gRPC does not survive a fork.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from cipherfeed.client.sdk import ClientError, RecommenderClient, ResponseRefused
from cipherfeed.config import ClientConfig, GrpcLimits, TlsConfig
from cipherfeed.v1 import recommender_pb2_grpc

ADDRESS_SPACE_HEADROOM = 1 << 30  # the device may map 1 GiB above what it holds after start-up


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field))


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # the peak RSS becomes the current RSS
    return _status("VmHWM")


class ProbeHeader(grpc.UnaryUnaryClientInterceptor):
    """Adds ``cf-probe: <number>`` to every call (the hostile server answers that probe)."""

    def __init__(self) -> None:
        self.number = -1

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), ("cf-probe", str(self.number))]
        return continuation(details._replace(metadata=metadata), request)


def outcome(client: RecommenderClient, query: bytes) -> str:
    try:
        client.score_ciphertext(query)
    except ResponseRefused as exc:
        return f"refused:{type(exc).__name__}:{getattr(exc.reason, 'value', exc.reason)}:{exc.block}"
    except ClientError as exc:  # the SDK's hierarchy, but not the refusal this test expects
        return f"refused:{type(exc).__name__}:{str(exc)[:200]}"
    except Exception as exc:
        return f"error:{type(exc).__name__}: {str(exc)[:200]}"
    return "accepted"


def main(spec_path: str, first: int) -> int:
    spec = json.loads(Path(spec_path).read_text())
    config = ClientConfig(
        target=spec["target"],
        keyservice_target=spec["keyservice"],  # the real one: the owner signs in once
        deadline_seconds=120,
        home=Path(spec["home"]),
        limits=GrpcLimits(max_message_bytes=64 * 1024 * 1024, max_query_bytes=1024 * 1024),
        tls=TlsConfig.from_env(),  # the test hands the device identity's files over the environment
    )
    client = RecommenderClient(config)
    header = ProbeHeader()
    client.stub = recommender_pb2_grpc.RecommenderStub(grpc.intercept_channel(client._channel, header))
    client.use_keys(Path(spec["keys"]))
    client.key_id, client.key_version = spec["key_id"], spec["key_version"]
    client.sign_in()  # a session token on every request instead of an EIP-712 signature each
    query = Path(spec["query"]).read_bytes()
    expected = np.load(spec["expected"])
    client.score_ciphertext(query)  # learns the score templates
    base = _reset_peak()
    scores = client.score_ciphertext(query).scores
    valid_peak = _status("VmHWM") - base
    error = float(np.abs(scores - expected).max()) if scores.shape == expected.shape else float("inf")
    cap = 1024 * _status("VmSize") + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    print(json.dumps({"ready": True, "max_error": error, "valid_peak_kib": valid_peak}), flush=True)
    for number in range(first, spec["probes"]):
        header.number = number
        growth: list[int] = []
        # Background threads (gRPC's) allocate now and then, at any probe: a growth above twice the
        # valid answer's is measured again, up to three times in all, and the least is reported. An
        # allocation the probe makes shows in every try.
        while len(growth) < 3 and (not growth or min(growth) > 2 * valid_peak):
            base = _reset_peak()
            result = outcome(client, query)
            growth.append(_status("VmHWM") - base)
        print(json.dumps({"probe": number, "outcome": result, "peak_kib": min(growth)}), flush=True)
    header.number = -1
    after = client.score_ciphertext(query).scores  # the valid answer still decrypts right
    print(json.dumps({"done": True, "max_error": float(np.abs(after - expected).max())}), flush=True)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
