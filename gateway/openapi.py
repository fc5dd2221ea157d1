"""OpenAPI 3.0 from the same route table and descriptors the gateway serves (no second list).

Schemas follow proto3 JSON as the gateway reads and prints it: lowerCamelCase property names
(the original names are accepted too, not listed), 64-bit integers as decimal strings, bytes as
base64, enums by name, unknown properties refused. Path variables and the query parameters of GET
routes (every scalar field not bound by the path, dotted for nested messages) are parameters;
``body: "*"`` routes take the whole request message as JSON or as ``application/x-protobuf``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.rpc import status_pb2

from gateway.routes import Descriptor, Route, resolve_field
from gateway.transcode import JSON, PROTOBUF

OPENAPI_VERSION = "3.0.3"
MAX_QUERY_DEPTH = 4  # nested messages expanded into dotted query parameters

_INT32 = {"type": "integer", "format": "int32"}
_UINT32 = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
_INT64 = {"type": "string", "format": "int64", "pattern": r"^-?[0-9]{1,19}$"}
_UINT64 = {"type": "string", "format": "uint64", "pattern": r"^[0-9]{1,20}$"}
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}
# Well-known types with a JSON form of their own (none of the mesh's messages use others).
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


class _Schemas:
    def __init__(self) -> None:
        self.schemas: dict[str, dict[str, Any]] = {}

    def enum(self, e: Any) -> dict[str, Any]:
        if e.full_name not in self.schemas:
            self.schemas[e.full_name] = {"type": "string", "enum": [v.name for v in e.values]}
        return _ref(e.full_name)

    def message(self, d: Descriptor) -> dict[str, Any]:
        if d.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[d.full_name])
        if d.full_name not in self.schemas:
            self.schemas[d.full_name] = {}  # placeholder first: messages may refer to themselves
            properties = {f.json_name: self.field(f) for f in d.fields}
            schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
            self.schemas[d.full_name] = schema
        return _ref(d.full_name)

    def value(self, f: Any) -> dict[str, Any]:
        if f.message_type is not None:
            return self.message(f.message_type)
        if f.enum_type is not None:
            return self.enum(f.enum_type)
        return dict(_SCALARS[f.type])

    def field(self, f: Any) -> dict[str, Any]:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value = f.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.value(value)}
        if f.is_repeated:
            return {"type": "array", "items": self.value(f)}
        return self.value(f)


def _query_fields(
    d: Descriptor, prefix: str, proto_prefix: str, bound: set[str], depth: int
) -> Iterator[tuple[str, Any]]:
    for f in d.fields:
        name, proto = prefix + f.json_name, proto_prefix + f.name
        if proto in bound:
            continue
        if f.message_type is not None:
            if not f.is_repeated and depth < MAX_QUERY_DEPTH and f.message_type.full_name not in _WELL_KNOWN:
                yield from _query_fields(f.message_type, name + ".", proto + ".", bound, depth + 1)
            continue
        yield name, f


def _operation(route: Route, schemas: _Schemas) -> dict[str, Any]:
    request = route.request_type.DESCRIPTOR
    parameters: list[dict[str, Any]] = []
    for variable in route.template.variables:
        f = resolve_field(request, variable.field_path)
        parameters.append(
            {"name": ".".join(variable.field_path), "in": "path", "required": True, "schema": schemas.value(f)}
        )
    if not route.body:
        bound = {".".join(v.field_path) for v in route.template.variables}
        for name, f in _query_fields(request, "", "", bound, 0):
            schema = schemas.field(f)
            parameter: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": schema}
            if f.is_repeated:
                parameter.update(style="form", explode=True)
            parameters.append(parameter)
    binary = {"schema": {"type": "string", "format": "binary"}}
    status = {JSON: {"schema": schemas.message(status_pb2.Status.DESCRIPTOR)}, PROTOBUF: binary}
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "tags": [route.service],
        "summary": f"{route.service}.{route.method}",
        "parameters": parameters,
        "responses": {
            "200": {
                "description": f"the {route.response_type.DESCRIPTOR.name}",
                "content": {JSON: {"schema": schemas.message(route.response_type.DESCRIPTOR)}, PROTOBUF: binary},
            },
            "default": {"description": "a google.rpc.Status (code, message, details)", "content": status},
        },
    }
    if route.body:
        target = request if route.body == "*" else request.fields_by_name[route.body].message_type
        operation["requestBody"] = {
            "required": False,
            "content": {JSON: {"schema": schemas.message(target)}, PROTOBUF: binary},
        }
    if route.has_owner_auth:
        operation["security"] = [{}, {"sessionToken": []}]  # or an EIP-712 signature in `auth`
    return operation


def document(routes: Sequence[Route], title: str = "cipherfeed gateway", version: str = "v1") -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.template.openapi_path, {})[route.http_method.lower()] = _operation(route, schemas)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": "HTTP/JSON for the cipherfeed mesh, generated from the google.api.http "
            "annotations of protos/cipherfeed/v1. Owner requests carry the key owner's EIP-712 signature "
            "in `auth`, or a session token (Sign-In with Ethereum) as `Authorization: Bearer`.",
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.schemas.items())),
            "securitySchemes": {"sessionToken": {"type": "http", "scheme": "bearer"}},
        },
    }
