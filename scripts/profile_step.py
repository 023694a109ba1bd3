"""Where a training step (or an inference batch) of any network spends its time: the step's median
and range, samples/s, page faults per step and, with ``--layers``, each layer's forward and backward
milliseconds; with ``--calls``, the CPU backend's products and chunked operations by call site.

Synthetic 28x28 data, Adam (lr 1e-3), the benchmark's warm-up; a built-in name or a spec file:

    python scripts/profile_step.py --model examples/default-bn.toml --batch 64 --layers
    python scripts/profile_step.py --model default --mode infer --batch 256
    python scripts/profile_step.py --model default --batch 64 --calls
    CNN_BACKEND_KEEP_FREED_MEMORY=0 python scripts/profile_step.py --model examples/default-bn.toml

Per-layer times are measured around each layer's call (with a device synchronisation on a GPU), so
their sum comes out slightly above the plain step; the rest is the loss, the optimiser and the
model's bookkeeping. Page faults (Linux, the whole process) count the fresh memory the kernel had
to map in: near zero per step when freed arrays are reused (see ``cnn_backend/allocator.py``).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnn_backend import threads  # noqa: E402
from cnn_backend.backend import DeviceUnavailableError, get_backend  # noqa: E402
from cnn_backend.benchmark import synthetic_batches  # noqa: E402
from cnn_backend.data import FASHION_MNIST_SHAPE  # noqa: E402
from cnn_backend.layers import SoftmaxCrossEntropy  # noqa: E402
from cnn_backend.model import Sequential  # noqa: E402
from cnn_backend.optim import Adam  # noqa: E402
from cnn_backend.spec import SpecError, resolve_spec  # noqa: E402
from cnn_backend.training import train_step  # noqa: E402

TIMED_METHODS = ("forward", "forward_maxpool2x2", "forward_relu", "backward")


def page_faults() -> int | None:
    try:
        import resource
    except ImportError:  # not on this operating system
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_layers(model: Sequential, backend, times: dict) -> None:
    """Wrap each layer's forward/backward so that every call adds its seconds to ``times``."""
    for index, layer in enumerate(model.layers):
        for method in TIMED_METHODS:
            if hasattr(layer, method):
                _wrap(layer, method, (index, "backward" if method == "backward" else "forward"), backend, times)


def _wrap(layer, method: str, key: tuple, backend, times: dict) -> None:
    call = getattr(layer, method)

    def timed(*args, **kwargs):
        backend.synchronize()
        start = time.perf_counter()
        result = call(*args, **kwargs)
        backend.synchronize()
        times[key] += time.perf_counter() - start
        return result

    setattr(layer, method, timed)


def time_hot_operations(times: dict, counts: dict) -> None:
    """Wrap the CPU backend's hot operations (:mod:`cnn_backend.threads`) so that every call adds
    its seconds to ``times`` under its call site: a product by its shape (products run at once by
    all their shapes), a chunked operation by the kernel it runs, each marked "split" when shared
    out over the threads."""

    def wrap(name: str, key) -> None:
        call = getattr(threads, name)

        def timed(*args, **kwargs):
            label = key(*args, **kwargs)
            if label is None:  # timed inside, by the operations it calls
                return call(*args, **kwargs)
            start = time.perf_counter()
            result = call(*args, **kwargs)
            times[label] += time.perf_counter() - start
            counts[label] += 1
            return result

        setattr(threads, name, timed)

    def product(a, b, out=None):
        (m, k), n = a.shape, b.shape[1]
        return f"matmul {m}x{k} @ {k}x{n}{', split' if threads.product_split(m, k, n) > 1 else ''}"

    def chunks(kernel, arrays, axis=0):
        split = threads._splittable(arrays[0].shape[axis], max(array.size for array in arrays))
        return f"map_chunks {_site(kernel)}{', split' if split else ''}"

    def parts(kernel, length, size):
        split = threads._splittable(length, size, threads.MIN_SPLIT_COPY_ELEMENTS)
        return f"map_range {_site(kernel)}{', split' if split else ''}"

    def products(products):
        # Products run one by one are timed as matmul calls, each by its own shape.
        if not threads.products_at_once(products):
            return None
        return "matmuls " + " and ".join(f"{a.shape[0]}x{a.shape[1]} @ {b.shape[0]}x{b.shape[1]}" for a, b, _ in products) + ", at once"

    wrap("matmul", product)
    wrap("matmuls", products)
    wrap("map_chunks", chunks)
    wrap("map_range", parts)


