"""Domain errors shared by every service; transports map each kind to one status code."""

from __future__ import annotations


class CipherfeedError(Exception):
    """Base: the message is safe to return to the caller (no secrets, no key material)."""


class InvalidArgument(CipherfeedError, ValueError):
    """The request is malformed (gRPC INVALID_ARGUMENT, HTTP 400)."""


class NotFound(CipherfeedError, LookupError):
    """A named thing does not exist (NOT_FOUND, 404)."""


class AlreadyExists(CipherfeedError):
    """Creating something that exists with other content (ALREADY_EXISTS, 409)."""


class FailedPrecondition(CipherfeedError):
    """The system's state forbids the operation, e.g. a disabled key (FAILED_PRECONDITION, 400)."""


class ResourceExhausted(CipherfeedError):
    """A size or count limit was exceeded (RESOURCE_EXHAUSTED, 429)."""


class Unavailable(CipherfeedError):
    """A dependency cannot be reached right now; retrying may succeed (UNAVAILABLE, 503)."""
