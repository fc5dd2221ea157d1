"""The protocol fuzzer against live servers on loopback: a key service, a ledger and a recommender,
each a process of its own (``fuzz.live``), so that each server's memory is measured apart from the
fuzzer's and a crash shows as an exited process. Every RPC of every service gets fuzzed requests
built from its descriptor (also mangled serializations and bytes that are no protobuf at all, and
mutated valid HE material under a registered key), sent as an identity the policy lets through; no
answer is INTERNAL or UNKNOWN, no server exits, no server's RSS grows by more than RSS_LIMIT, and a
valid request to every server is answered right after every 100.

The suite sends CIPHERFEED_FUZZ_RPC_EXAMPLES (default 100) per RPC; ``make fuzz-rpc`` runs
``fuzz.rpc_campaign`` (10,000 per RPC, results per RPC in fuzz/results/rpc/).
"""

import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from cipherfeed.v1 import recommender_pb2
from fuzz.live import LiveMesh
from fuzz.protocol import Seeds, message_strategy
from fuzz.rpc_campaign import public_rpcs, rpc_path, run_rpc

EXAMPLES = int(os.environ.get("CIPHERFEED_FUZZ_RPC_EXAMPLES", "100"))
RSS_LIMIT = 512 << 20  # growth of one server's RSS over one RPC's campaign that fails it


@pytest.fixture(scope="module")
def mesh(tiktok_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz-rpc")
    tiktok_model.save(tmp / "model.cfmodel")
    live = LiveMesh.start(tmp / "mesh", tmp / "model.cfmodel", tiktok_model.item_count, tiktok_model.version)
    yield live
    live.stop()


@pytest.mark.parametrize("service,method", list(public_rpcs()), ids=lambda v: getattr(v, "name", v))
def test_fuzzed_requests_never_get_internal_and_the_service_keeps_serving(mesh, service, method):
    assert not mesh.exited(), "a server exited during an earlier RPC's campaign"
    o = run_rpc(mesh, service, method, EXAMPLES, chunk=EXAMPLES, rss_limit=RSS_LIMIT)
    growth = {name: g >> 20 for name, g in o.peak_growth().items()}
    print(f"\n{rpc_path(service, method)}: {o.sent} inputs, {dict(o.codes)}, {o.health_checks} checks, "
          f"peak RSS growth MiB {growth}")  # fmt: skip
    assert o.sent >= EXAMPLES * 0.9
    assert o.health_checks >= EXAMPLES // 100
    assert o.findings == 0, o.bad[:5]


def test_the_fuzzer_itself_keeps_no_memory_per_input():
    """Issue 11: 10,000 fuzzed UploadHistory requests grew this process by 3 GiB, all of it in the
    fuzzer (a strategy built per draw around its own 1 MiB value, each kept alive by hypothesis).
    Python's heap after 120 drawn requests must stay within a few MiB of its size after the first;
    before the fix it kept 94 MiB more."""
    import gc
    import tracemalloc

    from google.protobuf import message_factory

    method = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].methods_by_name["UploadHistory"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    traced: list[int] = []  # bytes traced after the first input and after every 30th
    drawn = huge_inputs = 0

    @settings(max_examples=120, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck), derandomize=True)  # fmt: skip
    @given(message_strategy(method.input_type, request_cls, Seeds()))
    def draw(request):
        nonlocal drawn, huge_inputs
        drawn += 1
        huge_inputs += request.ByteSize() >= 1 << 20
        if drawn == 1 or drawn % 30 == 0:
            gc.collect()
            traced.append(tracemalloc.get_traced_memory()[0])

    tracemalloc.start()
    try:
        draw()
    finally:
        tracemalloc.stop()
    assert drawn >= 100 and huge_inputs >= 10  # the run did draw many 1 MiB fields
    assert max(traced) - traced[0] < 16 << 20, f"{(max(traced) - traced[0]) >> 20} MiB kept by the fuzzer"
