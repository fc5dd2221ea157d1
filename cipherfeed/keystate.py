"""The state of a client key as the recommenders see it (shared by key service and recommender)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum

from cipherfeed.errors import FailedPrecondition


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

    def check_usable(self, version: int) -> int:
        """The version to use (0 = current), or KeyStateError saying why it may not be used."""
        v = version or self.current_version
        if self.state is not KeyState.ENABLED:
            raise KeyStateError(f"key {self.key_id[:16]} is {self.state.value}")
        if v > self.current_version or v not in self.material_sha256:
            raise KeyStateError(f"key {self.key_id[:16]} has no version {v}")
        if v < self.min_version:
            raise KeyStateError(f"key {self.key_id[:16]} version {v} is retired (minimum {self.min_version})")
        return v

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "key_id": self.key_id,
                "state": self.state.value,
                "current_version": self.current_version,
                "min_version": self.min_version,
                "material_sha256": {str(k): v for k, v in self.material_sha256.items()},
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
        )
