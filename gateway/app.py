"""The gateway as an ASGI application: the API routes from the protos, health, readiness,
metrics, the OpenAPI document and the transparency explorer's static files."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from urllib.parse import parse_qsl

import grpc
from google.rpc import status_pb2
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route, request_response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cipherfeed import errors
from cipherfeed.config import GatewayConfig
from cipherfeed.grpcutil import rich_status
from cipherfeed.ownerauth import MAX_SESSION_TOKEN_CHARS
from gateway import openapi, transcode
from gateway.metrics import UNMATCHED, GatewayMetrics
from gateway.routes import Match, RouteTable, build_routes
from gateway.routes import Route as ApiRoute
from gateway.status import GatewayError, from_rpc_error, http_status, retry_after_seconds
from gateway.upstream import Upstreams

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
OPENAPI_PATH = "/openapi.json"
MAX_READY_WAIT = 60.0  # seconds /readyz?wait= may hold a request
API_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
# The explorer's pages: its meta CSP as a header (a meta tag cannot set frame-ancestors), framing
# refused, nothing sniffed, no referrer, its own browsing context and resources.
EXPLORER_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src *; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": EXPLORER_CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_TIMEOUT = re.compile(r"^([0-9]{1,8})([HMSmun])$")  # gRPC's grpc-timeout format, as Envoy passes it on
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~+/=")


def _bearer(header: str | None) -> str | None:
    """The session token of ``Authorization: Bearer <token>`` (401 for any other form)."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_SESSION_TOKEN_CHARS or set(token) - _TOKEN_CHARS:
        raise GatewayError(
            grpc.StatusCode.UNAUTHENTICATED,
            errors.Reason.OWNER_AUTH_INVALID,
            "Authorization must be 'Bearer <session token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return token


def _deadline(header: str | None, configured: float) -> float:
    """The upstream deadline: the configured one, or a shorter ``grpc-timeout`` the client sent."""
    if header is None:
        return configured
    m = _TIMEOUT.match(header.strip())
    if m is None:
        raise transcode.invalid("grpc-timeout must be 1-8 digits and a unit (H, M, S, m, u, n)", "grpc-timeout")
    return min(configured, int(m.group(1)) * _TIMEOUT_UNITS[m.group(2)])


class Gateway:
    """Request handling, independent of the ASGI wiring (``create_app``)."""

    def __init__(self, config: GatewayConfig, routes: Sequence[ApiRoute] | None = None) -> None:
        self.config = config
        self.table = RouteTable(routes if routes is not None else build_routes())
        self.metrics = GatewayMetrics()
        self.upstreams = Upstreams.from_config(config)
        self.openapi = openapi.document(self.table.routes)
        # (one event loop: no lock needed) requests still sending their bodies, and those whose
        # body arrived: a slow body holds a receiving slot, never one of the upstream's
        self._receiving = 0
        self._in_flight = 0

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise transcode.invalid("Content-Length is not a number", "content-length")
            if int(declared) > limit:  # refused before a byte of the body is read
                raise self._too_large(int(declared))
        chunks: list[bytes] = []
        size = 0

        stream = request.stream().__aiter__()
        idle = self.config.body_idle_seconds

        async def read() -> None:
            nonlocal size
            while True:
                # each piece within body_idle_seconds of the last (a minimum rate: one byte now
                # and then cannot hold a slot for the whole body timeout)
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), idle)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise self._body_late(
                        f"no part of the rest of the request body arrived within {idle:g} s"
                    ) from None
                size += len(chunk)
                if size > limit:
                    raise self._too_large(size)
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.config.body_timeout_seconds)
        except asyncio.TimeoutError:
            raise self._body_late(
                f"the request body did not arrive within {self.config.body_timeout_seconds:g} s"
            ) from None
        return b"".join(chunks)

    @staticmethod
    def _body_late(message: str) -> GatewayError:
        return GatewayError(
            grpc.StatusCode.DEADLINE_EXCEEDED, errors.Reason.FIELD_INVALID, message, {"field": "body"}, http=408
        )

    @staticmethod
    def _overloaded(limit: int, what: str) -> GatewayError:
        """At a concurrency limit: 503 with a Status and Retry-After (a RetryInfo)."""
        message = f"the gateway is {what} {limit} requests; retry shortly"
        error = GatewayError(grpc.StatusCode.UNAVAILABLE, errors.Reason.RETRY, message)
        error.status = rich_status(
            grpc.StatusCode.UNAVAILABLE, errors.Reason.RETRY.value, message, {"limit": str(limit)}, retry_after=1.0
        )
        return error

    def _too_large(self, size: int) -> GatewayError:
        limit = self.config.max_body_bytes
        return GatewayError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            errors.Reason.SIZE_LIMIT,
            f"the request body is {'over ' if size > limit else ''}{size} bytes; the limit is {limit}",
            {"field": "body", "limit": str(limit)},
            http=413,
        )

    def _match(self, request: Request) -> Match:
        raw = request.scope.get("raw_path") or request.scope["path"].encode()
        path = raw.decode("latin-1").split("?", 1)[0]
        found = self.table.find(request.method, path)
        if isinstance(found, Match):
            return found
        if found:
            raise GatewayError(
                grpc.StatusCode.UNIMPLEMENTED,
                errors.Reason.ROUTE_NOT_FOUND,
                f"{request.method} is not allowed here; use {', '.join(found)}",
                http=405,
                headers={"Allow": ", ".join(found)},
            )
        raise GatewayError(grpc.StatusCode.NOT_FOUND, errors.Reason.ROUTE_NOT_FOUND, "no such route")

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        label, grpc_code, request_bytes = UNMATCHED, "", 0
        binary = False
        try:
            try:
                match = self._match(request)
                label = match.route.name
                content_type = request.headers.get("content-type")
                request_binary = transcode.is_binary_request(content_type)
                binary = transcode.wants_binary(request.headers.get("accept"), bool(request_binary))
                if request_binary is None or (content_type is None and _has_body(request)):
                    # an unlabelled body is refused too: read as JSON it let a cross-origin
                    # no-cors fetch (a "simple" request, no preflight) reach the API
                    raise GatewayError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        errors.Reason.FIELD_INVALID,
                        f"Content-Type must be {transcode.JSON} or {transcode.PROTOBUF}",
                        {"field": "content-type"},
                        http=415,
                    )
                body = await self._receive(request)
                request_bytes = len(body)
                try:
                    query = parse_qsl(
                        request.scope.get("query_string", b"").decode("latin-1"),
                        keep_blank_values=True,
                        encoding="utf-8",
                        errors="strict",
                        max_num_fields=transcode.MAX_QUERY_FIELDS,
                    )
                except (ValueError, UnicodeDecodeError):
                    raise transcode.invalid("the query string is malformed or too long", "query") from None
                bearer = _bearer(request.headers.get("authorization")) if match.route.has_owner_auth else None
                message = transcode.build_request(match, query, body, request_binary, bearer)
                deadline = _deadline(request.headers.get("grpc-timeout"), self.config.deadline_seconds)
                if self._in_flight >= self.config.max_concurrency:
                    raise self._overloaded(self.config.max_concurrency, "handling")
                self._in_flight += 1
                self.metrics.in_flight.inc()
                try:
                    response = await self._call(match.route, message.SerializeToString(), binary, deadline)
                finally:
                    self._in_flight -= 1
                    self.metrics.in_flight.dec()
                grpc_code = "OK"
            except GatewayError as exc:
                grpc_code = grpc.StatusCode.UNKNOWN.name
                for code in grpc.StatusCode:
                    if code.value[0] == exc.status.code:
                        grpc_code = code.name
                response = self._status_response(exc.status, binary, exc.http, exc.headers)
            except _UpstreamFailure as failure:
                grpc_code = failure.code
                response = failure.response
            except UnicodeDecodeError:  # a path variable that is not UTF-8 once percent-decoded
                grpc_code = grpc.StatusCode.INVALID_ARGUMENT.name
                status = transcode.invalid("the path is not UTF-8 once percent-decoded", "path").status
                response = self._status_response(status, binary, 400, {})
            except ClientDisconnect:  # the client went away mid-body: its choice, not our error
                grpc_code = grpc.StatusCode.CANCELLED.name
                gone = "the client closed the connection before its body arrived"
                status = rich_status(
                    grpc.StatusCode.CANCELLED, errors.Reason.FIELD_INVALID.value, gone, {"field": "body"}
                )
                response = self._status_response(status, binary, 499, {})
        except Exception:  # a bug here must not take the gateway down or leak its details
            log.exception("unexpected error handling %s", label)
            grpc_code = grpc.StatusCode.INTERNAL.name
            status = rich_status(grpc.StatusCode.INTERNAL, errors.Reason.INTERNAL.value, "internal error")
            response = self._status_response(status, binary, 500, {})
        self.metrics.observe(
            label,
            response.status_code,
            grpc_code,
            time.perf_counter() - started,
            request_bytes,
            len(response.body),
        )
        return response

    async def _receive(self, request: Request) -> bytes:
        """The body, read in a receiving slot of its own (503 when all are taken)."""
        if not _has_body(request):
            return b""
        if self._receiving >= self.config.max_receiving:
            raise self._overloaded(self.config.max_receiving, "receiving the bodies of")
        self._receiving += 1
        self.metrics.receiving.inc()
        try:
            return await self._read_body(request)
        finally:
            self._receiving -= 1
            self.metrics.receiving.dec()

    async def _call(self, route: ApiRoute, payload: bytes, binary: bool, deadline: float) -> Response:
        upstream = self.upstreams[route.upstream]
        started = time.perf_counter()
        try:
            raw = await upstream.call(route.grpc_path, payload, deadline)
        except grpc.aio.AioRpcError as exc:
            status = from_rpc_error(exc, route.upstream)
            raise _UpstreamFailure(exc.code().name, self._status_response(status, binary, None, {})) from None
        finally:
            self.metrics.upstream_latency.labels(route.name).observe(time.perf_counter() - started)
        media = transcode.PROTOBUF if binary else transcode.JSON
        return Response(transcode.encode_response(route, raw, binary), 200, API_HEADERS, media)

    def _status_response(
        self, status: status_pb2.Status, binary: bool, http: int | None, headers: dict[str, str]
    ) -> Response:
        code = http if http is not None else http_status(status)
        extra = dict(headers)
        retry = retry_after_seconds(status)
        if retry is not None:
            extra["Retry-After"] = str(retry)
        if code == 401:
            extra.setdefault("WWW-Authenticate", "Bearer")
        media = transcode.PROTOBUF if binary else transcode.JSON
        return Response(transcode.encode_status(status, binary), code, {**API_HEADERS, **extra}, media)

    async def ready(self, wait: float = 0.0) -> tuple[bool, dict[str, str]]:
        """Every upstream's health; with ``wait`` > 0, unreachable upstreams are waited for up to
        that long (a caller that wants to block until the mesh is back, instead of polling)."""
        if wait > 0:
            return self._summary(await self.upstreams.health(wait, wait=True))
        return self._summary(await self.upstreams.health(self.config.readiness_timeout_seconds))

    @staticmethod
    def _summary(states: dict[str, str]) -> tuple[bool, dict[str, str]]:
        return all(s == "SERVING" for s in states.values()), states


