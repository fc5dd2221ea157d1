"""How the SDK reaches the mesh, chosen by the endpoint's URL scheme.

* ``http://`` or ``https://``: through the HTTP gateway (``gateway/``), as a frontend would. Each
  call follows the method's ``google.api.http`` rule, read from the generated descriptors (the
  same rules the gateway and Envoy's transcoder route by): path variables from the request's
  fields, the rest as the body (binary protobuf, ``application/x-protobuf``, by default; proto3
  JSON with ``encoding="json"``) or, for GET, as query parameters.
* anything else (``host:port``, ``grpcs://host:port``): gRPC over mutual TLS
  (``cipherfeed.grpcutil.channel``). ``grpc://host:port`` means plaintext and is refused unless
  ``CIPHERFEED_INSECURE_DEV=1``.

Both are a ``grpc.Channel``: the generated stubs run unchanged on either, so ``RecommenderClient``
never branches per call. Over HTTP a refusal is the gateway's ``google.rpc.Status`` body, raised as
an ``HttpRpcError``, a ``grpc.RpcError`` that carries that status the way gRPC carries it
(``grpc-status-details-bin``): ``grpcutil.reason_of``, ``retry_delay_of`` and ``code()`` read it
alike. The owner's authorization (``OwnerAuth``: an EIP-712 signature over the request or a
session token) is a field of the request, so it crosses the gateway inside the body untouched;
the gateway holds no power of its own over keys.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import re
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, descriptor_pool, json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2 as _error_details  # noqa: F401  # ErrorInfo, RetryInfo: Any types in statuses
from google.rpc.status_pb2 import Status

from cipherfeed.config import ConfigError, GrpcLimits, TlsConfig
from cipherfeed.grpcutil import channel as grpc_channel
from cipherfeed.v1 import keyservice_pb2, ledger_pb2, recommender_pb2

log = logging.getLogger(__name__)
_SERVICES = (keyservice_pb2, ledger_pb2, recommender_pb2)  # imported so their descriptors are in the pool
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
DETAILS_KEY = "grpc-status-details-bin"
MAX_STATUS_MESSAGE = 512

# The gateway's answer without a google.rpc.Status body (a proxy's own error page, say): the
# canonical HTTP mapping read backwards (google/rpc/code.proto).
_CODE_FOR_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)(?:=([^}]*))?\}")


def is_http_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def open_channel(
    target: str, limits: GrpcLimits, tls: TlsConfig, server: str, encoding: str = "binary"
) -> grpc.Channel:
    """The channel to the mesh service ``server`` at ``target``: through the gateway for an
    ``http(s)://`` URL, gRPC otherwise (see the module docstring)."""
    if is_http_url(target):
        return HttpChannel(target, limits, tls, encoding)
    if target.startswith("grpcs://"):
        target = target[len("grpcs://") :]
    elif target.startswith("grpc://"):
        if not tls.insecure_dev:
            raise ConfigError(
                f"{target}: grpc:// is plaintext; the mesh speaks mutual TLS (use host:port or grpcs://), "
                "or set CIPHERFEED_INSECURE_DEV=1 for development"
            )
        target = target[len("grpc://") :]
    elif "://" in target:
        raise ConfigError(f"{target}: unknown scheme (http://, https:// for the gateway; host:port or grpcs://)")
    return grpc_channel(target, limits, tls, server)


class HttpRpcError(grpc.RpcError, grpc.Call):
    """A call the gateway refused, shaped like a failed gRPC call: ``code()``, ``details()``, and
    the google.rpc.Status in the trailing metadata where ``grpc_status`` looks for it."""

    def __init__(self, status: Status, http_status: int) -> None:
        super().__init__(status.message)
        self.status = status
        self.http_status = http_status

    def code(self) -> grpc.StatusCode:
        return _CODES.get(self.status.code, grpc.StatusCode.UNKNOWN)

    def details(self) -> str:
        return str(self.status.message)

    def initial_metadata(self) -> Any:
        return ()

    def trailing_metadata(self) -> Any:
        return ((DETAILS_KEY, self.status.SerializeToString()),)

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> Any:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    def __str__(self) -> str:
        return f"<HttpRpcError {self.code().name} (HTTP {self.http_status}): {self.details()}>"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _status(code: grpc.StatusCode, message: str) -> Status:
    return Status(code=code.value[0], message=message[:MAX_STATUS_MESSAGE])


def _field_value(message: Message, path: str) -> Any:
    value: Any = message
    for name in path.split("."):
        value = getattr(value, name)
    return value


def _clear_field(message: Message, path: str) -> None:
    *parents, last = path.split(".")
    target = message
    for name in parents:
        if not target.HasField(name):
            return
        target = getattr(target, name)
    target.ClearField(last)


def _take_session_token(message: Message) -> str | None:
    """Removes and returns ``auth.session_token`` from a request that has one."""
    fields = message.DESCRIPTOR.fields_by_name
    if "auth" not in fields or not message.HasField("auth"):
        return None
    auth = message.auth  # type: ignore[attr-defined]
    if auth.WhichOneof("proof") != "session_token":
        return None
    token = str(auth.session_token)
    message.ClearField("auth")
    return token