def _site(kernel) -> str:
    """``function.kernel`` for a kernel defined inside a function of cnn_backend.functional."""
    return getattr(kernel, "__qualname__", repr(kernel)).replace(".<locals>", "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--model", default="default", help="a built-in name (seed, default) or a .toml/.json spec file (default: default)")
    parser.add_argument("--mode", choices=("train", "infer"), default="train", help="a training step or an inference batch (default: train)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps (default: 60)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default: cpu)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="float dtype (default: float32)")
    parser.add_argument("--layers", action="store_true", help="also time each layer's forward and backward")
    parser.add_argument(
        "--calls", action="store_true",
        help="also time the CPU backend's hot operations by call site (products by shape, chunked kernels by name)",
    )
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.calls and args.device != "cpu":
        parser.error("--calls times the CPU backend's operations: use it with --device cpu")
    try:
        backend = get_backend(args.device, args.dtype)
        label, spec = resolve_spec(args.model)
        model = Sequential.from_spec(spec, FASHION_MNIST_SHAPE, backend=backend, seed=0)
    except (DeviceUnavailableError, SpecError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    batches = [(backend.to_device(x), backend.to_device(y)) for x, y in synthetic_batches(args.batch, 0, backend.dtype)]
    optimizer = Adam(model.parameters(), lr=1e-3, backend=backend)
    loss_fn = SoftmaxCrossEntropy(backend, check_inputs=False)
    if args.mode == "infer":
        model.eval()

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        if args.mode == "infer":
            model.forward(x)
        else:
            train_step(model, loss_fn, optimizer, x, y)

    for i in range(args.warmup):
        step(i)
    layer_times: dict = collections.defaultdict(float)
    if args.layers:
        time_layers(model, backend, layer_times)
    call_times: dict = collections.defaultdict(float)
    call_counts: dict = collections.defaultdict(int)
    if args.calls:
        time_hot_operations(call_times, call_counts)
    seconds, faults_before = [], page_faults()
    for i in range(args.steps):
        backend.synchronize()
        start = time.perf_counter()
        step(i)
        backend.synchronize()
        seconds.append(time.perf_counter() - start)
    faults_after = page_faults()
    median = statistics.median(seconds)
    faults = "" if faults_before is None else f", {(faults_after - faults_before) / args.steps:,.1f} page faults per step"
    mode = "training step" if args.mode == "train" else "inference batch"
    print(
        f"{label}, {mode} of {args.batch}, {args.device} {args.dtype}: {median * 1e3:.2f} ms "
        f"(median of {args.steps}; {min(seconds) * 1e3:.2f}-{max(seconds) * 1e3:.2f}), {args.batch / median:,.0f} samples/s{faults}"
    )
    if args.layers:
        print(f"{'layer':<28} {'forward ms':>11} {'backward ms':>12}")
        for index, layer in enumerate(model.layers):
            name = f"{index:>2} {type(layer).__name__}"
            forward, backward = (layer_times.get((index, part), 0.0) * 1e3 / args.steps for part in ("forward", "backward"))
            print(f"{name:<28} {forward:>11.2f} {backward:>12.2f}")
        total = sum(layer_times.values()) * 1e3 / args.steps
        print(f"{'layers in all':<28} {total:>24.2f}   (the rest of the step: {median * 1e3 - total:.2f})")
    if args.calls:
        print(f"{'ms per step':>11} {'calls':>5}  operation")
        for label in sorted(call_times, key=call_times.get, reverse=True):
            print(f"{call_times[label] * 1e3 / args.steps:>11.3f} {call_counts[label] / args.steps:>5.0f}  {label}")
        total = sum(call_times.values()) * 1e3 / args.steps
        print(f"{total:>11.3f}        in these operations (the rest of the step: {median * 1e3 - total:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
