"""The device's copy of the catalogue manifest: one file per model version under the client home.

A manifest is public, but which version a device holds is not the server's business beyond the
one download per model; so the cache is keyed by model version and every read is checked
against the digest the recommender publishes with its model info. A cached file that does not
match (corrupt, truncated, tampered with) is discarded and downloaded again.
"""

from __future__ import annotations

import re
from pathlib import Path

from cipherfeed.atomicfile import PRIVATE, write_atomic
from cipherfeed.manifest import Manifest, ManifestError, decode

_VERSION = re.compile(r"^[0-9a-f]{64}$")


KEEP_VERSIONS = 3  # the serving model and the two before it (a rollback needs no download)


class ManifestCache:
    def __init__(self, directory: Path, keep: int = KEEP_VERSIONS) -> None:
        self.directory = directory
        self.keep = keep

    def path(self, model_version: str) -> Path:
        if not _VERSION.match(model_version):
            raise ManifestError(f"model version {model_version[:80]!r} is not a lowercase hex SHA-256")
        return self.directory / f"{model_version}.cfmanifest"

    def load(self, model_version: str, sha256: bytes) -> Manifest | None:
        """The cached manifest of ``model_version`` if present and matching ``sha256``."""
        path = self.path(model_version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            found = decode(data, expected_sha256=sha256)
        except ManifestError:
            path.unlink(missing_ok=True)  # corrupt or stale: download again
            return None
        return found if found.model_version == model_version else None

    def store(self, model_version: str, data: bytes) -> Path:
        """Writes atomically (temp file + rename), so a crash never leaves a half manifest."""
        path = self.path(model_version)
        write_atomic(path, data, PRIVATE)  # under the client home: what the device caches is its own
        self._prune(keep=path)
        return path

    def _prune(self, keep: Path) -> None:
        """Drops all but the ``keep`` most recently stored versions (and the one just written)."""
        stored = sorted(self.directory.glob("*.cfmanifest"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in [p for p in stored if p != keep][max(0, self.keep - 1) :]:
            old.unlink(missing_ok=True)

    def versions(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.cfmanifest") if _VERSION.match(p.stem))
