"""The default network's matrix products and second convolution beside PyTorch's, on this machine:
where a training step's distance to PyTorch's channels-last mode lies.

* products: the second convolution's and the first dense layer's training-step products at batch
  ``--batch``, each on one thread, NumPy's BLAS against ``torch.mm`` (PyTorch's own BLAS), GFLOP/s;
* convolution: the second convolution forward, and forward + backward (input gradient included),
  ours (the CPU backend, on the batch-innermost input the network hands it) against PyTorch's NCHW
  and channels-last modes, all on the machine's threads, milliseconds.

Medians of ``--repeats`` calls after warm-up, with the range for the convolutions:

    python scripts/torch_layer_times.py --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy  # noqa: E402

from cnn_backend.layers import Convolution, FullyConnected  # noqa: E402
from cnn_backend.model import default_cnn  # noqa: E402

WARMUP = 5


def timings(call, repeats: int) -> list[float]:
    for _ in range(WARMUP):
        call()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def timed_layers() -> tuple[Convolution, FullyConnected]:
    """The default network's second convolution and first dense layer."""
    model = default_cnn("cpu", seed=0)
    convolution = [layer for layer in model.layers if isinstance(layer, Convolution)][1]
    return convolution, next(layer for layer in model.layers if isinstance(layer, FullyConnected))


def product_shapes(batch: int) -> list[tuple[str, int, int, int]]:
    """``(what, m, k, n)`` of the second convolution's and first dense layer's three products."""
    convolution, dense = timed_layers()
    _, height, width = convolution.output_shape
    patch = convolution.in_channels * convolution.kernel_size ** 2
    pixels, filters = height * width * batch, convolution.out_channels
    features, units = dense.in_features, dense.out_features
    return [
        ("convolution 2 forward", filters, patch, pixels),
        ("convolution 2 weight gradient", patch, pixels, filters),
        ("convolution 2 input gradient", patch, filters, pixels),
        ("dense 1 forward", batch, features, units),
        ("dense 1 weight gradient", features, batch, units),
        ("dense 1 input gradient", features, units, batch),
    ]


def compare_products(torch, batch: int, repeats: int) -> None:
    from threadpoolctl import threadpool_limits

    rng = numpy.random.default_rng(0)
    torch.set_num_threads(1)
    print(f"products at batch {batch}, one thread each, GFLOP/s (NumPy's BLAS, torch.mm):")
    with threadpool_limits(1, user_api="blas"):
        for what, m, k, n in product_shapes(batch):
            a, b = rng.standard_normal((m, k), dtype=numpy.float32), rng.standard_normal((k, n), dtype=numpy.float32)
            torch_a, torch_b = torch.from_numpy(a), torch.from_numpy(b)
            flops = 2 * m * k * n
            ours = flops / statistics.median(timings(lambda: a @ b, repeats)) / 1e9
            theirs = flops / statistics.median(timings(lambda: torch_a @ torch_b, repeats)) / 1e9
            print(f"  {what:30} {m:>6} x {k:<6} @ {k:>6} x {n:<6} {ours:6.1f} {theirs:6.1f}")


def describe(seconds: list[float]) -> str:
    milliseconds = [1e3 * value for value in seconds]
    return f"{statistics.median(milliseconds):6.2f} ({min(milliseconds):.2f}-{max(milliseconds):.2f})"


def compare_convolutions(torch, batch: int, repeats: int, threads: int) -> None:
    torch.set_num_threads(threads)
    ours, _ = timed_layers()
    ours.needs_input_grad = True
    channels, filters, size, padding = ours.in_channels, ours.out_channels, ours.kernel_size, ours.padding
    _, height, width = ours.output_shape
    images = numpy.random.default_rng(0).standard_normal((batch, channels, height, width), dtype=numpy.float32)
    # The layer before hands on a batch-innermost array, seen as (N, C, H, W).
    x = numpy.ascontiguousarray(images.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)
    gradient = numpy.ones_like(ours.forward(x))

    def ours_both():
        ours.forward(x)
        ours.backward(gradient)

    rows = [("ours (batch-innermost)", lambda: ours.forward(x), ours_both)]
    for mode, memory_format in (("PyTorch NCHW", torch.contiguous_format), ("PyTorch channels-last", torch.channels_last)):
        layer = torch.nn.Conv2d(channels, filters, size, padding=padding, bias=False).to(memory_format=memory_format)
        inputs = torch.from_numpy(images).to(memory_format=memory_format).requires_grad_()
        upstream = torch.ones(batch, filters, height, width).to(memory_format=memory_format)

        def forward(layer=layer, inputs=inputs):
            with torch.no_grad():
                layer(inputs)

        def both(layer=layer, inputs=inputs, upstream=upstream):
            layer(inputs).backward(upstream)

        rows.append((mode, forward, both))
    print(f"second convolution ({channels} -> {filters}, {size}x{size} on {height}x{width}) at batch {batch}, "
          f"{threads} threads, ms, median (range):")
    for name, forward, both in rows:
        print(f"  {name:24} forward {describe(timings(forward, repeats))}   forward + backward {describe(timings(both, repeats))}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--repeats", type=int, default=40, help="timed calls per figure (default: 40)")
    parser.add_argument("--threads", type=int, default=2, help="threads for the convolutions (default: 2)")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: pip install torch", file=sys.stderr)
        return 2
    compare_products(torch, args.batch, args.repeats)
    compare_convolutions(torch, args.batch, args.repeats, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
