"""What a training step and an inference batch cost a GPU, counted without one.

Each configuration runs on a fresh stand-in device (:mod:`cnn_backend.testing`), which counts every
device operation that writes device memory (one kernel launch or copy each on a GPU) and the bytes
of the arrays it creates. One step warms up (workspaces, optimiser scratch), the next is counted.
On a GPU a small model's step is bound by launches (each costs microseconds of CPU time whatever its
size), so these counts show what a change costs there: a new per-parameter or per-kernel-offset
operation shows as a jump.

``cnn-backend benchmark --launches`` prints the table; ``tests/test_launches.py`` keeps the counts
under stated bounds.
"""

from __future__ import annotations

from typing import Iterable

import numpy

from .data import FASHION_MNIST_SHAPE, NUM_CLASSES
from .layers import SoftmaxCrossEntropy
from .model import ARCHITECTURES
from .optim import make_optimizer
from .testing import standin_backend
from .training import train_step

#: the optimisers counted, with the settings the benchmark and the training defaults use
OPTIMIZER_SETTINGS = {"sgd": {"lr": 0.01, "momentum": 0.9}, "adam": {"lr": 1e-3}}


def count_launches(
    model_name: str,
    mode: str,
    batch_size: int,
    optimizer: str = "sgd",
    algorithm: str = "gemm",
    dtype: str = "float32",
    seed: int = 0,
    flat: bool = True,
) -> dict:
    """Launches and allocated bytes of one training step (``mode="train"``, with ``optimizer``) or one
    inference batch (``mode="infer"``) of a built-in model on the stand-in device.

    ``flat=False`` takes the parameters out of the model's flat buffer first, so the step runs the
    per-parameter way (each gradient allocated, the optimiser looping over parameters): the
    comparison that shows what the flat buffer saves.
    """
    backend = standin_backend(dtype)
    model = ARCHITECTURES[model_name](backend, seed=seed, algorithm=algorithm)
    # model.parameters() would put detached parameters back into a flat buffer: take them as they are.
    params = [param for _, param in model.named_parameters()]
    if not flat:
        for param in params:
            param.detach_from_flat()
    rng = numpy.random.default_rng(seed)
    x = backend.to_device(rng.random((batch_size, *FASHION_MNIST_SHAPE)).astype(dtype))
    if mode == "infer":
        model.eval()

        def step() -> None:
            model.forward(x)

    elif mode == "train":
        y = backend.to_device(rng.integers(0, NUM_CLASSES, size=batch_size))
        updater = make_optimizer(optimizer, params, backend, **OPTIMIZER_SETTINGS[optimizer])
        # Labels are valid by construction: no per-step input checks (device reads), as in training.
        loss_fn = SoftmaxCrossEntropy(backend, check_inputs=False)

        def step() -> None:
            train_step(model, loss_fn, updater, x, y)

    else:
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
    step()
    backend.usage.reset_counters()
    step()
    usage = backend.usage
    return {
        "model": model_name,
        "mode": mode,
        "batch_size": batch_size,
        "optimizer": optimizer if mode == "train" else None,
        "algorithm": algorithm,
        "dtype": dtype,
        "flat": flat,
        "parameters": len(params),
        "launches": usage.kernel_launches,
        "bytes_allocated": usage.bytes_allocated,
        "device_reads": usage.device_reads,
        "launches_by_name": dict(usage.launches_by_name.most_common()),
    }


def launch_report(
    models: Iterable[str],
    train_batch_sizes: Iterable[int],
    infer_batch_sizes: Iterable[int],
    algorithms: Iterable[str] = ("gemm",),
    dtype: str = "float32",
    seed: int = 0,
) -> list[dict]:
    """One row per model x algorithm x (training step per optimiser, inference batch): the flat
    count, and for training the per-parameter count beside it (``per_parameter_launches``)."""
    rows = []
    for model_name in models:
        for algorithm in algorithms:
            for batch_size in train_batch_sizes:
                for optimizer in OPTIMIZER_SETTINGS:
                    row = count_launches(model_name, "train", batch_size, optimizer, algorithm, dtype, seed)
                    plain = count_launches(model_name, "train", batch_size, optimizer, algorithm, dtype, seed, flat=False)
                    row["per_parameter_launches"] = plain["launches"]
                    row["per_parameter_bytes_allocated"] = plain["bytes_allocated"]
                    rows.append(row)
            for batch_size in infer_batch_sizes:
                rows.append(count_launches(model_name, "infer", batch_size, algorithm=algorithm, dtype=dtype, seed=seed))
    return rows


def format_launch_table(rows: list[dict]) -> str:
    """The rows as a text table (MiB are the step's new device arrays, views excluded)."""
    header = (
        f"{'model':<8} {'algorithm':<9} {'mode':<5} {'batch':>5} {'optimizer':<9} "
        f"{'launches':>8} {'per-param':>9} {'MiB allocated':>13}"
    )
    lines = ["Device work per step on the stand-in device (one launch = one kernel or copy on a GPU)", header]
    for row in rows:
        plain = row.get("per_parameter_launches")
        lines.append(
            f"{row['model']:<8} {row['algorithm']:<9} {row['mode']:<5} {row['batch_size']:>5} "
            f"{row['optimizer'] or '-':<9} {row['launches']:>8} {plain if plain is not None else '-':>9} "
            f"{row['bytes_allocated'] / 2**20:>13.1f}"
        )
    lines.append("per-param: the same step with the parameters outside the flat buffer (updated one by one)")
    return "\n".join(lines)
