"""Generates the Python gRPC code for protos/ into cipherfeed/v1/ (never edited by hand)."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import google.api
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = ROOT / "cipherfeed" / "v1"


def stub_plugins() -> list[str]:
    """mypy-protobuf's plugins (the dev install has them): typed .pyi for messages and for the gRPC
    stubs and servicer bases. Without them, protoc's own message .pyi."""
    found = {}
    for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        path = Path(sys.executable).parent / name
        found[name] = str(path) if path.exists() else shutil.which(name)
    if not all(found.values()):
        return [f"--pyi_out={ROOT}"]
    return [
        *(f"--plugin={name}={path}" for name, path in found.items()),
        f"--mypy_out={ROOT}",
        f"--mypy_grpc_out={ROOT}",
    ]


def main() -> int:
    protos = sorted(PROTO_ROOT.glob("cipherfeed/v1/*.proto"))
    stubs = stub_plugins()
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in protos) + stubs[-1].encode()).hexdigest()
    stamp = OUT_PACKAGE / ".protos-sha256"
    if stamp.exists() and stamp.read_text() == digest:
        return 0
    OUT_PACKAGE.mkdir(exist_ok=True)
    googleapis = Path(next(iter(google.api.__path__))).parent.parent
    grpc_include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{googleapis}",
        f"-I{grpc_include}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *stubs,
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        print("gen_protos: protoc failed", file=sys.stderr)
        return 1
    (OUT_PACKAGE / "__init__.py").write_text('"""Generated from protos/ by scripts/gen_protos.py."""\n')
    stamp.write_text(digest)
    print(f"gen_protos: generated {len(protos)} protos into {OUT_PACKAGE.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
