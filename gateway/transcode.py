"""HTTP requests to protobuf requests and protobuf responses to HTTP bodies.

JSON is proto3 JSON exactly as ``google.protobuf.json_format`` reads and prints it by default:
lowerCamelCase names on output, both name forms on input, 64-bit integers as strings, bytes as
base64, unknown fields refused. ``application/x-protobuf`` bodies are the binary encoding, for
ciphertexts without the base64 third. Path variables win over the body; GET routes fill the other
fields from the query string (``?afterSeq=5&auth.sessionToken=...``; repeated fields repeat).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

from cipherfeed import errors
from gateway.routes import Descriptor, Match, Route
from gateway.status import GatewayError, invalid

JSON = "application/json"
PROTOBUF = "application/x-protobuf"
BINARY_TYPES = frozenset({PROTOBUF, "application/protobuf", "application/vnd.google.protobuf"})
JSON_TYPES = frozenset({JSON})
MAX_QUERY_FIELDS = 256
# json.loads builds every object, array and value of a body before json_format can refuse it: an
# 8 MiB body of "{}," cost 209 MiB. Objects, arrays and separators ({ [ , :) are counted first,
# in C (bytes.count), and a body with more than this is refused unparsed. Counting them inside
# strings too only errs toward refusing; the big fields of real requests (ciphertexts, keys) are
# base64, which has none of these characters. So a JSON body's parse costs a few times its size
# plus at most this many containers and values (about 0.3 KB each: ~20 MiB).
MAX_JSON_TOKENS = 65_536
_ = error_details_pb2  # ErrorInfo and RetryInfo in the default pool: details print with their @type


def media_type(header: str | None) -> str | None:
    if not header:
        return None
    return header.split(";", 1)[0].strip().lower() or None


def is_binary_request(content_type: str | None) -> bool | None:
    """True for a protobuf body, False for JSON (or no Content-Type: the caller refuses a body
    without one), None for anything else."""
    kind = media_type(content_type)
    if kind is None or kind in JSON_TYPES:
        return False
    if kind in BINARY_TYPES:
        return True
    return None


def _accept_quality(accept: str) -> tuple[float, float]:
    """(q for protobuf, q for JSON) from an Accept header; explicit types override wildcards."""
    binary: float | None = None
    json_q: float | None = None
    wildcard = 0.0
    for part in accept.split(","):
        kind, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(1.0, max(0.0, float(value)))
                except ValueError:
                    q = 0.0
        kind = kind.lower()
        if kind in BINARY_TYPES:
            binary = max(binary or 0.0, q)
        elif kind in JSON_TYPES:
            json_q = max(json_q or 0.0, q)
        elif kind in ("*/*", "application/*"):
            wildcard = max(wildcard, q)
    return (wildcard if binary is None else binary), (wildcard if json_q is None else json_q)


def wants_binary(accept: str | None, request_binary: bool) -> bool:
    """The response format: what Accept prefers; with no preference, the request's own format."""
    if not accept:
        return request_binary
    binary, json_q = _accept_quality(accept)
    if binary == json_q:
        return request_binary
    return binary > json_q


# --- requests -------------------------------------------------------------------------------


def _field_by_either_name(message: Descriptor, name: str) -> Any:
    found = message.fields_by_name.get(name)
    if found is not None:
        return found
    for f in message.fields:
        if f.json_name == name:
            return f
    return None


def _scalar(f: Any, text: str) -> Any:
    """A query or path string as the JSON value json_format expects for this field."""
    if f.type == FieldDescriptor.TYPE_BOOL:
        lowered = text.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise invalid(f"{f.name}: {text[:32]!r} is not a boolean", f.name)
    if f.type == FieldDescriptor.TYPE_ENUM and text.lstrip("-").isdigit():
        return int(text)
    return text


