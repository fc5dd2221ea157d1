"""Deeply nested JSON from a hostile peer is refused, never a crash.

py_ecc (under eth_account, eth_keys and web3) raises the recursion limit to 100,000 on import;
with it, json.loads recursed in C past the stack on ~60,000 levels and the process died with
SIGSEGV. Each case runs in a child process as the SDK, the CLI or a service runs: a crash there
shows as a signal, not as a dead test runner.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

DEPTH = 100_000


def run_child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, check=False
    )


ENTRY_POINTS = [
    "cipherfeed.client.sdk",
    "cipherfeed.ownerauth",
    "gateway.app",
    "services.ledger.anchor",
    "cipherfeed.cli",
]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_importing_the_eth_stack_leaves_a_sane_recursion_limit(module: str):
    child = run_child(f"import sys, {module}; print(sys.getrecursionlimit())")
    assert child.returncode == 0, child.stderr[-2000:]
    assert int(child.stdout.strip()) <= 1000


def test_a_manifest_header_nested_deeply_is_refused():
    # a hostile recommender's manifest: 65,000 '[' fit in the 64 KiB header limit
    child = run_child("""
        import cipherfeed.client.sdk  # what every client process imports (eth_account, py_ecc)
        from cipherfeed import manifest
        header = b"[" * 65000
        try:
            manifest.decode(manifest.MAGIC + len(header).to_bytes(4, "big") + header)
        except manifest.ManifestError as exc:
            print("refused:", exc)
    """)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    assert "refused: manifest header is nested too deeply" in child.stdout


@pytest.mark.parametrize("status", [200, 500])
def test_a_gateway_reply_nested_deeply_is_refused_by_the_sdk(status: int):
    # a hostile gateway (or anything on the path to it): an answer or an error of DEPTH '['
    child = run_child(f"""
        import http.server, threading
        import grpc
        import cipherfeed.client.sdk  # noqa: F401
        from cipherfeed.client.transport import HttpChannel
        from cipherfeed.config import GrpcLimits, TlsConfig
        from cipherfeed.v1 import recommender_pb2, recommender_pb2_grpc

        BODY = b"[" * {DEPTH}

        class Hostile(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response({status})
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                self.wfile.write(BODY)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        channel = HttpChannel(f"http://127.0.0.1:{{server.server_address[1]}}", GrpcLimits(), TlsConfig())
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        try:
            stub.GetModelInfo(recommender_pb2.GetModelInfoRequest(), timeout=60)
        except grpc.RpcError as exc:
            print("refused:", exc.code().name)
    """)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    # an answer that cannot be decoded is INTERNAL; an undecodable error takes the HTTP status's code (500)
    assert child.stdout.strip() == "refused: INTERNAL"


def test_a_trust_file_nested_deeply_is_refused():
    # the trust file is the operator's, copied by hand: 60,000 '[' fit its 256 KiB limit
    child = run_child("""
        import cipherfeed.client.sdk  # noqa: F401
        from cipherfeed import trust
        try:
            trust.parse(b"[" * 60000)
        except trust.TrustError as exc:
            print("refused:", exc)
    """)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    assert "refused: not a trust file: nested too deeply" in child.stdout
