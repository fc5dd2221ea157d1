"""The route table, read from the ``google.api.http`` options of the generated descriptors.

One source of truth: a method gets an HTTP route exactly when its proto says so and the mesh's
policy lets the ``gateway`` identity call it (internal RPCs such as ``Ledger.Append`` or
``KeyService.Sign`` are never exposed, whatever their annotations say).

Path templates follow google/api/http.proto::

    Template = "/" Segments [ Verb ] ;  Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;  Variable = "{" FieldPath [ "=" Segments ] "}" ;
    Verb     = ":" LITERAL ;

Matching is done on the raw (still percent-encoded) path, so an encoded ``/`` inside a variable
never splits it; captured values are percent-decoded once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any
from urllib.parse import unquote

from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from cipherfeed import policy

# protobuf's stubs type a descriptor as the union of its pure-Python and upb classes
Descriptor = Any

HTTP_METHODS = ("get", "put", "post", "delete", "patch")
_LITERAL = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=@-]+$")  # RFC 3986 pchar less ':' and '%'
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TemplateError(ValueError):
    """A ``google.api.http`` path template outside the grammar (a proto bug: fails at start)."""


@dataclass(frozen=True)
class Variable:
    field_path: tuple[str, ...]  # proto field names from the request message down
    pattern: str  # regex of the segments it captures


@dataclass(frozen=True)
class PathTemplate:
    text: str
    regex: re.Pattern[str]
    variables: tuple[Variable, ...]
    verb: str | None

    @property
    def openapi_path(self) -> str:
        """The template with every variable as ``{dotted.name}`` (OpenAPI's templating)."""
        return _VARIABLE.sub(lambda m: "{" + m.group(1) + "}", self.text)

    def match(self, raw_path: str) -> dict[tuple[str, ...], str] | None:
        """Field path -> decoded value for each variable, or None if the path does not match."""
        m = self.regex.fullmatch(raw_path)
        if m is None:
            return None
        return {v.field_path: unquote(m.group(f"v{i}"), errors="strict") for i, v in enumerate(self.variables)}


_VARIABLE = re.compile(r"\{([^}=]+)(?:=[^}]*)?\}")


def _segments_regex(segments: str, in_variable: bool) -> str:
    parts = []
    for segment in segments.split("/"):
        if segment == "*":
            parts.append("[^/]+")
        elif segment == "**":
            parts.append(".+")
        elif segment and _LITERAL.match(segment):
            parts.append(re.escape(segment))
        else:
            raise TemplateError(f"bad segment {segment!r}" + (" in a variable" if in_variable else ""))
    return "/".join(parts)


def _split_segments(body: str) -> list[str]:
    """Segments of ``/a/{b=c/*}/d``: a '/' inside a variable does not split."""
    segments: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in body[1:]:
        depth += (ch == "{") - (ch == "}")
        if depth not in (0, 1):
            raise TemplateError(f"{body!r}: unbalanced braces")
        if ch == "/" and depth == 0:
            segments.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise TemplateError(f"{body!r}: unclosed variable")
    segments.append("".join(current))
    return segments


def parse_template(text: str) -> PathTemplate:
    if not text.startswith("/"):
        raise TemplateError(f"{text!r}: a template starts with '/'")
    segments = _split_segments(text)
    verb = None
    tail = segments[-1]
    colon = tail.find(":", tail.rfind("}") + 1)
    if colon >= 0:
        segments[-1], verb = tail[:colon], tail[colon + 1 :]
        if not _LITERAL.match(verb):
            raise TemplateError(f"{text!r}: bad verb {verb!r}")
    regex: list[str] = []
    variables: list[Variable] = []
    for segment in segments:
        if segment.startswith("{"):
            if not segment.endswith("}"):
                raise TemplateError(f"{text!r}: a variable is a whole segment")
            name, _, pattern = segment[1:-1].partition("=")
            path = tuple(name.split("."))
            if not all(_IDENT.match(p) for p in path):
                raise TemplateError(f"{text!r}: bad field path {name!r}")
            regex.append(f"(?P<v{len(variables)}>{_segments_regex(pattern or '*', True)})")
            variables.append(Variable(path, pattern or "*"))
        else:
            regex.append(_segments_regex(segment, False))
    pattern = "/" + "/".join(regex) + (re.escape(":" + verb) if verb else "")
    return PathTemplate(text, re.compile(pattern), tuple(variables), verb)


def resolve_field(message: Descriptor, path: Sequence[str]) -> Any:
    """The field a dotted path names (every step but the last a singular message field)."""
    descriptor: Descriptor | None = message
    found: Any = None
    for i, name in enumerate(path):
        if descriptor is None:
            raise TemplateError(f"{'.'.join(path)}: {path[i - 1]} is not a message")
        found = descriptor.fields_by_name.get(name)
        if found is None:
            raise TemplateError(f"{message.full_name} has no field {'.'.join(path[: i + 1])}")
        if i < len(path) - 1 and (found.message_type is None or _is_repeated(found)):
            raise TemplateError(f"{'.'.join(path)}: {name} is not a singular message")
        descriptor = found.message_type
    assert found is not None
    return found


def _is_repeated(f: Any) -> bool:
    return bool(f.is_repeated)


@dataclass(frozen=True)
class Route:
    service: str  # e.g. cipherfeed.v1.KeyService
    method: str  # e.g. GetKey
    http_method: str  # GET, POST, ...
    template: PathTemplate
    body: str  # "" (no body), "*" (the whole request) or a top-level field name
    request_type: type[Message]
    response_type: type[Message]
    upstream: str  # which mesh service serves it: recommender, keyservice or ledger
    path_fields: frozenset[tuple[str, ...]] = field(default_factory=frozenset)

    @property
    def grpc_path(self) -> str:
        return f"/{self.service}/{self.method}"

    @property
    def name(self) -> str:
        """A bounded label for metrics and logs: ``POST /v1/keys/{key_id}:rotate``."""
        return f"{self.http_method} {self.template.text}"

    @property
    def operation_id(self) -> str:
        return f"{self.service.rsplit('.', 1)[-1]}_{self.method}"

    @property
    def has_owner_auth(self) -> bool:
        f = self.request_type.DESCRIPTOR.fields_by_name.get("auth")
        return f is not None and f.message_type is not None and f.message_type.full_name == "cipherfeed.v1.OwnerAuth"


def _rules(rule: http_pb2.HttpRule) -> Iterable[http_pb2.HttpRule]:
    yield rule
    yield from rule.additional_bindings


def _route(method: MethodDescriptor, rule: http_pb2.HttpRule, upstream: str) -> Route:
    pattern = rule.WhichOneof("pattern")
    if pattern not in HTTP_METHODS:
        raise TemplateError(f"{method.full_name}: unsupported pattern {pattern!r}")
    template = parse_template(getattr(rule, pattern))
    request = method.input_type
    for v in template.variables:
        f = resolve_field(request, v.field_path)
        if _is_repeated(f) or f.message_type is not None:
            raise TemplateError(f"{method.full_name}: path variable {'.'.join(v.field_path)} is not a scalar")
    if rule.body not in ("", "*"):
        resolve_field(request, (rule.body,))
    if rule.response_body:
        raise TemplateError(f"{method.full_name}: response_body is not supported")
    return Route(
        service=method.containing_service.full_name,
        method=method.name,
        http_method=pattern.upper(),
        template=template,
        body=rule.body,
        request_type=GetMessageClass(request),
        response_type=GetMessageClass(method.output_type),
        upstream=upstream,
        path_fields=frozenset(v.field_path for v in template.variables),
    )


def default_modules() -> dict[str, ModuleType]:
    """The generated modules of the mesh's services, by the upstream that serves them."""
    from cipherfeed.v1 import keyservice_pb2, ledger_pb2, recommender_pb2

    return {"recommender": recommender_pb2, "keyservice": keyservice_pb2, "ledger": ledger_pb2}


def build_routes(modules: dict[str, ModuleType] | None = None, identity: str = policy.GATEWAY) -> tuple[Route, ...]:
    """Every annotated method of every service in ``modules`` that ``identity`` may call."""
    routes: list[Route] = []
    for upstream, module in (modules or default_modules()).items():
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                options = method.GetOptions()
                if not options.HasExtension(annotations_pb2.http):
                    continue
                if not policy.allowed(f"/{service.full_name}/{method.name}", identity):
                    continue
                rule = options.Extensions[annotations_pb2.http]
                routes.extend(_route(method, r, upstream) for r in _rules(rule))
    seen: dict[tuple[str, str], Route] = {}
    for r in routes:
        key = (r.http_method, r.template.regex.pattern)
        if key in seen:
            raise TemplateError(f"{r.name} is bound twice ({seen[key].grpc_path} and {r.grpc_path})")
        seen[key] = r
    return tuple(routes)


@dataclass(frozen=True)
class Match:
    route: Route
    variables: dict[tuple[str, ...], str]


class RouteTable:
    """Finds the route of a request: a match, or the methods the path allows (for a 405)."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)

    def find(self, http_method: str, raw_path: str) -> Match | tuple[str, ...]:
        allowed: list[str] = []
        for route in self.routes:
            variables = route.template.match(raw_path)
            if variables is None:
                continue
            if route.http_method == http_method:
                return Match(route, variables)
            allowed.append(route.http_method)
        return tuple(sorted(set(allowed)))
