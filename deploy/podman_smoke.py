"""`make images`' last step: start the built image as the key service the way the manifests run it
(non-root, read-only root, no capabilities, a development CA's certificates mounted read-only) and
check it from the host: the plaintext health port answers grpc.health.v1 SERVING and nothing else,
the main port answers a mutual-TLS call and refuses plaintext.

    python -m deploy.podman_smoke [--image localhost/cipherfeed:dev]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cipherfeed.config import GrpcLimits
from cipherfeed.devredis import free_port
from cipherfeed.grpcutil import channel
from cipherfeed.tls import DevCertificateAuthority
from cipherfeed.v1 import keyservice_pb2, keyservice_pb2_grpc

PODMAN_RUN = [
    "podman",
    "run",
    "--runtime",
    "/usr/sbin/runc",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
]
UID = 10001


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="localhost/cipherfeed:dev")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds for the service to become ready")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cf-podman-smoke-"))
    name = f"cipherfeed-smoke-{os.getpid()}"
    try:
        ca = DevCertificateAuthority("cipherfeed.local")
        pki = work / "pki"
        pki.mkdir()
        server = ca.write(pki, "keyservice")
        assert server.cert_file and server.key_file and server.ca_file
        operator = ca.write(work / "client", "operator")
        secrets = work / "secrets"
        secrets.mkdir()
        (secrets / "master.key").write_bytes(os.urandom(32))
        state = work / "state"
        state.mkdir(mode=0o700)
        for path in (pki, secrets, state, *pki.iterdir(), *secrets.iterdir()):
            os.chown(path, UID, UID)  # the container's user reads them; nobody else
        main_port, health_port = free_port(), free_port()
        run = [
            *PODMAN_RUN, "--detach", "--name", name, "--user", f"{UID}:{UID}", "--read-only",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--tmpfs", "/tmp", "-v", f"{state}:/var/lib/cipherfeed",
            "-v", f"{pki}:/etc/cipherfeed/tls:ro", "-v", f"{secrets}:/etc/cipherfeed/master-key:ro",
            "-p", f"127.0.0.1:{main_port}:50052", "-p", f"127.0.0.1:{health_port}:8081",
            "-e", "CIPHERFEED_KEYSERVICE_LISTEN=0.0.0.0:50052", "-e", "CIPHERFEED_KEYSERVICE_HEALTH_PORT=8081",
            "-e", f"CIPHERFEED_TLS_CERT_FILE=/etc/cipherfeed/tls/{server.cert_file.name}",
            "-e", f"CIPHERFEED_TLS_KEY_FILE=/etc/cipherfeed/tls/{server.key_file.name}",
            "-e", f"CIPHERFEED_TLS_CA_FILE=/etc/cipherfeed/tls/{server.ca_file.name}",
            "-e", "CIPHERFEED_MASTER_KEY_FILE=/etc/cipherfeed/master-key/master.key",
            args.image, "keyservice",
        ]  # fmt: skip
        subprocess.run(run, check=True, stdout=subprocess.DEVNULL)
        print(f"started {name} from {args.image}: main port {main_port}, health port {health_port}")
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as plain:
            reply = health_pb2_grpc.HealthStub(plain).Check(
                health_pb2.HealthCheckRequest(service="cipherfeed.v1.KeyService"),
                timeout=args.timeout,
                wait_for_ready=True,
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, reply
            print("health port (plaintext): grpc.health.v1 SERVING")
            try:
                keyservice_pb2_grpc.KeyServiceStub(plain).GetPublicKeys(
                    keyservice_pb2.GetPublicKeysRequest(), timeout=10
                )
                raise AssertionError("the health port served a KeyService method")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNIMPLEMENTED, exc
            print("health port: KeyService/GetPublicKeys is UNIMPLEMENTED there")
        with channel(f"127.0.0.1:{main_port}", GrpcLimits(), operator, "keyservice") as mtls:
            keys = keyservice_pb2_grpc.KeyServiceStub(mtls).GetPublicKeys(
                keyservice_pb2.GetPublicKeysRequest(), timeout=30
            )
            print(f"main port (mutual TLS as operator): GetPublicKeys -> {len(keys.keys)} signing keys")
        with grpc.insecure_channel(f"127.0.0.1:{main_port}") as plain_main:
            try:
                health_pb2_grpc.HealthStub(plain_main).Check(health_pb2.HealthCheckRequest(), timeout=10)
                raise AssertionError("the main port answered plaintext")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            print("main port refuses plaintext (UNAVAILABLE)")
        user = subprocess.run(
            ["podman", "exec", name, "id", "-u"], check=True, capture_output=True, text=True
        ).stdout.strip()
        assert user == str(UID), user
        print(f"runs as uid {user}, read-only root, no capabilities: OK")
        return 0
    finally:
        logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
        if logs.returncode == 0:
            print("--- container log (last lines)", *logs.stderr.splitlines()[-8:], sep="\n", file=sys.stderr)
        subprocess.run(["podman", "rm", "--force", "--time", "10", name], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
