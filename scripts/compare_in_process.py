"""Two settings of the CPU backend, alternately in one process: for gains smaller than the noise
between fresh processes (up to a fifth on a 2-core VM), which a before/after pair of benchmark runs
cannot show.

* ``fusion``: the first convolution and its 2x2 max-pool as one operation, or as two;
* ``banded``: thin convolutions in evaluation computed in banded form, or by im2col + product;
* ``thresholds``: im2col copies and products split from the thresholds in ``cnn_backend.threads``,
  or from 2^21 values and 4 MFLOP (the earlier setting);
* ``split``: element-wise operations (``map_chunks``) split from ``threads.MIN_SPLIT_ELEMENTS``, or
  from 2^21 elements (the earlier setting);
* ``share``: products too short for several chunks of ``threads.MIN_PRODUCT_CHUNK`` per thread
  shared out one chunk per thread (from ``threads.MIN_PRODUCT_SHARE`` rows or columns each), or
  run as one call (the earlier setting).
* ``row-sums``: BatchNorm's row sums and sums of products as BLAS products on one thread (the CPU
  backend's ``row_sums``/``row_dots``), or as NumPy's reductions (the earlier setting);
* ``bn-relu``: a BatchNorm and the ReLU after it as one operation, or as two layers.

``--against REV`` compares the code itself instead: the ``cnn_backend`` package of the git revision
``REV`` (extracted to a temporary folder under another name) against this checkout's, in one
process, each running its own benchmark step.

``--model`` is a built-in network or a spec file.

Each alternation runs warm-up steps, then as many steps as fit in ``--seconds``; printed are the
median and range of samples/s over ``--rounds`` alternations per setting. With ``--interleave N``
the settings switch every N timed steps instead (one untimed step after each switch) and the
figures are over single steps: the tighter comparison when the machine's speed drifts within
seconds, as a shared VM's does. The steps are the benchmark's (synthetic data, SGD with momentum
for training).

    python scripts/compare_in_process.py --what fusion --model default --mode train --batch 64
    python scripts/compare_in_process.py --what thresholds --model seed --mode train --batch 128
    python scripts/compare_in_process.py --what banded --model seed --mode infer --batch 256
    python scripts/compare_in_process.py --what split --model examples/default-bn.toml --batch 64
    python scripts/compare_in_process.py --what share --model examples/narrow-bn-after-pool.toml --batch 64
    python scripts/compare_in_process.py --what row-sums --batch 128 --rounds 150 --interleave 3
    python scripts/compare_in_process.py --what bn-relu --mode infer --batch 256 --rounds 150 --interleave 3
    python scripts/compare_in_process.py --against e81de3e --batch 64 --rounds 150 --interleave 3
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cnn_backend import threads  # noqa: E402
from cnn_backend.backend import Backend, CpuBackend, get_backend  # noqa: E402
from cnn_backend.model import Sequential  # noqa: E402
from cnn_backend.benchmark import our_step_function, synthetic_batches  # noqa: E402
from cnn_backend.spec import SpecError, resolve_spec  # noqa: E402

WARMUP_STEPS = 3


def fusion(enabled: bool) -> None:
    CpuBackend.fuses_conv_maxpool = enabled


def banded(enabled: bool) -> None:
    CpuBackend.bands_thin_convolutions = enabled


CURRENT_THRESHOLDS = (threads.MIN_SPLIT_COPY_ELEMENTS, threads.MIN_SPLIT_FLOPS)
EARLIER_THRESHOLDS = (1 << 21, 4_000_000)


def thresholds(current: bool) -> None:
    threads.MIN_SPLIT_COPY_ELEMENTS, threads.MIN_SPLIT_FLOPS = CURRENT_THRESHOLDS if current else EARLIER_THRESHOLDS


CURRENT_SPLIT, EARLIER_SPLIT = threads.MIN_SPLIT_ELEMENTS, 1 << 21


def split(current: bool) -> None:
    threads.MIN_SPLIT_ELEMENTS = CURRENT_SPLIT if current else EARLIER_SPLIT


CURRENT_SHARE = threads.MIN_PRODUCT_SHARE


def share(current: bool) -> None:
    threads.MIN_PRODUCT_SHARE = CURRENT_SHARE if current else threads.MIN_PRODUCT_CHUNK * threads.CHUNKS_PER_THREAD


BLAS_ROW_REDUCTIONS = (CpuBackend.row_sums, CpuBackend.row_dots)


def row_sums(blas: bool) -> None:
    CpuBackend.row_sums, CpuBackend.row_dots = BLAS_ROW_REDUCTIONS if blas else (Backend.row_sums, Backend.row_dots)


def bn_relu(fused: bool) -> None:
    Sequential.fuses_batchnorm_relu = fused


def _label(copy_elements: int, flops: int) -> str:
    return f"{copy_elements / 1e6:.1f}M / {flops / 1e6:.0f} MFLOP"


SETTINGS = {
    "fusion": (fusion, {True: "fused", False: "separate"}),
    "banded": (banded, {True: "banded", False: "im2col"}),
    "thresholds": (thresholds, {True: _label(*CURRENT_THRESHOLDS), False: _label(*EARLIER_THRESHOLDS)}),
    "split": (split, {True: f"from {CURRENT_SPLIT:,}", False: f"from {EARLIER_SPLIT:,}"}),
    "share": (share, {True: f"shared from {CURRENT_SHARE}", False: "one call"}),
    "row-sums": (row_sums, {True: "BLAS products", False: "NumPy reductions"}),
    "bn-relu": (bn_relu, {True: "fused", False: "separate"}),
}


def package_at(revision: str, folder: Path):
    """``cnn_backend`` as it was at git ``revision``, imported from ``folder`` as
    ``cnn_backend_at_revision`` (its modules import one another relatively)."""
    result = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "cnn_backend"], capture_output=True, timeout=60)
    if result.returncode:
        reason = (result.stderr.decode().strip().splitlines() or ["git archive failed"])[0]
        raise SystemExit(f"compare_in_process.py: error: --against {revision}: {reason}")
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as archive:
        # The "data" filter where this Python has it (3.10.12+): the archive is this repository's own.
        archive.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (folder / "cnn_backend").rename(folder / "cnn_backend_at_revision")
    sys.path.insert(0, str(folder))
    return importlib.import_module("cnn_backend_at_revision.benchmark"), importlib.import_module("cnn_backend_at_revision.backend")


def revision_switch(revision: str, folder: Path, args):
    """``(apply, names, steps)`` for ``--against``: the step of this checkout's code or of ``revision``'s."""
    benchmark, backend = package_at(revision, folder)
    batches = synthetic_batches(args.batch, 0, "float32")
    steps = {
        True: our_step_function(get_backend("cpu"), args.model, "gemm", args.mode, batches, 0),
        False: benchmark.our_step_function(backend.get_backend("cpu"), args.model, "gemm", args.mode, batches, 0),
    }
    current = {}
    return (lambda this_checkout: current.update(step=steps[this_checkout])), {True: "this checkout", False: revision}, current


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--what", choices=sorted(SETTINGS))
    what.add_argument("--against", metavar="REV", help="compare this checkout's code with git revision REV's")
    parser.add_argument("--model", default="default", help="seed, default, or a spec file (default: default)")
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=0.4, help="timed seconds per alternation")
    parser.add_argument("--interleave", type=int, default=0, metavar="N", help="switch settings every N timed steps (0: every --seconds)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.rounds < 1 or args.seconds <= 0 or args.interleave < 0:
        parser.error("--batch and --rounds must be >= 1, --seconds > 0 and --interleave >= 0")
    try:
        resolve_spec(args.model)
    except (SpecError, OSError) as error:
        parser.error(str(error))
    with tempfile.TemporaryDirectory() as folder:
        if args.against:
            apply, names, current = revision_switch(args.against, Path(folder), args)
        else:
            apply, names = SETTINGS[args.what]
            batches = synthetic_batches(args.batch, 0, "float32")
            current = {"step": our_step_function(get_backend("cpu"), args.model, "gemm", args.mode, batches, 0)}
        rates = alternate(apply, names, lambda i: current["step"](i), args)
    report(rates, names, args)
    return 0


def alternate(apply, names: dict, step, args) -> dict:
    """Samples/s of each setting over ``args.rounds`` alternations (see the module notes)."""
    rates = {setting: [] for setting in names}
    for _ in range(args.rounds):
        for setting in names:
            apply(setting)
            if args.interleave:
                step(0)
                for i in range(args.interleave):
                    start = time.perf_counter()
                    step(i + 1)
                    rates[setting].append(args.batch / (time.perf_counter() - start))
                continue
            for i in range(WARMUP_STEPS):
                step(i)
            steps, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                step(steps)
                steps += 1
            rates[setting].append(args.batch * steps / (time.perf_counter() - start))
    apply(True)
    return rates


def report(rates: dict, names: dict, args) -> None:
    every = f"{args.interleave} steps" if args.interleave else f"{args.seconds} s"
    print(f"{args.model} {args.mode} batch {args.batch}, {args.rounds} alternations of {every}:")
    for setting, name in names.items():
        values = rates[setting]
        print(f"  {name:16s} median {statistics.median(values):,.0f} samples/s, range {min(values):,.0f}-{max(values):,.0f}")
    first, second = (statistics.median(rates[setting]) for setting in names)
    print(f"  {names[True]} / {names[False]}: {first / second:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
