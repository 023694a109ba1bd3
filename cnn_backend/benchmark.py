"""Measure training and inference throughput (samples/s) for each usable device, convolution
algorithm, model and batch size, and compare it with PyTorch on the same device when installed.

Each figure is the median of ``--repeats`` timed repeats after warm-up steps, with the device
synchronised before every clock read. Our repeats and PyTorch's are interleaved, so a load that comes
and goes on a shared machine hits both alike. The data are synthetic 28x28 images from a seeded host
generator, sent to the device once. Peak resident memory of a training run of the default model at
batch 128 is measured in a fresh subprocess. Results are printed as a table and written as JSON.

Each figure also comes as the share of the machine's matrix-product peak it reaches: the model's
floating-point operations per sample (the multiply-adds of its convolutions and dense layers, twice
over; a training step adds the two gradient products of each layer, less the input gradient of
the first) times samples/s, over the best rate of a large square product measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy

from .backend import DeviceUnavailableError, get_backend
from .data import FASHION_MNIST_SHAPE, NUM_CLASSES
from .functional import CONV_ALGORITHMS, output_size
from .layers import Convolution, FullyConnected, MaxPool, SoftmaxCrossEntropy
from .model import ARCHITECTURES
from .optim import SGD
from .serialization import FileWriteError, write_atomically
from .spec import build_model
from .training import has_batchnorm, train_step

MODELS = ("seed", "default", "plain")
BENCH_DEVICES = ("cpu", "cuda")
LEARNING_RATE, MOMENTUM = 0.01, 0.9
#: distinct synthetic batches cycled through, so no step reuses the previous step's input
N_BATCHES = 4
#: environment variables that change which OpenBLAS kernel runs (and so GEMM speed)
OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
MEMORY_MODEL, MEMORY_BATCH = "default", 128
MEMORY_STEPS, QUICK_MEMORY_STEPS = 10, 2
PAUSE_SECONDS = 0.2
#: the square product whose best rate is taken as the machine's matrix-product peak
PEAK_GEMM_SIZE, PEAK_GEMM_REPEATS = 2048, 5
#: the run-length options' defaults, and --quick's (a smoke run of every code path, not a
#: measurement); an option given on the command line is kept either way
FULL = {"train_batch_sizes": [64, 128], "infer_batch_sizes": [256], "repeats": 5, "warmup": 3, "min_time": 0.5}
QUICK = {"train_batch_sizes": [8], "infer_batch_sizes": [16], "repeats": 1, "warmup": 1, "min_time": 0.0}


# == command line ===================================================================================


def _csv(choices: Sequence[str] | None = None, kind: Callable = str):
    def parse(text: str) -> list:
        values = list(dict.fromkeys(kind(item.strip()) for item in text.split(",") if item.strip()))  # once each
        if not values:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        if choices is not None:
            unknown = [v for v in values if v not in choices]
            if unknown:
                raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
        if kind is int and min(values) < 1:
            raise argparse.ArgumentTypeError("batch sizes must be >= 1")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (also mounted as ``cnn-backend benchmark``)."""
    # Imported here: the command line's package loads this module only when the command is run.
    from .cli.arguments import json_report_path, non_negative_int, positive_float, positive_int

    parser.add_argument(
        "--devices", type=_csv(BENCH_DEVICES), default=None,
        help="comma-separated devices (default: cpu, plus cuda when a GPU is usable)",
    )
    parser.add_argument(
        "--algorithms", type=_csv(CONV_ALGORITHMS + ("auto",)), default=list(CONV_ALGORITHMS),
        help="comma-separated convolution algorithms: gemm, signal, or auto (the one each layer would pick) "
        "(default: gemm,signal)",
    )
    parser.add_argument(
        "--models", type=_csv(MODELS), default=list(MODELS), help="comma-separated models (default: seed,default,plain)"
    )
    parser.add_argument(
        "--train-batch-sizes", type=_csv(kind=int), default=None, help="training batch sizes (default: 64,128)"
    )
    parser.add_argument(
        "--infer-batch-sizes", type=_csv(kind=int), default=None, help="inference batch sizes (default: 256)"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=None, help="timed repeats per figure; the median is reported (default: 5)"
    )
    parser.add_argument("--warmup", type=non_negative_int, default=None, help="untimed steps before timing (default: 3)")
    parser.add_argument(
        "--min-time", type=positive_float, default=None,
        help="each repeat runs at least this many seconds, and at least 2 steps (default: 0.5)",
    )
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="float dtype (default: float32)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the synthetic data and the weights (default: 0)")
    parser.add_argument(
        "--threads", type=positive_int, default=None,
        help="threads for our BLAS (through threadpoolctl) and for PyTorch (default: the thread count "
        "NumPy's BLAS already uses, else the usable cores)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--quick", action="store_true",
        help="a smoke run: tiny batches, one repeat, no warm-up minimum time, where those options are not given (figures are not meaningful)",
    )
    parser.add_argument(
        "--launches", action="store_true",
        help="instead of timing, count the device kernel launches and allocations of a training step and an "
        "inference batch of each model on the stand-in device (no GPU needed; see docs/device-cost.md)",
    )
    parser.add_argument(
        "--json", "--out", dest="json", type=json_report_path, default=Path("benchmark.json"), metavar="PATH.json",
        help="where to write the results as JSON (default: benchmark.json); missing folders are made",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``cnn-backend benchmark ARGV``: the same one-line errors and exit statuses."""
    from .cli import main as command_line

    return command_line(["benchmark", *(sys.argv[1:] if argv is None else argv)])


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the arguments describe, print the table and write the JSON.

    Returns 0, or 1 when writing the JSON fails at the end (the table is printed first). Raises
    OSError when the JSON's folder cannot be written (checked first; exit status 1), and
    DeviceUnavailableError when a device asked for with ``--devices`` is not usable (exit status 2):
    the command line reports both in one line.
    """
    settle_run_length(args)
    # Checked before minutes of measuring, not after: the report would be lost.
    _refuse_an_unwritable_report(Path(args.json))
    _refuse_single_sample_batches_for_batchnorm(args.models, args.train_batch_sizes)
    if args.launches:
        return run_launch_count(args)

    environment = describe_environment()
    for line in environment_warnings(environment, args.threads):
        print(f"warning: {line}", file=sys.stderr)
    threads = args.threads or environment["machine"]["compute_threads"]
    if args.threads:
        limit_blas_threads(args.threads)
        environment["machine"]["compute_threads"] = args.threads
        environment["blas"] = blas_info()
    devices, device_notes = usable_devices(args.devices)
    torch_info, torch = load_torch(args.no_torch, threads)
    print(torch_info["note"])

    peak = {device: measure_gemm_peak(get_backend(device, args.dtype), quick=args.quick) for device in devices}
    results = []
    for device in devices:
        backend = get_backend(device, args.dtype)
        torch_device = torch_device_for(torch, device)
        for model_name in args.models:
            for mode, batch_sizes in (("train", args.train_batch_sizes), ("infer", args.infer_batch_sizes)):
                for batch_size in batch_sizes:
                    rows = measure_configuration(backend, torch, torch_device, model_name, mode, batch_size, args)
                    results += [with_peak_fraction(row, peak[device]) for row in rows]
    memory = None
    if not args.no_memory:
        steps = QUICK_MEMORY_STEPS if args.quick else MEMORY_STEPS
        memory = measure_peak_memory("cpu", "auto", MEMORY_MODEL, MEMORY_BATCH, steps, args.dtype, args.seed)

    report = {
        "settings": {
            "devices": devices,
            "device_notes": device_notes,
            "algorithms": args.algorithms,
            "models": args.models,
            "train_batch_sizes": args.train_batch_sizes,
            "infer_batch_sizes": args.infer_batch_sizes,
            "repeats": args.repeats,
            "warmup_steps": args.warmup,
            "min_repeat_seconds": args.min_time,
            "dtype": args.dtype,
            "seed": args.seed,
            "quick": bool(args.quick),
            "optimizer": {"name": "sgd", "lr": LEARNING_RATE, "momentum": MOMENTUM},
        },
        **environment,
        "torch": torch_info,
        "gemm_peak_flops": peak,
        "gemm_peak_size": peak_gemm_size(args.quick),
        "results": results,
        "peak_memory": memory,
    }
    print(format_table(report))
    return write_report(report, Path(args.json))


def settle_run_length(args: argparse.Namespace) -> None:
    """Give the run-length options not given on the command line --quick's values, or the defaults."""
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def run_launch_count(args: argparse.Namespace) -> int:
    """``--launches``: print the launch table of :mod:`cnn_backend.launches` and write it as JSON."""
    from .launches import format_launch_table, launch_report

    rows = launch_report(
        args.models, args.train_batch_sizes, args.infer_batch_sizes, args.algorithms, args.dtype, args.seed
    )
    print(format_launch_table(rows))
    return write_report({"launches": rows}, Path(args.json))


def write_report(report: dict, path: Path) -> int:
    """Write ``report`` as JSON to ``path`` atomically; 0, or 1 (one line on stderr) when it cannot be."""
    from .cli.console import EXIT_FAILED, EXIT_OK, print_error

    text = json.dumps(report, indent=2) + "\n"
    try:
        write_atomically(path, lambda stream: stream.write(text.encode("utf-8")))
    except FileWriteError as exc:
        # The figures are on stdout already: say so, rather than let them look lost.
        print_error(f"{exc}; the results are in the table above; to keep them as JSON, rerun with --json naming a writable file")
        return EXIT_FAILED
    print(f"results written to {path}")
    return EXIT_OK


def _refuse_an_unwritable_report(path: Path) -> None:
    """OSError (one line; exit status 1, as for any file that cannot be written) when ``path`` cannot
    be written: a file where a folder must be, or a folder this user may not write in. Missing
    folders are fine: they are made when the report is written."""
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {folder} is a file, not a folder; choose another --json PATH.json")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: no permission to write in {folder}; choose another --json PATH.json")


