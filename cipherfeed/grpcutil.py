"""Shared gRPC plumbing: servers with health and reflection, channels with raised limits."""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cipherfeed import errors, heap
from cipherfeed.config import GrpcLimits

log = logging.getLogger(__name__)

STATUS_FOR: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def grpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Servicer decorator: domain errors become their status with the error's message; anything
    else is INTERNAL with no details (it is logged here instead)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except errors.CipherfeedError as exc:
            for error_type, code in STATUS_FOR:
                if isinstance(exc, error_type):
                    context.abort(code, str(exc))
            raise
        except Exception:
            log.exception("unexpected error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return wrapper


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: Sequence[str]

    def stop(self, grace: float = 5.0) -> None:
        for name in (*self.service_names, ""):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace).wait()


def start_server(
    register: Callable[[grpc.Server], None],
    service_names: Sequence[str],
    listen: str,
    limits: GrpcLimits,
    workers: int,
) -> RunningServer:
    """Starts a server with the given servicers plus grpc.health.v1 and reflection.

    ``listen`` may end in ``:0`` for an ephemeral port; the bound port is returned.
    """
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=limits.channel_options(),
    )
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    for name in (*service_names, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server=server, port=port, health=health_servicer, service_names=service_names)


def wait_for_shutdown(running: RunningServer) -> None:
    """Blocks until SIGINT or SIGTERM, then drains: NOT_SERVING first, then a graceful stop."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down")
    running.stop()


def run_service(name: str, start: Callable[[], tuple[RunningServer, Any]]) -> int:
    """A service's ``main``: start it, say so on stdout once serving (tests and supervisors read
    that line instead of polling), drain on SIGINT/SIGTERM, close its core. Configuration and
    start-up errors exit with status 2 and a one-line message."""
    from cipherfeed.config import ConfigError

    heap.limit_arenas(1)  # multi-MB key material is handled on many threads (see cipherfeed.heap)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        running, core = start()
    except (ConfigError, ValueError, OSError, RuntimeError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    print(f"{name} listening on port {running.port}", flush=True)
    wait_for_shutdown(running)
    core.close()
    return 0


def channel(target: str, limits: GrpcLimits) -> grpc.Channel:
    return grpc.insecure_channel(target, options=limits.channel_options())
