"""The long run behind ``make fuzz``: every target for ``--seconds`` each, corpora kept in
fuzz/corpus/<target> (so later runs start where earlier ones stopped), crash inputs in
fuzz/crashes/; prints one line per target (executions, coverage, crashes) and exits non-zero on
any crash. The figures also go to fuzz/results/atheris.json, rewritten after every target."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fuzz.targets import TARGETS

HERE = Path(__file__).resolve().parent


def _fuzz(
    name: str, corpus: Path, crashes_dir: Path, seconds: int, clock: Callable[[], float] = time.monotonic
) -> tuple[int, int, str, bool, str, int]:
    """Fuzzes ``name`` for ``seconds``, in one process or in processes of ``runs_per_process``
    executions each sharing the corpus; returns executions, seconds, last coverage, crashed, the last
    log and the number of processes."""
    per_process = TARGETS[name].runs_per_process
    started = clock()
    runs = processes = 0
    cov = "-"
    while True:
        left = max(1, int(seconds - (clock() - started)))
        limit = [f"-runs={per_process}"] if per_process else []
        proc = subprocess.run(
            [sys.executable, "-m", "fuzz.run", name, f"-max_total_time={left}", *limit,
             f"-artifact_prefix={crashes_dir}/{name}-", str(corpus)],
            capture_output=True, text=True, cwd=HERE.parent, check=False,
        )  # fmt: skip
        processes += 1
        log = proc.stdout + proc.stderr
        done = re.findall(r"^Done (\d+) runs in (\d+) second", log, re.M)
        runs += int(done[-1][0]) if done else 0
        covered = re.findall(r"cov: (\d+)", log)
        cov = covered[-1] if covered else cov
        crashed = proc.returncode != 0
        if crashed or not per_process or clock() - started >= seconds:
            return runs, int(clock() - started), cov, crashed, log, processes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=300, help="per target")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "atheris.json", help="JSON written here")
    parser.add_argument("targets", nargs="*", default=list(TARGETS))
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    crashes_dir = HERE / "crashes"
    crashes_dir.mkdir(exist_ok=True)
    failed = 0
    print(f"{'target':<22} {'executions':>12} {'exec/s':>8} {'cov':>5} {'crashes':>8} {'processes':>10}")
    for name in args.targets:
        corpus = HERE / "corpus" / name
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            for i, seed in enumerate(TARGETS[name].seeds()):
                (corpus / f"seed-{i}").write_bytes(seed)
        runs, secs, cov, crashed, log, processes = _fuzz(name, corpus, crashes_dir, args.seconds)
        failed += crashed
        rate = runs // max(secs, 1)
        rows.append({"target": name, "executions": runs, "seconds": secs, "exec_per_s": rate, "coverage": cov,
                     "crashed": crashed, "processes": processes, "load_average": list(os.getloadavg())})  # fmt: skip
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"seconds_per_target": args.seconds, "targets": rows}, indent=1) + "\n")
        print(f"{name:<22} {runs:>12,} {rate:>8,} {cov:>5} {int(crashed):>8} {processes:>10}", flush=True)
        if crashed:
            print("\n".join(log.splitlines()[-30:]), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