class _AllowedHosts:
    """Requests whose Host is not listed get 421 with a Status: behind a shared ingress, a Host
    header is what redirects (``/explorer`` → ``/explorer/``) and absolute links are built from."""

    def __init__(self, app: ASGIApp, hosts: Sequence[str]) -> None:
        self.app = app
        self.hosts = frozenset(h.lower() for h in hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            if host not in self.hosts and host.rsplit(":", 1)[0] not in self.hosts:
                message = "this Host is not served here"
                status = rich_status(
                    grpc.StatusCode.INVALID_ARGUMENT, errors.Reason.FIELD_INVALID.value, message, {"field": "host"}
                )
                body = transcode.encode_status(status, False)
                await Response(body, 421, API_HEADERS, transcode.JSON)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _with_headers(app: ASGIApp, headers: dict[str, str]) -> ASGIApp:
    """``app`` with ``headers`` added to every response it starts (StaticFiles sets none)."""
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *raw]}
            await send(message)

        await app(scope, receive, send_with_headers)

    return wrapped


def _has_body(request: Request) -> bool:
    declared = request.headers.get("content-length")
    return "transfer-encoding" in request.headers or (declared is not None and declared.strip() not in ("", "0"))


class _UpstreamFailure(Exception):
    def __init__(self, code: str, response: Response) -> None:
        super().__init__(code)
        self.code = code
        self.response = response


