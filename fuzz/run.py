"""Runs one atheris target: ``python -m fuzz.run <target> [libFuzzer flags] [corpus dirs]``.

With no corpus directory the target's seeds are written to a temporary one. A target that raises
anything but its parser's documented refusal stops the run with the input saved as ``crash-*``
(libFuzzer's ``-artifact_prefix=``) and a non-zero exit status.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path

import atheris

from fuzz.targets import TARGETS


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in TARGETS:
        print(f"usage: python -m fuzz.run {{{','.join(TARGETS)}}} [libFuzzer flags] [corpus dir]", file=sys.stderr)
        return 2
    target = TARGETS[argv[1]]
    with atheris.instrument_imports(include=[m.split(".")[0] for m in target.modules]):
        for module in target.modules:
            importlib.import_module(module)
    flags = argv[2:]
    if not any(not f.startswith("-") for f in flags):
        seeds = Path(tempfile.mkdtemp(prefix=f"fuzz-{argv[1]}-"))
        for i, seed in enumerate(target.seeds()):
            (seeds / f"seed-{i}").write_bytes(seed)
        flags.append(str(seeds))
    atheris.Setup([argv[0], *flags], target.run)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
