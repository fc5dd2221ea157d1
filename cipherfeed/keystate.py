"""The state of a client key as the recommenders see it (shared by key service and recommender)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum

from cipherfeed.errors import FailedPrecondition, Reason, invalid, required

KEY_ID_HEX_DIGITS = 64  # a key id is the SHA-256 of the public key, in lower-case hex


def check_key_id(key_id: str, field: str = "key_id") -> str:
    """``key_id`` if it can name a key (64 lower-case hex digits); INVALID_ARGUMENT otherwise."""
    if not key_id:
        raise required(field)
    if len(key_id) != KEY_ID_HEX_DIGITS or key_id.strip("0123456789abcdef"):
        raise invalid(field, f"{field} is {KEY_ID_HEX_DIGITS} lower-case hex digits (the SHA-256 of the public key)")
    return key_id


class KeyState(str, Enum):
    ENABLED = "ENABLED"
    DISABLED = "DISABLED"
    DESTROYED = "DESTROYED"


class KeyStateError(FailedPrecondition):
    """The key exists but its state or the requested version forbids the use (FAILED_PRECONDITION)."""


@dataclass(frozen=True)
class KeyStatus:
    key_id: str
    state: KeyState
    current_version: int
    min_version: int
    material_sha256: dict[int, str] = field(default_factory=dict)  # version -> hex digest
    owner: str = ""  # the owning Ethereum account (checksummed); who may score and upload with it

    def check_usable(self, version: int) -> int:
        """The version to use (0 = current), or KeyStateError saying why it may not be used."""
        v = version or self.current_version
        if self.state is not KeyState.ENABLED:
            raise KeyStateError(
                f"key {self.key_id[:16]} is {self.state.value}",
                reason=Reason.KEY_NOT_ENABLED,
                metadata={"state": self.state.value},
            )
        if v > self.current_version or v not in self.material_sha256:
            raise KeyStateError(
                f"key {self.key_id[:16]} has no version {v}",
                reason=Reason.KEY_VERSION_UNAVAILABLE,
                metadata={"version": v},
            )
        if v < self.min_version:
            raise KeyStateError(
                f"key {self.key_id[:16]} version {v} is retired (minimum {self.min_version})",
                reason=Reason.KEY_VERSION_RETIRED,
                metadata={"version": v, "min_version": self.min_version},
            )
        return v

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "key_id": self.key_id,
                "state": self.state.value,
                "current_version": self.current_version,
                "min_version": self.min_version,
                "material_sha256": {str(k): v for k, v in self.material_sha256.items()},
                "owner": self.owner,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> KeyStatus:
        d = json.loads(data)
        return cls(
            key_id=d["key_id"],
            state=KeyState(d["state"]),
            current_version=int(d["current_version"]),
            min_version=int(d["min_version"]),
            material_sha256={int(k): v for k, v in d["material_sha256"].items()},
            owner=str(d.get("owner", "")),
        )