# == what we run on =================================================================================


def _refuse_single_sample_batches_for_batchnorm(models: Sequence[str], train_batch_sizes: Sequence[int]) -> None:
    """ValueError (one line) before measuring when a network with BatchNorm would train on batches
    of one: its statistics need two or more samples."""
    if 1 not in train_batch_sizes:
        return
    named = [name for name in models if has_batchnorm(ARCHITECTURES[name]("cpu", seed=0))]
    if named:
        raise ValueError(
            f"--train-batch-sizes includes 1, but the {', '.join(named)} network{'s have' if len(named) > 1 else ' has'} "
            f"BatchNorm, which cannot take statistics over a single sample; train with batches of 2 or more"
        )


def describe_environment() -> dict:
    """Machine, library versions, BLAS libraries (threadpoolctl) and the OpenBLAS overrides set."""
    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    blas = blas_info()
    blas_threads = [entry["num_threads"] for entry in blas if entry.get("user_api") == "blas"]
    machine = {
        "cpu_model": cpu_model(),
        "logical_cores": cores,
        "usable_cores": usable,
        # What NumPy's matrix products run on: the threads of its BLAS, else every usable core.
        "compute_threads": blas_threads[0] if blas_threads else usable,
        "platform": platform.platform(),
    }
    return {
        "machine": machine,
        "libraries": library_versions(),
        "blas": blas,
        "environment": {name: os.environ.get(name) for name in OPENBLAS_OVERRIDES},
    }


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def library_versions() -> dict:
    versions = {"python": platform.python_version(), "numpy": numpy.__version__}
    for name in ("scipy", "cupy", "torch", "threadpoolctl"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception:  # not installed, or (CuPy) installed without its CUDA libraries
            versions[name] = None
    return versions


def blas_info() -> list[dict]:
    """BLAS/OpenMP libraries loaded in this process, as threadpoolctl reports them ([] without it).

    For OpenBLAS, ``architecture`` names the kernel it selected (e.g. ``SkylakeX``, ``Haswell``, ``Zen``).
    """
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keys = ("user_api", "internal_api", "version", "architecture", "threading_layer", "num_threads", "filepath")
    return [{key: entry.get(key) for key in keys} for entry in threadpool_info()]


def environment_warnings(environment: dict, threads: int | None = None) -> list[str]:
    """What makes this run's figures unrepresentative of the machine, one line each."""
    effects = {
        "OPENBLAS_CORETYPE": "forces that kernel instead of the one OpenBLAS picks for this CPU",
        "OPENBLAS_L2_SIZE": "overrides the cache size OpenBLAS sizes its GEMM blocks for",
    }
    warnings = [
        f"{name}={value} is set: it {effects[name]}, which can make matrix products much slower; "
        f"unset it for representative figures (env -u {name} ...)"
        for name, value in environment["environment"].items()
        if value is not None
    ]
    if not environment["blas"]:
        warnings.append("threadpoolctl is not installed: the BLAS library and its thread count are not reported")
    cores = environment["machine"]["usable_cores"]
    if threads is not None and threads > cores:
        warnings.append(
            f"--threads {threads} is more than the {cores} usable cores: the threads take turns on them, so the figures "
            f"(ours and PyTorch's) do not show this machine's speed; use --threads {cores} or fewer"
        )
    return warnings


def usable_devices(requested: list[str] | None) -> tuple[list[str], dict]:
    """The devices to measure and, for the ones left out, why."""
    notes = {}
    devices = []
    for device in requested or list(BENCH_DEVICES):
        try:
            get_backend(device)
        except DeviceUnavailableError as exc:
            if requested:
                others = [name for name in requested if name != device]
                instead = f"--devices {','.join(others)}" if others else "--devices cpu"
                raise DeviceUnavailableError(f"{exc.reason}; leave {device} out ({instead})", exc.device) from None
            notes[device] = exc.reason  # tried because it might be there, not asked for: why it is not
            continue
        devices.append(device)
    return devices, notes


def limit_blas_threads(threads: int) -> None:
    """Run NumPy's matrix products on ``threads`` threads for the rest of the process."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print(
            "warning: threadpoolctl is not installed, so --threads cannot limit NumPy's BLAS; "
            "set OPENBLAS_NUM_THREADS (or MKL_NUM_THREADS) instead",
            file=sys.stderr,
        )
        return
    threadpool_limits(limits=threads, user_api="blas")


def load_torch(disabled: bool, threads: int):
    """``(info, torch module or None)``; PyTorch runs with ``threads`` CPU threads, as we do."""
    if disabled:
        return {"available": False, "note": "PyTorch comparison: skipped (--no-torch)"}, None
    try:
        import torch
    except ImportError:
        return {"available": False, "note": "PyTorch comparison: skipped (PyTorch is not installed)"}, None
    torch.set_num_threads(threads)
    info = {
        "available": True,
        "version": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": bool(torch.cuda.is_available()),
        "note": f"PyTorch comparison: torch {torch.__version__}, {torch.get_num_threads()} CPU threads",
    }
    return info, torch


def torch_device_for(torch, device: str):
    if torch is None:
        return None
    if device == "cuda":
        return torch.device("cuda") if torch.cuda.is_available() else None
    return torch.device("cpu")


# == timing ==========================================================================================


def synthetic_batches(batch_size: int, seed: int, dtype) -> list[tuple[numpy.ndarray, numpy.ndarray]]:
    """``N_BATCHES`` host batches of uniform images in [0, 1) and labels, from a seeded generator."""
    rng = numpy.random.default_rng(seed)
    return [
        (rng.random((batch_size, *FASHION_MNIST_SHAPE)).astype(dtype), rng.integers(0, NUM_CLASSES, size=batch_size))
        for _ in range(N_BATCHES)
    ]


def our_step_function(backend, model_name: str, algorithm: str, mode: str, batches, seed: int) -> Callable[[int], None]:
    """``step(i)``: one training step (or one forward pass) of our model on batch ``i % N_BATCHES``.

    ``model_name``: a built-in network, or a spec file (see :func:`cnn_backend.spec.build_model`).
    """
    if model_name in ARCHITECTURES:
        model = ARCHITECTURES[model_name](backend, seed=seed, algorithm=algorithm)
    else:
        model = build_model(model_name, FASHION_MNIST_SHAPE, backend, seed, algorithm=algorithm)
    device_batches = [(backend.to_device(x), backend.to_device(y)) for x, y in batches]
    if mode == "infer":
        model.eval()

        def infer(i: int) -> None:
            model.forward(device_batches[i % N_BATCHES][0])

        return infer
    optimizer = SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM, backend=backend)
    # Labels are valid by construction: skip the loss's per-step input checks (device reads).
    loss_fn = SoftmaxCrossEntropy(backend, check_inputs=False)

    def train(i: int) -> None:
        x, y = device_batches[i % N_BATCHES]
        train_step(model, loss_fn, optimizer, x, y)

    return train


def torch_model(torch, model_name: str):
    """The same architectures in PyTorch (its default initialisation: only speed is compared)."""
    nn = torch.nn
    if model_name == "seed":
        return nn.Sequential(nn.Conv2d(1, 1, 6), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(121, 10))
    if model_name == "default":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 48, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(48), nn.ReLU(),
            nn.Flatten(), nn.Linear(48 * 7 * 7, 384), nn.BatchNorm1d(384), nn.ReLU(), nn.Dropout(0.1), nn.Linear(384, 10),
        )  # fmt: skip
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def torch_step_function(torch, device, model_name: str, mode: str, batches, channels_last: bool, dtype):
    torch.manual_seed(0)
    model = torch_model(torch, model_name).to(device=device, dtype=getattr(torch, numpy.dtype(dtype).name))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    device_batches = [
        (torch.from_numpy(x).to(device).contiguous(memory_format=memory_format), torch.from_numpy(y).to(device))
        for x, y in batches
    ]
    if mode == "infer":
        model.eval()

        def infer(i: int) -> None:
            with torch.inference_mode():
                model(device_batches[i % N_BATCHES][0])

        return infer
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train(i: int) -> None:
        x, y = device_batches[i % N_BATCHES]
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    return train


class Timer:
    """Times repeats of a step function: warm-up, then ``steps`` steps between two synchronisations."""

    def __init__(self, step: Callable[[int], None], synchronize: Callable[[], None], batch_size: int) -> None:
        self.step, self.synchronize, self.batch_size = step, synchronize, batch_size
        self.calls = 0
        self.samples_per_second: list[float] = []

    def warm_up(self, steps: int, min_time: float) -> int:
        """Run ``steps`` untimed steps; returns the steps a repeat needs to last ``min_time`` (>= 2)."""
        self._run(max(1, steps))
        seconds = self._run(1)
        return max(2, int(min_time / max(seconds, 1e-9)) + 1)

    def repeat(self, steps: int) -> None:
        # Idle worker threads of the library timed before (OpenBLAS spins ~0.1 s after its last
        # product, OpenMP a little) would compete for the cores: let them go to sleep first.
        time.sleep(PAUSE_SECONDS)
        self.samples_per_second.append(steps * self.batch_size / self._run(steps))

    def _run(self, steps: int) -> float:
        self.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            self.step(self.calls)
            self.calls += 1
        self.synchronize()
        return time.perf_counter() - started

    def median(self) -> float:
        return statistics.median(self.samples_per_second)


def measure_configuration(backend, torch, torch_device, model_name, mode, batch_size, args) -> list[dict]:
    """One result per algorithm for a (device, model, mode, batch size); PyTorch's repeats interleaved."""
    batches = synthetic_batches(batch_size, args.seed, args.dtype)
    timers: dict[str, Timer] = {}
    for algorithm in args.algorithms:
        step = our_step_function(backend, model_name, algorithm, mode, batches, args.seed)
        timers[algorithm] = Timer(step, backend.synchronize, batch_size)
    if torch_device is not None:
        sync = torch.cuda.synchronize if torch_device.type == "cuda" else (lambda: None)
        for layout, channels_last in (("torch_nchw", False), ("torch_channels_last", True)):
            step = torch_step_function(torch, torch_device, model_name, mode, batches, channels_last, args.dtype)
            timers[layout] = Timer(step, sync, batch_size)
    steps = {name: timer.warm_up(args.warmup, args.min_time) for name, timer in timers.items()}
    for _ in range(args.repeats):
        for name, timer in timers.items():
            timer.repeat(steps[name])

    reference = {
        name: timers[name].median() if name in timers else None for name in ("torch_nchw", "torch_channels_last")
    }
    rows = []
    for algorithm in args.algorithms:
        ours = timers[algorithm].median()
        rows.append(
            {
                "device": backend.name,
                "model": model_name,
                "algorithm": algorithm,
                "mode": mode,
                "batch_size": batch_size,
                "samples_per_second": ours,
                "repeats_samples_per_second": timers[algorithm].samples_per_second,
                "steps_per_repeat": steps[algorithm],
                **reference,
                "ratio_to_torch_nchw": ours / reference["torch_nchw"] if reference["torch_nchw"] else None,
                "ratio_to_torch_channels_last": (
                    ours / reference["torch_channels_last"] if reference["torch_channels_last"] else None
                ),
            }
        )
    return rows


# == floating-point work and the machine's peak =======================================================


def model_flops(model, input_shape=FASHION_MNIST_SHAPE) -> dict:
    """Floating-point operations per sample: ``{"infer": ..., "train": ...}``.

    Two per multiply-add of every convolution and dense layer; training adds the weight-gradient
    product of each such layer and the input-gradient product of all but the first (whose input
    gradient is never computed). Element-wise work (pooling, ReLU, the update) is not counted.
    """
    shape = tuple(input_shape)
    forward = backward = 0
    for layer in model.layers:
        if isinstance(layer, Convolution):
            k, s, pad = layer.kernel_size, layer.stride, layer.padding
            out_h, out_w = output_size(shape[1], k, s, pad), output_size(shape[2], k, s, pad)
            macs = layer.out_channels * layer.in_channels * k * k * out_h * out_w
            shape = (layer.out_channels, out_h, out_w)
        elif isinstance(layer, FullyConnected):
            macs = layer.in_features * layer.out_features
            shape = (layer.out_features,)
        else:
            if isinstance(layer, MaxPool):
                shape = (shape[0],) + tuple((size - layer.pool_size) // layer.stride + 1 for size in shape[1:])
            elif len(shape) == 3 and type(layer).__name__ == "Flatten":
                shape = (shape[0] * shape[1] * shape[2],)
            continue
        forward += 2 * macs
        backward += 2 * macs * (2 if layer.needs_input_grad else 1)
    return {"infer": forward, "train": forward + backward}


def peak_gemm_size(quick: bool) -> int:
    """The side of the square product :func:`measure_gemm_peak` times."""
    return PEAK_GEMM_SIZE // 2 if quick else PEAK_GEMM_SIZE


def measure_gemm_peak(backend, quick: bool = False) -> float:
    """The best rate (FLOP/s) of a large square product in the backend's dtype, on all BLAS threads."""
    # --quick: a smaller product, but still one large enough to reach the peak (at 256^3 a first,
    # cold call made every model's share of it read 1,000-2,000%).
    size = peak_gemm_size(quick)
    rng = numpy.random.default_rng(0)
    a, b = (backend.to_device(rng.random((size, size)).astype(backend.dtype)) for _ in range(2))
    a @ b  # untimed: wakes BLAS's threads and the device
    best = float("inf")
    for _ in range(PEAK_GEMM_REPEATS):
        backend.synchronize()
        started = time.perf_counter()
        a @ b  # BLAS's own threads: the peak the machine offers, whoever reaches it
        backend.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / max(best, 1e-9)


def with_peak_fraction(row: dict, peak_flops: float) -> dict:
    """``row`` with its FLOPs per sample, its FLOP/s and that rate's share of ``peak_flops``."""
    model = ARCHITECTURES[row["model"]](get_backend("cpu"), seed=0)
    flops = model_flops(model)[row["mode"]]
    rate = flops * row["samples_per_second"]
    return {**row, "flops_per_sample": flops, "flops_per_second": rate, "fraction_of_gemm_peak": rate / peak_flops}


# == peak memory =====================================================================================


def measure_peak_memory(device, algorithm, model_name, batch_size, steps, dtype, seed) -> dict:
    """Peak resident memory of a training run, measured in a fresh Python process."""
    call = f"_memory_probe({device!r}, {algorithm!r}, {model_name!r}, {batch_size}, {steps}, {dtype!r}, {seed})"
    code = f"import json; from cnn_backend.benchmark import _memory_probe; print(json.dumps({call}))"
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    result = {"device": device, "model": model_name, "algorithm": algorithm, "batch_size": batch_size, "steps": steps}
    if completed.returncode != 0:
        result["error"] = (completed.stderr.strip().splitlines() or ["unknown error"])[-1]
        return result
    result.update(json.loads(completed.stdout.strip().splitlines()[-1]))
    return result


def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far.

    Linux: ``VmHWM`` from /proc/self/status, which starts afresh with the new program. ``ru_maxrss``
    would not: Linux carries it over from the parent at spawn, so a large parent would mask the figure.
    Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _memory_probe(device, algorithm, model_name, batch_size, steps, dtype, seed) -> dict:
    """Runs in the subprocess: the peak RSS after imports, and after ``steps`` training steps."""
    backend = get_backend(device, dtype)
    batches = synthetic_batches(batch_size, seed, dtype)
    baseline = _peak_rss_mib()
    step = our_step_function(backend, model_name, algorithm, "train", batches, seed)
    for i in range(steps):
        step(i)
    backend.synchronize()
    return {"baseline_peak_rss_mib": baseline, "peak_rss_mib": _peak_rss_mib()}


# == output ==========================================================================================


def format_table(report: dict) -> str:
    machine, libraries = report["machine"], report["libraries"]
    lines = [
        f"machine: {machine['cpu_model']}, {machine['usable_cores']} usable cores "
        f"({machine['logical_cores']} logical), {machine['compute_threads']} compute threads",
        "libraries: " + ", ".join(f"{name} {version}" for name, version in libraries.items() if version),
    ]
    for entry in report["blas"]:
        name = " ".join(filter(None, (entry["internal_api"], entry["version"])))
        kernel = f", kernel {entry['architecture']}" if entry.get("architecture") else ""
        lines.append(
            f"{entry['user_api']}: {name} ({Path(entry['filepath'] or '?').name}){kernel}, {entry['num_threads']} threads"
        )
    for device, note in report["settings"]["device_notes"].items():
        lines.append(f"{device}: not measured ({note})")
    for device, peak in report.get("gemm_peak_flops", {}).items():
        size = report.get("gemm_peak_size", PEAK_GEMM_SIZE)
        lines.append(f"{device}: matrix-product peak {peak / 1e9:,.0f} GFLOP/s ({size}^3 product, best of {PEAK_GEMM_REPEATS})")
    header = ("device", "model", "algorithm", "mode", "batch", "samples/s", "range", "of peak",
              "torch NCHW", "ratio", "torch CL", "ratio")  # fmt: skip
    rows = [header]
    for r in report["results"]:
        repeats = r["repeats_samples_per_second"]
        rows.append(
            (
                r["device"], r["model"], r["algorithm"], r["mode"], str(r["batch_size"]),
                _number(r["samples_per_second"]), f"{_number(min(repeats))}-{_number(max(repeats))}",
                f"{100 * r['fraction_of_gemm_peak']:.0f}%" if "fraction_of_gemm_peak" in r else "-",
                _number(r["torch_nchw"]), _ratio(r["ratio_to_torch_nchw"]),
                _number(r["torch_channels_last"]), _ratio(r["ratio_to_torch_channels_last"]),
            )
        )  # fmt: skip
    if not report["torch"]["available"]:
        rows = [row[:8] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        # Figures right-aligned, words left-aligned.
        cells = (cell.rjust(width) if index and cell[:1].isdigit() else cell.ljust(width) for cell, width in zip(row, widths))
        lines.append("  ".join(cells))
    memory = report["peak_memory"]
    if memory:
        where = (
            f"{memory['model']} model, {memory['algorithm']} convolutions, "
            f"batch {memory['batch_size']}, {memory['steps']} steps"
        )
        if "error" in memory:
            lines.append(f"peak memory ({where}): failed: {memory['error']}")
        else:
            lines.append(
                f"peak resident memory, training ({where}): {memory['peak_rss_mib']:.0f} MiB "
                f"({memory['baseline_peak_rss_mib']:.0f} MiB after imports)"
            )
    return "\n".join(lines)


def _number(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


if __name__ == "__main__":
    raise SystemExit(main())
