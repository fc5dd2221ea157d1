"""Errors as ``google.rpc.Status``: gRPC codes to HTTP statuses (the canonical mapping of
google/rpc/code.proto, as Envoy and grpc-gateway use it), statuses from upstream failures, and the
gateway's own refusals in the same shape.

An upstream status that carries the mesh's details (a ``google.rpc.Status`` in
``grpc-status-details-bin``) is passed on as the service wrote it: its message is already bounded
and free of secrets. A bare transport status (connection refused, a deadline) is not: its text
names internal addresses, so the client gets a fixed message and an ErrorInfo naming the upstream.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from cipherfeed import errors
from cipherfeed.grpcutil import rich_status

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
DETAILS_KEY = "grpc-status-details-bin"


def code_of(number: int) -> grpc.StatusCode:
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def http_status(status: status_pb2.Status) -> int:
    return HTTP_STATUS[code_of(status.code)]


class GatewayError(Exception):
    """A refusal the gateway makes itself; ``http`` overrides the code's mapping (413, 405, 415)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: errors.Reason,
        message: str,
        metadata: dict[str, str] | None = None,
        http: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = rich_status(code, reason.value, message, metadata)
        self.http = http if http is not None else HTTP_STATUS[code]
        self.headers = headers or {}


def invalid(message: str, field: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, errors.Reason.FIELD_INVALID, message, {"field": field})


def from_rpc_error(error: grpc.aio.AioRpcError, upstream: str) -> status_pb2.Status:
    """The Status to give the HTTP client for a failed upstream call."""
    code = error.code()
    for key, value in error.trailing_metadata() or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            try:
                status = status_pb2.Status.FromString(value)
            except Exception:  # a malformed details blob: fall back to the bare status below
                break
            if status.code == code.value[0]:
                return status
            break
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return rich_status(
            code,
            errors.Reason.DEPENDENCY_UNAVAILABLE.value,
            f"{upstream} did not answer in time",
            {"dependency": upstream},
        )
    if code is grpc.StatusCode.UNAVAILABLE:
        return rich_status(
            code, errors.Reason.DEPENDENCY_UNAVAILABLE.value, f"{upstream} is unavailable", {"dependency": upstream}
        )
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
        # e.g. a message over gRPC's size limit, refused by the transport before any handler
        return rich_status(
            code,
            errors.Reason.SIZE_LIMIT.value
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED
            else errors.Reason.FIELD_INVALID.value,
            f"{upstream} refused the request",
        )
    return rich_status(code, errors.Reason.INTERNAL.value, f"{upstream} failed ({code.name})")


def retry_after_seconds(status: status_pb2.Status) -> int | None:
    """Whole seconds of the status's RetryInfo (rounded up), for a ``Retry-After`` header."""
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            delay: duration_pb2.Duration = info.retry_delay
            return max(0, math.ceil(delay.ToNanoseconds() / 1e9))
    return None
