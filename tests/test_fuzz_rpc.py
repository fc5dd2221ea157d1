"""The protocol fuzzer against live servers on loopback (a key service, a recommender and a ledger
of its own, so that fuzzed key changes touch no other test): every RPC of every service gets
requests built from its descriptor, sent as an identity the policy lets through; no answer is
INTERNAL or UNKNOWN, memory stays bounded, and a valid request is answered right after every 100.

The suite sends CIPHERFEED_FUZZ_RPC_EXAMPLES (default 200) per RPC; ``make fuzz-rpc`` sends 10,000.
"""

import dataclasses
import os

import numpy as np
import psutil
import pytest
from eth_account import Account
from hypothesis import HealthCheck, Phase, given, settings

from cipherfeed import policy
from cipherfeed.client import keystore
from cipherfeed.he.params import MESH_PARAMS
from cipherfeed.v1 import (
    common_pb2,
    keyservice_pb2,
    keyservice_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    recommender_pb2,
    recommender_pb2_grpc,
)
from fuzz.protocol import Campaign, Seeds, message_strategy
from services.keyservice.server import serve as serve_keyservice
from services.ledger.server import serve as serve_ledger
from services.ledger.signers import LocalSigner
from services.recommender.server import serve as serve_recommender
from tests.conftest import client_for, keyservice_config, mesh_pki, recommender_config
from tests.test_ledger import ORIGIN, ledger_config

EXAMPLES = int(os.environ.get("CIPHERFEED_FUZZ_RPC_EXAMPLES", "200"))
RSS_LIMIT = 1 << 30  # growth of this process (it hosts all three servers) that fails the run
RESULTS: dict[str, object] = {}


@pytest.fixture(scope="module")
def mesh(tiktok_model, redis_server, master_key_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz-rpc")
    ks, ks_core = serve_keyservice(
        keyservice_config(tmp / "ks", master_key_file, redis_server.config_for("keyservice"))
    )
    ledger, ledger_core = serve_ledger(ledger_config(tmp), signer=LocalSigner(ORIGIN), background_anchoring=False)
    ledger_core.log.append_many([b"first leaf"])
    ledger_core.log.checkpoint()
    rec_config = dataclasses.replace(recommender_config(tmp / "rec", ks.port, redis_server.config_for("recommender")))
    rec, rec_core = serve_recommender(rec_config, tiktok_model)
    health = client_for(rec.port, ks.port, tmp / "health")  # its key is never given to the fuzzer
    health.use_keys()
    health.register()
    victim = client_for(rec.port, ks.port, tmp / "victim")  # the fuzzer may disable or destroy this one
    victim.keys, victim.account = keystore.generate(MESH_PARAMS), Account.create()
    victim.register()
    query = health.encrypt_query(np.eye(64)[0])
    channels = {}

    def stub(service, identity):
        port, name, cls = {
            "KeyService": (ks.port, "keyservice", keyservice_pb2_grpc.KeyServiceStub),
            "Ledger": (ledger.port, "ledger", ledger_pb2_grpc.LedgerStub),
            "Recommender": (rec.port, "recommender", recommender_pb2_grpc.RecommenderStub),
        }[service]
        if (service, identity) not in channels:
            channels[service, identity] = mesh_pki().channel(port, name, identity)
        return cls(channels[service, identity])

    receipt = "ab" * 32
    seeds = Seeds(
        strings={
            "key_id": [victim.key_id],
            "model_version": [rec_core.model_version],
            "receipt_id": [receipt],
            "key_name": ["ledger", "nobody"],
        },
        # HE material is only drawn at random here: mutated valid ciphertexts and keys are what the
        # HE validator (issue 11, item 1) makes safe; until it is on main a flipped modulus byte
        # still aborts the process (and with it this test session).
        blobs={"message": [b"checkpoint body"]},
        messages={"cipherfeed.v1.KeyRef": [common_pb2.KeyRef(key_id=victim.key_id, version=1)]},
    )

    def healthy():
        ok = health.score_ciphertext(query)
        record = stub("KeyService", "device").GetKey(keyservice_pb2.GetKeyRequest(key_id=health.key_id), timeout=30)
        cp = stub("Ledger", "device").GetCheckpoint(ledger_pb2.GetCheckpointRequest(), timeout=30)
        return len(ok.scores) == rec_core.model.item_count and record.state == keyservice_pb2.ENABLED and cp.size >= 1

    yield stub, seeds, healthy
    for ch in channels.values():
        ch.close()
    health.close()
    victim.close()
    rec.stop(grace=1)
    rec_core.close()
    ledger.stop(grace=1)
    ledger_core.close()
    ks.stop(grace=1)
    ks_core.close()


def rpcs():
    for module in (keyservice_pb2, ledger_pb2, recommender_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                yield service.name, method


def identity_for(path: str) -> str:
    allowed = policy.POLICY[path]
    return policy.DEVICE if policy.DEVICE in allowed else sorted(allowed)[0]


@pytest.mark.parametrize("service,method", list(rpcs()), ids=lambda v: getattr(v, "name", v))
def test_fuzzed_requests_never_get_internal_and_the_service_keeps_serving(mesh, service, method):
    stub, seeds, healthy = mesh
    path = f"/cipherfeed.v1.{service}/{method.name}"
    call = getattr(stub(service, identity_for(path)), method.name)
    from google.protobuf import message_factory

    request_cls = message_factory.GetMessageClass(method.input_type)
    process = psutil.Process()
    campaign = Campaign(call=call, healthy=healthy, rss=lambda: process.memory_info().rss, rss_limit=RSS_LIMIT)

    @settings(max_examples=EXAMPLES, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck), derandomize=EXAMPLES <= 200)  # fmt: skip
    @given(message_strategy(method.input_type, request_cls, seeds))
    def send(request):
        campaign.send(request)

    send()
    campaign.check()
    o = campaign.outcome
    RESULTS[path] = o
    print(f"\n{path}: {o.sent} inputs, {dict(o.codes)}, {o.health_checks} health checks, "
          f"peak RSS growth {o.peak_rss_growth >> 20} MiB")  # fmt: skip
    assert o.sent >= (EXAMPLES * 0.9 if method.input_type.fields else 1)  # a message without fields has one value
    assert not o.bad, o.bad[:5]


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
