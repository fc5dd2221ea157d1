"""Shared gRPC plumbing: mutual-TLS servers with health, reflection and the authorization policy;
mutual-TLS channels with raised limits."""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2
from google.rpc.error_details_pb2 import ErrorInfo, RetryInfo
from google.rpc.status_pb2 import Status
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from cipherfeed import errors, heap, logs, policy, shutdown
from cipherfeed import tls as mtls
from cipherfeed.config import GrpcLimits, TlsConfig, shutdown_deadline
from cipherfeed.healthport import HealthPort, health_listen

log = logging.getLogger(__name__)

STATUS_FOR: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
)
# A status travels twice in the trailers (grpc-message and grpc-status-details-bin, base64), and
# gRPC's default limit for all metadata a client receives is 8 KiB: stay well inside it.
MAX_MESSAGE_CHARS = 512
MAX_METADATA_ENTRIES = 8
MAX_METADATA_CHARS = 128


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def code_of(exc: errors.CipherfeedError) -> grpc.StatusCode:
    for error_type, code in STATUS_FOR:
        if isinstance(exc, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def rich_status(
    code: grpc.StatusCode,
    reason: str,
    message: str,
    metadata: dict[str, str] | None = None,
    retry_after: float | None = None,
) -> Status:
    """A google.rpc.Status with an ErrorInfo (and a RetryInfo when ``retry_after`` is given), bounded in size."""
    info = ErrorInfo(
        reason=reason,
        domain=errors.DOMAIN,
        metadata={
            _clip(k, MAX_METADATA_CHARS): _clip(v, MAX_METADATA_CHARS)
            for k, v in list((metadata or {}).items())[:MAX_METADATA_ENTRIES]
        },
    )
    status = Status(code=code.value[0], message=_clip(message, MAX_MESSAGE_CHARS))
    status.details.add().Pack(info)
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(max(0.0, retry_after) * 1e9))
        status.details.add().Pack(RetryInfo(retry_delay=delay))
    return status


class RefusalLog:
    """One log line per refused request, rate-limited by a token bucket per reason: a flood of bad
    requests costs a few lines a second, and the next line logged says how many were suppressed."""

    def __init__(self, burst: int = 20, per_second: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.per_second = per_second
        self.clock = clock
        self.counts: collections.Counter[str] = collections.Counter()  # refusals per reason, all of them
        self._buckets: dict[str, tuple[float, float, int]] = {}  # reason -> (tokens, at, suppressed)
        self._lock = threading.Lock()

    def record(self, method: str, code: grpc.StatusCode, reason: str, message: str, peer: str) -> None:
        now = self.clock()
        with self._lock:
            self.counts[reason] += 1
            tokens, at, suppressed = self._buckets.get(reason, (float(self.burst), now, 0))
            tokens = min(float(self.burst), tokens + (now - at) * self.per_second)
            if tokens < 1.0:
                self._buckets[reason] = (tokens, now, suppressed + 1)
                return
            self._buckets[reason] = (tokens - 1.0, now, 0)
        more = f" (+{suppressed} more {reason} since the last line)" if suppressed else ""
        refusal_log.info("refused %s from %s: %s %s: %s%s", method, peer, code.name, reason, message, more)


refusal_log = logging.getLogger("cipherfeed.refused")
refusals = RefusalLog()


Servicer = TypeVar("Servicer")
Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Servicer, Request, grpc.ServicerContext], Response]


