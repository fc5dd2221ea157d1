"""The protocol fuzzer's long run (``make fuzz-rpc``): ``--examples`` inputs (10,000 by default) to
every public RPC of a key service, a ledger and a recommender, each a process of its own on
loopback (``fuzz.live``), over mutual TLS as an identity the policy admits.

Inputs are drawn in chunks of ``--chunk`` (hypothesis, one seed per chunk); after every chunk the
RPC's results so far are written to ``<results>/<Service>.<Method>.json``, so an interrupted run
still says honestly how far each RPC got, and a rerun resumes at the first RPC not yet complete
(``--fresh`` starts over). Per RPC: inputs, answers by status, findings (INTERNAL or UNKNOWN, a
valid request answered wrong, a server that exited, a server's RSS grown by more than
``--rss-limit-mib``), valid-request checks (every server, every 100 inputs), each server's RSS at the
start, peak and end, the fuzzer's own peak RSS, and the machine's load. A server that exits is
restarted (with a fresh state) before the next RPC. Exit status 1 on any finding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, seed, settings

from cipherfeed.config import REPO_ROOT, default_dataset_path
from cipherfeed.v1 import keyservice_pb2, ledger_pb2, recommender_pb2
from fuzz.live import LiveMesh, identity_for
from fuzz.protocol import Campaign, Outcome, request_bytes

RESULTS = REPO_ROOT / "fuzz" / "results" / "rpc"
# RPCs whose inputs carry (mutated) HE material, up to a 17 MB rotation-key map: the slow ones.
CARRY_HE_MATERIAL = frozenset(
    {"KeyService/RegisterKey", "KeyService/RotateKey", "Recommender/UploadHistory", "Recommender/UploadProfile",
     "Recommender/Score"}
)  # fmt: skip


def public_rpcs() -> Iterator[tuple[str, MethodDescriptor]]:
    for module in (keyservice_pb2, ledger_pb2, recommender_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                yield service.name, method


def rpc_path(service: str, method: MethodDescriptor) -> str:
    return f"/cipherfeed.v1.{service}/{method.name}"


def prepare_model(directory: Path) -> tuple[Path, int, str]:
    """The TikTok content model, trained once and saved under ``directory``."""
    from services.recommender import artifact
    from services.recommender.dataset import load_profiles
    from services.recommender.model import train

    path = directory / "model.cfmodel"
    if path.exists():
        model = artifact.load(path)
    else:
        model = train(load_profiles(default_dataset_path()), created_by="fuzz")
        directory.mkdir(parents=True, exist_ok=True)
        model.save(path)
    return path, model.item_count, model.version


def session_signer(mesh: LiveMesh) -> Callable[[Message], None]:
    """Sets the victim owner's session token on a request that has an ``auth`` field, so that a
    fuzzed request can get past the owner check (it names the victim's key only when drawn so)."""
    state: dict[str, Any] = {"token": None, "until": 0.0}

    def sign(msg: Message) -> None:
        if "auth" not in msg.DESCRIPTOR.fields_by_name:
            return
        if state["token"] is None or time.time() > state["until"]:
            state["token"] = mesh.victim.sign_in()
            assert mesh.victim.session is not None
            state["until"] = mesh.victim.session.expires_unix - 60
        msg.auth.session_token = state["token"]  # type: ignore[attr-defined]

    return sign


def outcome_json(path: str, outcome: Outcome, target: int, complete: bool, fuzzer_peak: int) -> dict[str, Any]:
    mib = 1 << 20
    return {
        "rpc": path,
        "inputs": outcome.sent,
        "target": target,
        "complete": complete,
        "answers": dict(sorted(outcome.codes.items())),
        "findings": outcome.findings,
        "first_findings": outcome.bad,
        "valid_request_checks": outcome.health_checks,
        "valid_request_failures": outcome.health_failures,
        "rss_mib": {
            name: {
                "start": round(start / mib, 1),
                "peak": round(outcome.rss_peak.get(name, 0) / mib, 1),
                "end": round(outcome.rss_end.get(name, 0) / mib, 1),
                "peak_growth": round((outcome.rss_peak.get(name, 0) - start) / mib, 1),
            }
            for name, start in outcome.rss_start.items()
        },
        "fuzzer_peak_rss_mib": round(fuzzer_peak / mib, 1),
        "seconds": round(outcome.seconds, 1),
        "check_seconds": round(outcome.check_seconds, 1),
        "wall_seconds": round(outcome.wall_seconds, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }


def run_rpc(
    mesh: LiveMesh,
    service: str,
    method: MethodDescriptor,
    examples: int,
    chunk: int,
    rss_limit: int,
    on_chunk: Callable[[Outcome, bool], None] = lambda _o, _done: None,
) -> Outcome:
    """``examples`` fuzzed inputs to one RPC (fewer only if hypothesis runs out of distinct ones)."""
    path = rpc_path(service, method)
    identity = identity_for(path)
    mesh.new_victim()
    mesh.stub(service, identity)  # opens the channel the raw call below uses
    call = mesh.raw_call(service, method.name, identity)
    request_cls = message_factory.GetMessageClass(method.input_type)
    strategy = request_bytes(method.input_type, request_cls, mesh.seeds(), sign=session_signer(mesh))
    campaign = Campaign(call=call, checks=mesh.checks(), rss=mesh.rss, rss_limit=rss_limit, exited=mesh.exited)
    started = time.perf_counter()
    for index in range((examples + chunk - 1) // chunk):
        size = min(chunk, examples - index * chunk)

        @settings(max_examples=size, database=None, phases=[Phase.generate], deadline=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @seed(index)
        @given(strategy)
        def send(data: bytes) -> None:
            campaign.send(data)

        send()
        campaign.outcome.wall_seconds = time.perf_counter() - started
        done = index * chunk + size >= examples or bool(mesh.exited())
        if done:
            campaign.check()
        on_chunk(campaign.outcome, done)
        if mesh.exited():
            break
    return campaign.outcome


def markdown_table(results: Path) -> str:
    """The README's per-RPC table, from the results written so far."""
    rows = [
        "| RPC | inputs | answers | findings | valid requests after every 100 "
        "| peak RSS growth, MiB (key service / ledger / recommender) | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for service, method in public_rpcs():
        f = results / f"{service}.{method.name}.json"
        if not f.exists():
            rows.append(f"| `{service}/{method.name}` | not run | | | | | |")
            continue
        d = json.loads(f.read_text())
        answers = ", ".join(f"{n:,} {code}" for code, n in sorted(d["answers"].items(), key=lambda kv: -kv[1]))
        checks = d["valid_request_checks"]
        rss = "/".join(f"{d['rss_mib'][name]['peak_growth']:g}" for name in ("keyservice", "ledger", "recommender"))
        partial = "" if d["complete"] else " (partial)"
        rows.append(
            f"| `{service}/{method.name}` | {d['inputs']:,}{partial} | {answers} | {d['findings']} | "
            f"{checks - d['valid_request_failures']} of {checks} | {rss} | {d['wall_seconds']:.0f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000, help="inputs per RPC")
    parser.add_argument("--chunk", type=int, default=1000, help="inputs per hypothesis run (and per checkpoint)")
    parser.add_argument("--rss-limit-mib", type=int, default=512, help="RSS growth of one server that fails the run")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=None, help="servers' state (default: a temporary directory)")
    parser.add_argument("--fresh", action="store_true", help="rerun RPCs whose results are complete")
    parser.add_argument("--table", action="store_true", help="print the results so far as a Markdown table")
    parser.add_argument("rpcs", nargs="*", help="e.g. KeyService/GetKey (default: every public RPC)")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(args.results))
        return 0
    args.results.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cipherfeed-fuzz-rpc-"))
    model_path, item_count, model_version = prepare_model(workdir / "model")
    chosen = [(s, m) for s, m in public_rpcs() if not args.rpcs or f"{s}/{m.name}" in args.rpcs]
    chosen.sort(key=lambda sm: f"{sm[0]}/{sm[1].name}" in CARRY_HE_MATERIAL)  # stable: the slow ones last
    me = psutil.Process()
    mesh: LiveMesh | None = None
    generation = 0
    findings = 0
    print(f"{'rpc':<42} {'inputs':>7} {'findings':>8} {'checks':>6}  peak RSS growth MiB (ks/ledger/rec)  s")
    try:
        for service, method in chosen:
            path = rpc_path(service, method)
            out = args.results / f"{service}.{method.name}.json"
            if not args.fresh and out.exists():
                old = json.loads(out.read_text())
                if old.get("complete") and old.get("inputs", 0) >= args.examples and old.get("target") == args.examples:
                    print(f"{path:<42} {old['inputs']:>7} (done before)", flush=True)
                    findings += old["findings"]
                    continue
            if mesh is None or mesh.exited():
                if mesh is not None:
                    mesh.stop()
                generation += 1
                mesh = LiveMesh.start(workdir / f"mesh-{generation}", model_path, item_count, model_version)
            fuzzer_peak = me.memory_info().rss

            def checkpoint(outcome: Outcome, done: bool, path: str = path, out: Path = out) -> None:
                nonlocal fuzzer_peak
                fuzzer_peak = max(fuzzer_peak, me.memory_info().rss)
                record = outcome_json(path, outcome, args.examples, done, fuzzer_peak)
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps(record, indent=1) + "\n")
                tmp.replace(out)

            outcome = run_rpc(mesh, service, method, args.examples, args.chunk, args.rss_limit_mib << 20, checkpoint)
            findings += outcome.findings
            growth = outcome.peak_growth()
            print(
                f"{path:<42} {outcome.sent:>7} {outcome.findings:>8} {outcome.health_checks:>6}  "
                f"{growth.get('keyservice', 0) >> 20:>5}/{growth.get('ledger', 0) >> 20}/"
                f"{growth.get('recommender', 0) >> 20}  {outcome.seconds:.0f}/{outcome.wall_seconds:.0f}",
                flush=True,
            )
            if mesh.exited():
                for name in mesh.exited():
                    print(f"{name} exited; its log ends:\n{mesh.log_tail(name)}", file=sys.stderr)
    finally:
        if mesh is not None:
            mesh.stop()
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
