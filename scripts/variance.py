"""How much a figure varies between fresh processes: run a command N times, each in a new Python.

Three measurements, each printed run by run with the load average at its start, then as median,
range and the worst ratio of a run to the median (max/median for times, median/min for
throughputs; 1.5x is the bar):

* ``seed``: wall-clock seconds of ``python scripts/seed_experiment.py``;
* ``train``: wall-clock seconds of ``cnn-backend train --model seed --epochs 2``;
* ``benchmark``: samples/s of each configuration of
  ``cnn-backend benchmark --models MODELS --algorithms gemm --no-torch --no-memory --repeats 3``
  (``--models``: the default network unless told otherwise).

    python scripts/variance.py --runs 10 --what seed,benchmark
    python scripts/variance.py --what benchmark --models default,plain
    python scripts/variance.py --root ../other-checkout     # the same measurement of another checkout

The runs share the machine with whatever else runs on it: read the load averages beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # --root replaces it
sys.path.insert(0, str(ROOT))

from cnn_backend.benchmark import MODELS, _csv  # noqa: E402
MEASUREMENTS = ("seed", "train", "benchmark")
BENCHMARK_ARGS = ["--algorithms", "gemm", "--no-torch", "--no-memory", "--repeats", "3"]


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if completed.returncode not in (0, 1):  # the seed experiment exits 1 when it misses its target
        raise SystemExit(f"variance: {' '.join(command)} failed: {completed.stderr.strip().splitlines()[-1:]}")
    return seconds


def run_seed(workdir: Path, models: str) -> dict:
    return {"seconds": timed([sys.executable, str(ROOT / "scripts" / "seed_experiment.py")], workdir)}


def run_train(workdir: Path, models: str) -> dict:
    out = workdir / f"run-{time.monotonic_ns()}"
    command = [sys.executable, "-m", "cnn_backend", "train", "--model", "seed", "--epochs", "2"]
    return {"seconds": timed(command + ["--out", str(out), "--quiet", "--no-plots"], workdir)}


def run_benchmark(workdir: Path, models: str) -> dict:
    path = workdir / "benchmark.json"
    command = [sys.executable, "-m", "cnn_backend", "benchmark", "--models", models, *BENCHMARK_ARGS, "--json", str(path)]
    timed(command, workdir)
    results = json.loads(path.read_text())["results"]
    return {f"{r['model']} {r['mode']} {r['batch_size']} (samples/s)": r["samples_per_second"] for r in results}


RUNNERS = {"seed": run_seed, "train": run_train, "benchmark": run_benchmark}


def summarise(name: str, values: list[float]) -> str:
    median = statistics.median(values)
    if "samples/s" in name:
        worst = median / min(values)
        spread = "median/min"
    else:
        worst = max(values) / median
        spread = "max/median"
    return (
        f"{name}: median {median:,.2f}, range {min(values):,.2f}-{max(values):,.2f}, "
        f"{spread} {worst:.2f}x ({'within' if worst <= 1.5 else 'OUTSIDE'} 1.5x)"
    )


def main(argv: list[str] | None = None) -> int:
    global ROOT
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--runs", type=int, default=10, help="fresh processes per measurement (default: 10)")
    parser.add_argument(
        "--what", default="seed,benchmark", help=f"comma-separated, from {', '.join(MEASUREMENTS)} (default: seed,benchmark)"
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to measure (default: this one)")
    parser.add_argument(
        "--models", type=_csv(MODELS), default=["default"], help="the benchmark's comma-separated models (default: default)"
    )
    args = parser.parse_args(argv)
    ROOT = args.root.resolve()
    chosen = [name.strip() for name in args.what.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in RUNNERS]
    if unknown or args.runs < 1:
        parser.error(f"unknown measurement {', '.join(unknown)}" if unknown else "--runs must be >= 1")
    print(f"variance of {ROOT}: {args.runs} fresh runs each of {', '.join(chosen)}; load average at start {load_average()}")
    for name in chosen:
        figures: dict[str, list[float]] = {}
        with tempfile.TemporaryDirectory(prefix="cnn-backend-variance-") as tmp:
            for run in range(1, args.runs + 1):
                load = load_average()
                result = RUNNERS[name](Path(tmp), ",".join(args.models))
                for key, value in result.items():
                    figures.setdefault(key, []).append(value)
                shown = ", ".join(f"{key} {value:,.2f}" for key, value in result.items())
                print(f"  {name} run {run:2d} (load {load}): {shown}", flush=True)
        for key, values in figures.items():
            print(f"{name} {summarise(key, values)}", flush=True)
    print(f"load average at end {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