def grpc_errors(method: Handler[Servicer, Request, Response]) -> Handler[Servicer, Request, Response]:
    """Servicer decorator: a domain error becomes its status code with a google.rpc.Status that
    carries its ErrorInfo (reason, domain, metadata), its bounded message and, for retryable limits,
    a RetryInfo; the refusal is logged (rate-limited). Anything else is INTERNAL with no details
    (it is logged here instead)."""

    @functools.wraps(method)
    def wrapper(self: Servicer, request: Request, context: grpc.ServicerContext) -> Response:
        try:
            return method(self, request, context)
        except errors.CipherfeedError as exc:
            code = code_of(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.error("untyped domain error in %s: %s", method.__name__, exc)
                status = rich_status(code, errors.Reason.INTERNAL.value, "internal error")
            else:
                status = rich_status(code, exc.reason.value, exc.message, exc.metadata, exc.retry_after)
                refusals.record(method.__name__, code, exc.reason.value, status.message, context.peer())
            context.abort_with_status(rpc_status.to_status(status))
        except Exception:
            log.exception("unexpected error in %s", method.__name__)
            context.abort_with_status(
                rpc_status.to_status(
                    rich_status(grpc.StatusCode.INTERNAL, errors.Reason.INTERNAL.value, "internal error")
                )
            )

    return wrapper


def status_details(error: grpc.RpcError) -> Status | None:
    """The google.rpc.Status a server attached to ``error``, or None (e.g. a transport error)."""
    try:
        return rpc_status.from_call(error)  # type: ignore[arg-type]  # a stub's RpcError is also a Call
    except (AttributeError, ValueError):
        return None


def error_info_of(error: grpc.RpcError) -> ErrorInfo | None:
    status = status_details(error)
    for detail in status.details if status is not None else ():
        info = ErrorInfo()
        if detail.Unpack(info):  # False for details of another type
            return info
    return None


def reason_of(error: grpc.RpcError) -> str | None:
    """The mesh's reason for a failed call (an ``errors.Reason`` value), or None when the status
    carries none of ours (transport errors, deadlines, another domain). Branch on this, never on text."""
    info = error_info_of(error)
    return info.reason if info is not None and info.domain == errors.DOMAIN else None


def known_reason(error: grpc.RpcError, default: errors.Reason) -> errors.Reason:
    """The mesh's reason for ``error`` as an ``errors.Reason`` (to pass an upstream refusal on), else ``default``."""
    try:
        return errors.Reason(reason_of(error) or default)
    except ValueError:  # a reason this build does not know (a newer peer)
        return default


def retry_delay_of(error: grpc.RpcError) -> float | None:
    """Seconds the server asked the client to wait before retrying (google.rpc.RetryInfo), if any."""
    status = status_details(error)
    for detail in status.details if status is not None else ():
        info = RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


class RequestDecodingInterceptor(grpc.ServerInterceptor):
    """Parses unary requests inside the handler, so that bytes that are not the method's message
    are refused as INVALID_ARGUMENT (REQUEST_MALFORMED) like any other bad input. gRPC's own
    deserializer runs before any handler and answers INTERNAL ("Exception deserializing
    request!"); the protocol fuzzer found that on every RPC."""

    def __init__(self) -> None:
        self._wrapped: dict[tuple[str, int], grpc.RpcMethodHandler] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        key = (handler_call_details.method, id(handler))
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrapped[key] = self._wrap(handler_call_details.method, handler)
        return wrapped

    @staticmethod
    def _wrap(method: str, handler: Any) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        behaviour = getattr(handler, kind)

        def decoded(raw: bytes, context: grpc.ServicerContext) -> Any:
            try:
                request = parse(raw)
            except Exception as exc:  # protobuf's DecodeError, or its C++ parser's RuntimeError
                message = f"the request is not a valid {method.rsplit('/', 1)[-1]} message: {type(exc).__name__}"
                reason = errors.Reason.REQUEST_MALFORMED.value
                refusals.record(method, grpc.StatusCode.INVALID_ARGUMENT, reason, message, context.peer())
                status = rich_status(grpc.StatusCode.INVALID_ARGUMENT, reason, message)
                context.abort_with_status(rpc_status.to_status(status))
            return behaviour(request, context)

        return handler._replace(request_deserializer=None, **{kind: decoded})


STOP_SETTLE_SECONDS = 5.0  # after the grace: cancelled calls finish, listeners close


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: Sequence[str]
    health_port: HealthPort | None = None  # plaintext grpc.health.v1 alone, for kubelet probes

    def stop(self, grace: float = 5.0) -> None:
        """NOT_SERVING, then calls in flight get ``grace`` seconds before they are cancelled. The
        wait has a deadline too: a handler that ignores its cancellation keeps its thread, not the
        stop (the process's exit is bounded by ``cipherfeed.shutdown``)."""
        for name in (*self.service_names, ""):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if not self.server.stop(grace).wait(grace + STOP_SETTLE_SECONDS):
            log.warning("the server had not stopped %.0f s after its %.0f s grace", STOP_SETTLE_SECONDS, grace)
        if self.health_port is not None:  # last: probes see NOT_SERVING while the main port drains
            self.health_port.stop()


def start_server(
    register: Callable[[grpc.Server], None],
    service_names: Sequence[str],
    listen: str,
    limits: GrpcLimits,
    workers: int,
    tls: TlsConfig,
    health_port: int | None = None,
) -> RunningServer:
    """Starts a server with the given servicers plus grpc.health.v1 and reflection, over mutual
    TLS with every call checked against ``cipherfeed.policy`` (plaintext and unchecked only with
    ``tls.insecure_dev``, which logs a warning).

    ``listen`` may end in ``:0`` for an ephemeral port; the bound port is returned. With
    ``health_port`` (0: ephemeral) the same health status is also served alone, in plaintext, on
    that port of the same host (``cipherfeed.healthport``: for kubelet's native gRPC probe).
    """
    interceptors: list[grpc.ServerInterceptor] = []
    credentials = None
    if tls.insecure_dev:
        mtls.warn_insecure(f"server {', '.join(service_names)}")
    else:
        credentials = mtls.server_credentials(tls)
        interceptors.append(policy.AuthorizationInterceptor(tls.trust_domain))
    interceptors.append(RequestDecodingInterceptor())  # inside the policy check: callers are known first
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=limits.server_options(),
        interceptors=interceptors,
    )
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(listen) if credentials is None else server.add_secure_port(listen, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    probe_port = None
    if health_port is not None:
        # NOT_SERVING until the main server is up: the status object is shared, so is the answer.
        for name in (*service_names, ""):
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        probe_port = HealthPort.start(health_servicer, health_listen(listen, health_port))
    try:
        server.start()
    except BaseException:
        if probe_port is not None:
            probe_port.stop(grace=0)
        raise
    for name in (*service_names, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(
        server=server, port=port, health=health_servicer, service_names=service_names, health_port=probe_port
    )


def run_service(name: str, start: Callable[[], tuple[RunningServer, Any]]) -> int:
    """A service process's ``main``: start it, say so on stdout once serving (tests and supervisors
    read that line instead of polling), then on SIGINT/SIGTERM drain within a deadline and close
    its core (``cipherfeed.shutdown``: a second signal, or the deadline, ends the process at once).
    Configuration and start-up errors exit with status 2 and a one-line message. A signal during
    start-up ends the process at once (the default action): that is a crash, which every store
    recovers from."""
    from cipherfeed.config import ConfigError

    heap.limit_arenas(1)  # multi-MB key material is handled on many threads (see cipherfeed.heap)
    # `kill -USR1 <pid>` writes every thread's stack to the log (stderr): what a stuck service waits on.
    with contextlib.suppress(ValueError, OSError):  # io.UnsupportedOperation: a stderr with no fd (pytest's)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        logs.configure(name)
        deadline = shutdown_deadline()
        running, core = start()
    except (ConfigError, ValueError, OSError, RuntimeError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    signals = shutdown.SignalWait()  # before the line below: a supervisor may signal right after it
    if running.health_port is not None:
        log.info("%s health (grpc.health.v1 alone, plaintext) on port %d", name, running.health_port.port)
    print(f"{name} listening on port {running.port}", flush=True)
    received = signals.wait()
    signals.close()
    shutdown.begin_bounded_stop(received, deadline)
    running.stop()
    core.close()
    log.info("%s stopped", name)
    return 0


def channel(target: str, limits: GrpcLimits, tls: TlsConfig, server: str) -> grpc.Channel:
    """A channel to the mesh service named ``server`` (``keyservice``, ``ledger``, ...): mutual TLS
    with this identity's certificate, the server's certificate checked for that name; renewed
    certificate files are used from the next call on."""
    if tls.insecure_dev:
        mtls.warn_insecure("client")
        return grpc.insecure_channel(target, options=limits.channel_options())
    return mtls.RenewingChannel(target, limits.channel_options(), tls, server)