def _scalar_text(field: descriptor.FieldDescriptor, value: Any) -> str:
    if field.type == descriptor.FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    if field.type == descriptor.FieldDescriptor.TYPE_BOOL:
        return "true" if value else "false"
    if field.type == descriptor.FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        return str(field.enum_type.values_by_number[value].name)
    return repr(value) if isinstance(value, float) else str(value)


def query_parameters(message: Message, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Every set field as ``name=value`` (nested messages as ``a.b``, repeated fields repeated),
    proto field names: how the HTTP rule binds fields no path variable or body takes."""
    for field, value in message.ListFields():
        name = prefix + field.name
        if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                raise ValueError(f"{name}: a repeated message cannot be a query parameter")
            yield from query_parameters(value, name + ".")
        elif field.is_repeated:
            for element in value:
                yield name, _scalar_text(field, element)
        else:
            yield name, _scalar_text(field, value)


class HttpRoute:
    """One method's ``google.api.http`` rule, turned into requests and answers."""

    def __init__(self, method: descriptor.MethodDescriptor) -> None:
        rule = http_pb2.HttpRule()
        options = method.GetOptions()
        extension: Any = annotations_pb2.http
        if not options.HasExtension(extension):
            raise ValueError(f"{method.full_name} has no HTTP mapping: not reachable through the gateway")
        rule.CopyFrom(options.Extensions[extension])
        pattern = rule.WhichOneof("pattern")
        if pattern is None or pattern == "custom":
            raise ValueError(f"{method.full_name}: unsupported HTTP rule {rule}")
        self.verb = pattern.upper()
        self.template = str(getattr(rule, pattern))
        self.body = str(rule.body)
        if self.body not in ("", "*"):
            raise ValueError(f"{method.full_name}: body {self.body!r} is not supported (only '*' or none)")
        self.variables = [m.group(1) for m in _VARIABLE.finditer(self.template)]
        self.output = method.output_type

    def path(self, request: Message) -> str:
        def expand(match: re.Match[str]) -> str:
            value = _field_value(request, match.group(1))
            text = str(value)
            if not text:
                raise ValueError(f"{match.group(1)} is empty: the path needs it")
            return urllib.parse.quote(text, safe="")

        return _VARIABLE.sub(expand, self.template)

    def unbound(self, request: Message) -> Message:
        """The request without the fields its path carries (sent once, in the path)."""
        rest = type(request)()
        rest.CopyFrom(request)
        for name in self.variables:
            _clear_field(rest, name)
        return rest


class _UnaryUnary(grpc.UnaryUnaryMultiCallable):
    def __init__(self, channel: HttpChannel, method: str, deserializer: Callable[[bytes], Any] | None) -> None:
        self._channel = channel
        self._method = method
        self._deserialize = deserializer

    def __call__(
        self,
        request: Message,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        return self._channel.call(self._method, request, timeout, metadata, self._deserialize)

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("with_call is not supported over HTTP")

    def future(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("futures are not supported over HTTP")


class HttpChannel(grpc.Channel):
    """A ``grpc.Channel`` whose unary calls go through the HTTP gateway at ``base_url``."""

    def __init__(self, base_url: str, limits: GrpcLimits, tls: TlsConfig, encoding: str = "binary") -> None:
        if encoding not in ("binary", "json"):
            raise ValueError(f"encoding {encoding!r}: binary or json")
        self.base_url = base_url.rstrip("/")
        self.encoding = encoding
        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        if self.base_url.startswith("http://") and not _is_loopback(host):
            log.warning("gateway %s is plain HTTP: owner proofs and session tokens cross the network in clear", host)
        self._max_bytes = limits.max_message_bytes
        verify: ssl.SSLContext | bool = True
        if self.base_url.startswith("https://") and tls.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(tls.ca_file))  # a private CA the operator gave
        self._http = httpx.Client(base_url=self.base_url, verify=verify, trust_env=False, follow_redirects=False)
        self._routes: dict[str, HttpRoute] = {}
        self._lock = threading.Lock()
        self._watchers: dict[Callable[[grpc.ChannelConnectivity], None], threading.Event] = {}

    def _route(self, method: str) -> HttpRoute:
        with self._lock:
            route = self._routes.get(method)
            if route is None:
                service, _, name = method.strip("/").partition("/")
                found = descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]
                route = self._routes[method] = HttpRoute(found)
            return route

    def _encode(self, route: HttpRoute, request: Message) -> tuple[str, dict[str, str], list[tuple[str, Any]], bytes]:
        path = route.path(request)
        rest = route.unbound(request)
        accept = PROTOBUF if self.encoding == "binary" else JSON
        headers = {"accept": accept}
        if route.body == "*":
            headers["content-type"] = accept
            if self.encoding == "binary":
                return path, headers, [], rest.SerializeToString(deterministic=True)
            return path, headers, [], json_format.MessageToJson(rest, indent=None).encode()
        token = _take_session_token(rest)
        if token is not None:  # a bearer token never goes into a URL (proxies and servers log URLs)
            headers["authorization"] = f"Bearer {token}"
        return path, headers, list(query_parameters(rest)), b""

    def call(
        self,
        method: str,
        request: Message,
        timeout: float | None,
        metadata: Any,
        deserialize: Callable[[bytes], Any] | None,
    ) -> Any:
        route = self._route(method)
        try:
            path, headers, params, body = self._encode(route, request)
        except ValueError as exc:
            raise HttpRpcError(_status(grpc.StatusCode.INVALID_ARGUMENT, str(exc)), 0) from None
        if timeout is not None:  # the gateway's upstream deadline (gRPC's format; Envoy forwards it as is)
            headers["grpc-timeout"] = f"{max(1, min(int(timeout * 1000), 99_999_999))}m"
        for key, value in metadata or ():
            headers[str(key)] = value if isinstance(value, str) else base64.b64encode(value).decode()
        try:
            with self._http.stream(
                route.verb, path, params=params, content=body or None, headers=headers, timeout=timeout
            ) as reply:
                content = self._read(reply)
        except httpx.TimeoutException as exc:
            raise HttpRpcError(_status(grpc.StatusCode.DEADLINE_EXCEEDED, f"gateway: {exc}"), 0) from None
        except httpx.TransportError as exc:
            raise HttpRpcError(_status(grpc.StatusCode.UNAVAILABLE, f"gateway unreachable: {exc}"), 0) from None
        kind = reply.headers.get("content-type", "").split(";")[0].strip().lower()
        if reply.status_code != 200:
            raise HttpRpcError(self._error_status(reply.status_code, kind, content), reply.status_code)
        try:
            if kind == PROTOBUF:
                data = content
            elif kind == JSON:
                parsed = json_format.Parse(content, _message_class(route.output)(), ignore_unknown_fields=True)
                data = parsed.SerializeToString()
            else:
                raise ValueError(f"unexpected content type {kind or 'none'}")
            return deserialize(data) if deserialize is not None else data
        # RecursionError: a hostile reply nested deeper than the interpreter's limit
        except (ValueError, DecodeError, json_format.ParseError, RecursionError) as exc:
            raise HttpRpcError(_status(grpc.StatusCode.INTERNAL, f"gateway answer not decodable: {exc}"), 200) from None

    def _read(self, reply: httpx.Response) -> bytes:
        """The body, refused past the message limit (a hostile or broken gateway cannot make the
        client buffer without bound)."""
        declared = reply.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_bytes:
            raise HttpRpcError(_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "answer larger than the limit"), 0)
        chunks, size = [], 0
        for chunk in reply.iter_bytes():
            size += len(chunk)
            if size > self._max_bytes:
                raise HttpRpcError(_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "answer larger than the limit"), 0)
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _error_status(http_status: int, kind: str, content: bytes) -> Status:
        fallback = _CODE_FOR_HTTP.get(http_status, grpc.StatusCode.UNKNOWN)
        status = Status()
        try:
            if kind == PROTOBUF:
                status.ParseFromString(content)
            elif kind == JSON:
                json_format.Parse(content, status, ignore_unknown_fields=True)
            else:
                raise ValueError(kind)
        except (ValueError, DecodeError, json_format.ParseError, RecursionError):
            return _status(fallback, f"HTTP {http_status}: {content[:200].decode(errors='replace')}")
        if status.code == 0:  # a refusal that claims OK is not one
            status.code = fallback.value[0]
        return status

    # grpc.Channel
    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool = False,
    ) -> grpc.UnaryUnaryMultiCallable:
        return _UnaryUnary(self, method, response_deserializer)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{method}: streaming calls do not go through the HTTP gateway")

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{method}: streaming calls do not go through the HTTP gateway")

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{method}: streaming calls do not go through the HTTP gateway")

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False) -> None:
        """Connectivity for ``grpc.channel_ready_future``: READY once the gateway's ``/readyz``
        answers 200 (its upstreams serve), retried with backoff until unsubscribed."""
        stop = threading.Event()
        with self._lock:
            self._watchers[callback] = stop

        def watch() -> None:
            delay = 0.05
            while not stop.is_set():
                try:
                    ok = self._http.get("/readyz", timeout=5).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    callback(grpc.ChannelConnectivity.READY)
                    return
                callback(grpc.ChannelConnectivity.TRANSIENT_FAILURE)
                stop.wait(delay)
                delay = min(1.0, delay * 2)

        threading.Thread(target=watch, name="gateway-ready", daemon=True).start()

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        with self._lock:
            stop = self._watchers.pop(callback, None)
        if stop is not None:
            stop.set()

    def close(self) -> None:
        with self._lock:
            for stop in self._watchers.values():
                stop.set()
            self._watchers.clear()
        self._http.close()


def _message_class(message: descriptor.Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(message)