def create_app(config: GatewayConfig, routes: Sequence[ApiRoute] | None = None) -> Starlette:
    gateway = Gateway(config, routes)

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"}, headers=API_HEADERS)

    async def readyz(request: Request) -> Response:
        raw = request.query_params.get("wait", "0")
        try:
            wait = min(MAX_READY_WAIT, max(0.0, float(raw)))
        except ValueError:
            wait = 0.0
        ready, states = await gateway.ready(wait if wait == wait else 0.0)
        body = {"status": "ready" if ready else "unavailable", "upstreams": states}
        return JSONResponse(body, status_code=200 if ready else 503, headers=API_HEADERS)

    async def metrics(_: Request) -> Response:
        return Response(gateway.metrics.exposition(), headers=API_HEADERS, media_type=CONTENT_TYPE_LATEST)

    async def openapi_json(_: Request) -> Response:
        return JSONResponse(gateway.openapi, headers=API_HEADERS)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await gateway.upstreams.close()

    table: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route(OPENAPI_PATH, openapi_json, methods=["GET"]),
        Mount(
            "/explorer",
            app=_with_headers(StaticFiles(directory=STATIC_DIR / "explorer", html=True, check_dir=False), PAGE_HEADERS),
        ),
    ]
    middleware = []
    if config.allowed_hosts:  # a Host outside the list: 421 (it would name the redirects' target)
        middleware.append(Middleware(_AllowedHosts, hosts=config.allowed_hosts))
    if config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", "Accept"],
                expose_headers=["Retry-After", "WWW-Authenticate"],
                allow_credentials=False,  # tokens travel in Authorization, never in cookies
                max_age=600,
            )
        )
    app = Starlette(routes=table, middleware=middleware, lifespan=lifespan)
    # Everything else is the API's: the router's default, so that every path and method (a path
    # with an encoded newline included) is answered by the gateway, never by Starlette's text 404.
    app.router.default = request_response(gateway.handle)
    app.state.gateway = gateway
    return app