def query_fields(route: Route, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The query string as a proto3 JSON object for ``route``'s request (400 for unknown names,
    path-bound fields, message fields, or a singular field given twice)."""
    if route.body == "*" and pairs:
        raise invalid("this route takes every field in its body, none in the query string", pairs[0][0])
    if len(pairs) > MAX_QUERY_FIELDS:
        raise invalid(f"at most {MAX_QUERY_FIELDS} query parameters", "query")
    out: dict[str, Any] = {}
    for name, value in pairs:
        parts = name.split(".")
        descriptor: Descriptor = route.request_type.DESCRIPTOR
        node = out
        proto_path: list[str] = []
        for i, part in enumerate(parts):
            f = _field_by_either_name(descriptor, part) if descriptor is not None else None
            if f is None:
                raise invalid(f"unknown query parameter {name[:64]!r}", name[:64])
            proto_path.append(f.name)
            last = i == len(parts) - 1
            if last:
                if f.message_type is not None:
                    raise invalid(f"{name[:64]!r} names a message, not a value", name[:64])
                if tuple(proto_path) in route.path_fields or (route.body and proto_path[0] == route.body):
                    raise invalid(f"{name[:64]!r} is bound by the path or body", name[:64])
                if f.is_repeated:
                    existing = node.setdefault(f.name, [])
                    if not isinstance(existing, list):
                        raise invalid(f"{name[:64]!r} given in two forms", name[:64])
                    existing.append(_scalar(f, value))
                elif f.name in node:
                    raise invalid(f"{name[:64]!r} given twice", name[:64])
                else:
                    node[f.name] = _scalar(f, value)
            else:
                if f.message_type is None or f.is_repeated:
                    raise invalid(f"{name[:64]!r}: {part!r} is not a singular message", name[:64])
                child = node.setdefault(f.name, {})
                if not isinstance(child, dict):
                    raise invalid(f"{name[:64]!r} given in two forms", name[:64])
                node = child
                descriptor = f.message_type
    return out


def path_fields(match: Match) -> dict[str, Any]:
    out: dict[str, Any] = {}
    descriptor: Descriptor = match.route.request_type.DESCRIPTOR
    for field_path, value in match.variables.items():
        node: dict[str, Any] = out
        d: Descriptor = descriptor
        for name in field_path[:-1]:
            node = node.setdefault(name, {})
            d = d.fields_by_name[name].message_type
        f = d.fields_by_name[field_path[-1]]
        node[f.name] = _scalar(f, value)
    return out


def _parse_dict(values: dict[str, Any], message: Message, what: str) -> None:
    try:
        json_format.ParseDict(values, message)
    except json_format.ParseError as exc:
        raise invalid(f"{what}: {str(exc)[:200]}", what) from None


def build_request(
    match: Match,
    query: Sequence[tuple[str, str]],
    body: bytes,
    binary: bool,
    bearer: str | None,
) -> Message:
    """The protobuf request for a matched route: body, then query, then path variables (which win),
    then the owner's session token from ``Authorization: Bearer``."""
    route = match.route
    request = route.request_type()
    if body and not route.body:
        raise invalid("this route takes no request body", "body")
    if body:
        target = request if route.body == "*" else getattr(request, route.body)
        if binary:
            try:
                target.ParseFromString(body)
            except (DecodeError, RecursionError):
                raise invalid("the body is not a valid binary protobuf of the request", "body") from None
        else:
            if body.lstrip(b" \t\r\n")[:1] != b"{":  # json_format would take [] as an empty message
                raise invalid("the JSON body must be an object", "body")
            tokens = sum(body.count(c) for c in (b"{", b"[", b",", b":"))
            if tokens > MAX_JSON_TOKENS:
                raise GatewayError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    errors.Reason.SIZE_LIMIT,
                    f"the JSON body has {tokens} objects, arrays and separators; the limit is {MAX_JSON_TOKENS}"
                    " (send large requests as application/x-protobuf)",
                    {"field": "body", "limit": str(MAX_JSON_TOKENS)},
                    http=413,
                )
            try:
                json_format.Parse(body.decode("utf-8"), target)
            except UnicodeDecodeError:
                raise invalid("the JSON body is not UTF-8", "body") from None
            except (json_format.ParseError, RecursionError, ValueError) as exc:
                raise invalid(f"the JSON body is not a valid request: {str(exc)[:200]}", "body") from None
    if query:
        _parse_dict(query_fields(route, query), request, "query")
    if match.variables:
        _parse_dict(path_fields(match), request, "path")
    if bearer is not None and route.has_owner_auth:
        auth = request.auth  # type: ignore[attr-defined]
        if request.HasField("auth") and auth.session_token != bearer:
            raise invalid("both an Authorization header and another auth in the request", "auth")
        auth.session_token = bearer
    return request


# --- responses ------------------------------------------------------------------------------


def json_bytes(message: Message) -> bytes:
    return json.dumps(json_format.MessageToDict(message), ensure_ascii=False, separators=(",", ":")).encode()


def encode_response(route: Route, raw: bytes, binary: bool) -> bytes:
    """The upstream's serialized answer as the client asked: passed through for protobuf,
    printed as proto3 JSON otherwise."""
    if binary:
        return raw
    return json_bytes(route.response_type.FromString(raw))


def encode_status(status: status_pb2.Status, binary: bool) -> bytes:
    if binary:
        return status.SerializeToString()
    try:
        return json_bytes(status)
    except (TypeError, KeyError, json_format.SerializeToJsonError):  # a detail type we cannot print
        bare = status_pb2.Status(code=status.code, message=status.message)
        return json_bytes(bare)
