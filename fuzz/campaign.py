"""The long run behind ``make fuzz``: every target for ``--seconds`` each, corpora kept in
fuzz/corpus/<target> (so later runs start where earlier ones stopped), crash inputs in
fuzz/crashes/; prints one line per target (executions, coverage, crashes) and exits non-zero on
any crash."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from fuzz.targets import TARGETS

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=300, help="per target")
    parser.add_argument("targets", nargs="*", default=list(TARGETS))
    args = parser.parse_args()
    crashes_dir = HERE / "crashes"
    crashes_dir.mkdir(exist_ok=True)
    failed = 0
    print(f"{'target':<16} {'executions':>12} {'exec/s':>8} {'cov':>5} {'crashes':>8}")
    for name in args.targets:
        corpus = HERE / "corpus" / name
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            for i, seed in enumerate(TARGETS[name].seeds()):
                (corpus / f"seed-{i}").write_bytes(seed)
        proc = subprocess.run(
            [sys.executable, "-m", "fuzz.run", name, f"-max_total_time={args.seconds}",
             f"-artifact_prefix={crashes_dir}/{name}-", str(corpus)],
            capture_output=True, text=True, cwd=HERE.parent, check=False,
        )  # fmt: skip
        log = proc.stdout + proc.stderr
        done = re.findall(r"^Done (\d+) runs in (\d+) second", log, re.M)
        cov = re.findall(r"cov: (\d+)", log)
        runs, secs = (int(done[-1][0]), int(done[-1][1])) if done else (0, 0)
        crashed = proc.returncode != 0
        failed += crashed
        rate = runs // max(secs, 1)
        print(f"{name:<16} {runs:>12,} {rate:>8,} {cov[-1] if cov else '-':>5} {int(crashed):>8}", flush=True)
        if crashed:
            print("\n".join(log.splitlines()[-30:]), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
