"""Who is calling: the SPIFFE identity of a gRPC peer, from its verified client certificate."""

from __future__ import annotations

from typing import cast

import grpc

from cipherfeed.tls import parse_spiffe_id


def peer_spiffe_id(context: grpc.ServicerContext) -> tuple[str, str] | None:
    """``(trust domain, name)`` of the peer's verified certificate, None without one.

    gRPC sets ``peer_spiffe_id`` only after the TLS handshake verified the certificate against the
    mesh CA and only when it carries exactly one SPIFFE URI SAN; plaintext peers have none.
    """
    # A list of bytes at run time (types-grpcio says bytes).
    values = cast("list[bytes] | None", context.auth_context().get("peer_spiffe_id"))
    if not values or len(values) != 1:
        return None
    try:
        return parse_spiffe_id(values[0].decode("ascii"))
    except UnicodeDecodeError:
        return None


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """The caller's name (``ledger``, ``operator``, ``device``, ...), None if it has no identity.

    The authorization interceptor has already refused peers of another trust domain before a
    handler runs, so a handler may use this name as is (e.g. as the audit's "who did it").
    """
    parsed = peer_spiffe_id(context)
    return parsed[1] if parsed else None
