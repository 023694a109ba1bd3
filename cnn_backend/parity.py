"""CPU/device parity: train one seeded model on the CPU and on a device side by side and compare.

Both models start from bit-identical weights (drawn on the host from the same seed) and see the same
host batches. After every step the activations, gradients and updated weights of every layer are
read back and compared, so a divergence is reported at the step and layer where it first appears::

    cnn-backend parity --model default --steps 20 --conv-algorithm signal
    python scripts/parity.py --dtype float64

Exit status: 0 when every difference is within the tolerance, 1 when one is not (or a device result
has the wrong dtype, shape or array type, or the device's training diverges while the CPU's does
not), 2 when the device is unavailable or the run cannot be set up (a bad option, a network without
10 outputs, a learning rate at which the CPU's training itself diverges; one line says why).

Differences are measured per tensor: ``max abs`` is ``max |device - cpu|`` and ``max rel`` is that
divided by ``max |cpu|``, so entries that cancel to almost zero do not inflate it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy

from . import backend as backend_module
from .backend import Backend
from .data import FASHION_MNIST_SHAPE, NUM_CLASSES
from .layers import SoftmaxCrossEntropy
from .layers.loss import NonFiniteLogitsError
from .model import ARCHITECTURES, Sequential
from .optim import OPTIMIZERS, Optimizer, make_optimizer
from .training import OPTIMIZER_DEFAULTS, refuse_batches_batchnorm_cannot_take

DEVICES = ("cuda", "standin")
DATA_SOURCES = ("synthetic", "bundled")
OPTIMIZER_NAMES = tuple(OPTIMIZERS)
CONV_CHOICES = ("auto", "gemm", "signal")

#: Largest normwise relative difference accepted after up to a few dozen steps. Rounding differs
#: between devices (reduction order, FFT library) and compounds through the updates, so these are
#: looser than the per-operation tolerances of the parity test suite.
DEFAULT_TOLERANCE = {"float64": 1e-9, "float32": 1e-4}

#: The report's columns: what is compared for every layer at every step.
QUANTITIES = ("activation", "gradient", "weight")

#: Layers whose input gradient is routed by a comparison (the window's maximum, the sign): where two
#: candidates lie within rounding of each other, two devices may choose differently and the runs part.
ROUTING_LAYERS = ("MaxPool", "ReLU", "LeakyReLU")
ROUTING_HINT = (
    "likely a max-pool or ReLU routing a gradient differently between candidates within float32 rounding of each other "
    "(real images' flat backgrounds make such near ties common): rerun with --dtype float64 to tell it from a device fault"
)
#: said when a layer's weights part while every gradient of that step agreed
UPDATE_HINT = (
    "the weights parted while the gradients agreed: an update that divides by the gradients' size (Adam) turns float32 "
    "rounding of a near-zero gradient into a step the size of the learning rate; rerun with --dtype float64 or "
    "--optimizer sgd to tell it from a device fault"
)


@dataclass(frozen=True)
class Difference:
    """How far the device is from the CPU for one tensor (or the loss) at one step."""

    step: int
    layer: str
    quantity: str  # "activation", "gradient", "weight" or "loss"
    name: str  # the tensor: "output", "input", "weight", "bias", "loss"
    max_abs: float
    max_rel: float


@dataclass
class ParityReport:
    """Every difference of a side-by-side run, the tolerance, and any structural problem found."""

    reference: str
    device: str
    dtype: str
    tolerance: float
    steps: int
    description: str = ""
    differences: list[Difference] = field(default_factory=list)
    #: wrong dtype, shape or array type of a device result (e.g. a silent fall-back to NumPy)
    problems: list[str] = field(default_factory=list)

    @property
    def largest(self) -> Difference | None:
        """The difference with the largest relative value (None for an empty report)."""
        return max(self.differences, key=lambda d: (d.max_rel, d.max_abs), default=None)

    @property
    def passed(self) -> bool:
        return not self.problems and all(d.max_rel <= self.tolerance for d in self.differences)

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"

    def first_failure(self) -> Difference | None:
        """The earliest difference beyond the tolerance, in step and layer order."""
        return next((d for d in self.differences if not d.max_rel <= self.tolerance), None)

    def table(self) -> str:
        """One row per step and layer: max abs / max rel of its activations, gradients and weights.

        The loss appears as its own row under "activation"; a layer's gradient column covers its
        input gradient and all its parameter gradients.
        """
        cell_width = 21
        lines = [
            (f"{'step':>4}  {'layer':<18}" + "".join(f"  {q:^{cell_width}}" for q in QUANTITIES)).rstrip(),
            f"{'':>4}  {'':<18}" + f"  {'max abs':>10} {'max rel':>10}" * len(QUANTITIES),
        ]
        rows: dict[tuple[int, str], dict[str, tuple[float, float]]] = {}
        for d in self.differences:
            quantity = "activation" if d.quantity == "loss" else d.quantity
            cell = rows.setdefault((d.step, d.layer), {})
            previous = cell.get(quantity, (0.0, 0.0))
            cell[quantity] = (max(previous[0], d.max_abs), max(previous[1], d.max_rel))
        for (step, layer), cell in rows.items():
            columns = "".join(
                f"  {cell[q][0]:>10.2e} {cell[q][1]:>10.2e}" if q in cell else f"  {'-':>10} {'-':>10}" for q in QUANTITIES
            )
            lines.append(f"{step:>4}  {layer:<18}{columns}")
        return "\n".join(lines)

    def summary(self) -> str:
        """The verdict in one line."""
        largest = self.largest
        if self.problems:
            return f"verdict: FAIL ({len(self.problems)} problem(s); first: {self.problems[0]})"
        if largest is None:
            return "verdict: FAIL (nothing was compared)"
        if largest.max_abs == 0.0:
            worst = "identical results at every step"
        else:
            worst = f"largest relative difference {largest.max_rel:.2e} at step {largest.step}, {largest.layer} {largest.name}"
        if self.passed:
            return f"verdict: PASS ({worst}; tolerance {self.tolerance:.0e})"
        first = self.first_failure()
        hint = ""
        if self.dtype == "float32" and _routed_gradient(first):
            hint = f"; {ROUTING_HINT}"
        elif self.dtype == "float32" and first.quantity == "weight" and self._gradients_agree(first.step):
            hint = f"; {UPDATE_HINT}"
        return (
            f"verdict: FAIL (first beyond tolerance {self.tolerance:.0e}: step {first.step}, {first.layer} "
            f"{first.quantity} {first.name}, relative difference {first.max_rel:.2e}; {worst}){hint}"
        )

    def _gradients_agree(self, step: int) -> bool:
        return all(d.max_rel <= self.tolerance for d in self.differences if d.step == step and d.quantity == "gradient")

    def format(self) -> str:
        parts = [self.description] if self.description else []
        parts.append(self.table())
        shown = 10
        parts += [f"problem: {problem}" for problem in self.problems[:shown]]
        if len(self.problems) > shown:
            parts.append(f"... and {len(self.problems) - shown} more problems")
        parts.append(self.summary())
        return "\n".join(parts)


def _routed_gradient(difference: Difference) -> bool:
    """Whether ``difference`` is the input gradient of a layer that routes it by a comparison: with
    every earlier tensor within tolerance, a near tie decided differently is the likely cause."""
    kind = difference.layer.partition(" ")[2]  # "4 MaxPool": the index, then the class name
    return difference.quantity == "gradient" and difference.name == "input" and kind in ROUTING_LAYERS


def tensor_difference(reference, device, scale: float | None = None) -> tuple[float, float]:
    """``(max |device - reference|, that / max |reference|)`` of two host arrays; inf when they cannot match.

    ``scale``, when given, divides instead of ``max |reference|`` (which it must not be below).
    """
    reference = numpy.asarray(reference, dtype=numpy.float64)
    device = numpy.asarray(device, dtype=numpy.float64)
    if reference.shape != device.shape:
        return math.inf, math.inf
    if reference.size == 0:
        return 0.0, 0.0
    reference_nan, device_nan = numpy.isnan(reference), numpy.isnan(device)
    if (reference_nan != device_nan).any():
        return math.inf, math.inf
    finite = ~reference_nan
    with numpy.errstate(invalid="ignore"):  # inf - inf where both overflowed alike
        gap = numpy.abs(device[finite] - reference[finite])
    gap[numpy.isnan(gap)] = 0.0
    max_abs = float(gap.max()) if gap.size else 0.0
    if scale is None:
        scale = float(numpy.abs(reference[finite]).max()) if gap.size else 0.0
    if max_abs == 0.0:
        return 0.0, 0.0
    return max_abs, (max_abs / scale if scale > 0 else math.inf)


# --------------------------------------------------------------------------------------------------
# One traced step
# --------------------------------------------------------------------------------------------------


def _layer_label(index: int, layer) -> str:
    return f"{index} {type(layer).__name__}"


def traced_step(model: Sequential, loss_fn: SoftmaxCrossEntropy, optimizer: Optimizer, x, y) -> list[tuple[str, str, str, object]]:
    """One training step that keeps every intermediate: ``(layer, quantity, name, device array)``.

    Runs the layers one by one (as :meth:`Sequential.forward`/``backward`` do) so each layer's
    output, input gradient, parameter gradients and updated parameters can be compared.
    """
    be = model.backend
    model.train()
    trace: list[tuple[str, str, str, object]] = []
    h = be.to_device(x)
    if h.dtype != be.dtype:
        h = h.astype(be.dtype)
    for index, layer in enumerate(model.layers):
        with _named(index, layer, "forward"):
            h = layer.forward(h)
        trace.append((_layer_label(index, layer), "activation", "output", h))
    loss = loss_fn.forward(h, be.to_device(y))
    trace.append(("loss", "loss", "loss", loss))
    grad = loss_fn.backward()
    for index in reversed(range(len(model.layers))):
        layer = model.layers[index]
        with _named(index, layer, "backward"):
            grad = layer.backward(grad)
        label = _layer_label(index, layer)
        for name, param in layer.named_parameters():
            trace.append((label, "gradient", name, param.grad))
        if grad is not None:
            trace.append((label, "gradient", "input", grad))
    optimizer.step()
    for index, layer in enumerate(model.layers):
        for name, param in layer.named_parameters():
            trace.append((_layer_label(index, layer), "weight", name, param.data))
        for name, value in layer.named_buffers():  # BatchNorm's running statistics, compared with the weights
            trace.append((_layer_label(index, layer), "weight", name, value))
    return trace


class DeviceBoundaryError(ValueError):
    """A layer that let a host array into the device's work (a buffer made with NumPy, not sent
    with ``to_device``): the stand-in device refuses it where CuPy would; named by layer."""


@contextlib.contextmanager
def _named(index: int, layer, phase: str):
    from .testing import HostArrayError

    try:
        yield
    except HostArrayError as exc:
        raise DeviceBoundaryError(f"{_layer_label(index, layer)}: {phase} {' '.join(str(exc).split())}") from None


#: the trace's names of tensors compared on their own; every other name is a parameter or buffer
TENSOR_NAMES = ("output", "input", "loss")


def _layer_state_scales(trace, values) -> dict:
    """``{(layer, quantity): max |value|}`` over each layer's parameters (or their gradients) and
    buffers: the scale a parameter's difference is measured against, normwise over the layer.

    A dense layer's bias before a BatchNorm is cancelled by the normalisation, so its gradient is
    rounding noise only; measured against its own size it would differ between devices by 100%.
    """
    scales: dict = {}
    for (layer, quantity, name, _), value in zip(trace, values):
        if name in TENSOR_NAMES or value.size == 0:
            continue
        finite = numpy.abs(value[numpy.isfinite(value)])
        if finite.size:
            scales[layer, quantity] = max(scales.get((layer, quantity), 0.0), float(finite.max()))
    return scales


def _check_device_array(value, device: Backend, dtype: numpy.dtype, where: str) -> str | None:
    if not isinstance(value, device.xp.ndarray):
        return f"{where}: expected a {device.name} array, got {type(value).__module__}.{type(value).__name__}"
    if value.dtype != dtype and value.dtype.kind == "f":  # integer and boolean buffers (counters, flags) keep their own
        return f"{where}: dtype {value.dtype} on {device.name}, expected {dtype}"
    return None


class TrainingDivergedError(ValueError):
    """The reference (CPU) training itself diverged: the options, not a device, are at fault."""


def compare_models(
    reference_model: Sequential,
    device_model: Sequential,
    batches: Iterable[tuple[numpy.ndarray, numpy.ndarray]],
    make_optimizer: Callable[[Sequential], Optimizer],
    tolerance: float | None = None,
    description: str = "",
) -> ParityReport:
    """Train both models on the same host ``batches`` and compare them after every step."""
    reference, device = reference_model.backend, device_model.backend
    if reference.dtype != device.dtype:
        raise ValueError(f"the models differ in dtype: {reference.dtype.name} and {device.dtype.name}")
    dtype = device.dtype
    report = ParityReport(
        reference.name,
        device.name,
        dtype.name,
        DEFAULT_TOLERANCE[dtype.name] if tolerance is None else float(tolerance),
        0,
        description,
    )
    runs = [(model, SoftmaxCrossEntropy(model.backend), make_optimizer(model)) for model in (reference_model, device_model)]
    for step, (x, y) in enumerate(batches, start=1):
        # Overflow on the way to non-finite logits is reported once, as the divergence below.
        with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                reference_trace = traced_step(*runs[0], x, y)
            except NonFiniteLogitsError:
                raise TrainingDivergedError(
                    f"parity: training diverged on the {reference.name} at step {step} (its logits became NaN or infinity), "
                    f"so there is nothing to compare; use a lower --lr (now {runs[0][2].lr:g}) or fewer --steps"
                ) from None
            try:
                device_trace = traced_step(*runs[1], x, y)
            except (DeviceBoundaryError, NonFiniteLogitsError) as exc:  # what CuPy would refuse, or the device alone diverging: a verdict
                problem = exc if isinstance(exc, DeviceBoundaryError) else (
                    f"the {device.name} logits became NaN or infinity while the {reference.name} ones stayed finite"
                )
                report.problems.append(f"step {step}: {problem}")
                report.steps = step
                break
        expected_values = [reference.to_numpy(expected) for _, _, _, expected in reference_trace]
        scales = _layer_state_scales(reference_trace, expected_values)
        for (layer, quantity, name, _), expected, (_, _, _, actual) in zip(reference_trace, expected_values, device_trace):
            problem = _check_device_array(actual, device, dtype, f"step {step}, {layer} {quantity} {name}")
            if problem:
                report.problems.append(problem)
            max_abs, max_rel = tensor_difference(expected, device.to_numpy(actual), scales.get((layer, quantity)) if name not in TENSOR_NAMES else None)
            report.differences.append(Difference(step, layer, quantity, name, max_abs, max_rel))
        report.steps = step
    return report


# --------------------------------------------------------------------------------------------------
# Building a run
# --------------------------------------------------------------------------------------------------


def host_batches(data: str, steps: int, batch_size: int, dtype, seed: int = 0) -> list[tuple[numpy.ndarray, numpy.ndarray]]:
    """``steps`` host batches ``(images (B, 1, 28, 28) in [0, 1], int64 labels)``.

    ``synthetic``: seeded uniform noise and labels (no files needed); ``bundled``: the bundled
    Fashion-MNIST subset, in order, wrapping around when it runs out.
    """
    count = steps * batch_size
    if data == "synthetic":
        rng = numpy.random.default_rng(seed)
        images = rng.random((count, *FASHION_MNIST_SHAPE)).astype(dtype)
        labels = rng.integers(0, NUM_CLASSES, size=count, dtype=numpy.int64)
    elif data == "bundled":
        from .data import load_fashion_mnist, prepare_images

        all_images, all_labels = load_fashion_mnist("train", "bundled")
        index = numpy.arange(count) % len(all_images)
        images = prepare_images(all_images[index], dtype)
        labels = all_labels[index].astype(numpy.int64)
    else:
        raise ValueError(f"data must be one of {', '.join(DATA_SOURCES)}, got {data!r}")
    return [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, count, batch_size)]


def optimizer_factory(name: str, lr: float | None = None, momentum: float = 0.9, weight_decay: float = 0.0):
    """A function building the named optimiser for a model (same hyper-parameters on every device).

    ``lr`` defaults to the optimiser's usual rate; ``momentum`` applies to SGD.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_NAMES)}, got {name!r}")
    config = {"lr": OPTIMIZER_DEFAULTS[name]["lr"] if lr is None else lr, "weight_decay": weight_decay}
    if name == "sgd":
        config["momentum"] = momentum
    return lambda model: make_optimizer(name, model.parameters(), model.backend, **config)


def compare(
    reference: Backend,
    device: Backend,
    *,
    model: str = "seed",
    steps: int = 20,
    batch_size: int = 32,
    conv_algorithm: str = "auto",
    seed: int = 0,
    data: str = "synthetic",
    optimizer: str = "sgd",
    lr: float | None = None,
    tolerance: float | None = None,
) -> ParityReport:
    """Train the seeded ``model`` for ``steps`` steps on ``reference`` and on ``device``; compare every step.

    Both backends must have the same dtype.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch size must be >= 1, got {steps} and {batch_size}")
    if model in ARCHITECTURES:
        build = ARCHITECTURES[model]
        models = [build(be, seed=seed, algorithm=conv_algorithm) for be in (reference, device)]
    elif str(model).endswith((".toml", ".json")):
        from .spec import SpecError, build_model

        algorithm = None if conv_algorithm == "auto" else conv_algorithm
        try:
            models = [build_model(model, FASHION_MNIST_SHAPE, be, seed, algorithm=algorithm) for be in (reference, device)]
        except SpecError as exc:  # named by its file once
            raise SpecError(str(exc) if str(exc).startswith(str(model)) else f"{model}: {exc}") from None
    else:
        raise ValueError(f"model must be one of {', '.join(ARCHITECTURES)} or an architecture file (.toml, .json), got {model!r}")
    _refuse_a_model_the_data_cannot_train(models[0], model, batch_size)
    batches = host_batches(data, steps, batch_size, device.dtype, seed)
    description = (
        f"parity: {model} model, {device.dtype.name}, convolution {conv_algorithm}, {optimizer}, "
        f"{steps} steps of {batch_size} {data} images, {reference.name} vs {device.name}"
    )
    report = compare_models(*models, batches, optimizer_factory(optimizer, lr), tolerance, description)
    report.problems += _names_cupy_lacks(device)
    return report


def _names_cupy_lacks(device: Backend) -> list[str]:
    """On the stand-in device, a problem for each name the run used that CuPy lacks or refuses (a
    layer of one's own calling ``xp.errstate``, say): values that agree on the stand-in say nothing
    of a GPU where the layer would not run. None where CuPy is not installed to check against."""
    usage = getattr(device, "usage", None)
    if usage is None:
        return []
    from .testing import missing_cupy_names

    try:
        missing = missing_cupy_names(usage)
    except ImportError:
        return []
    return [f"the {device.name} run used {kind} {name}, which CuPy lacks or refuses" for kind, names in missing.items() for name in names]


def _refuse_a_model_the_data_cannot_train(network: Sequential, name: str, batch_size: int) -> None:
    """ValueError (one line, what to do) before any step, instead of the loss's or BatchNorm's
    complaint from inside the first one."""
    outputs = network.output_shape[0]
    if outputs != NUM_CLASSES:
        raise ValueError(
            f"{name}: the network has {outputs} outputs, but parity trains on Fashion-MNIST-like data "
            f"(--data synthetic or bundled) with {NUM_CLASSES} classes; give its last layer {NUM_CLASSES} outputs "
            f"(out_features = {NUM_CLASSES})"
        )
    refuse_batches_batchnorm_cannot_take(batch_size, 1, network)  # train's rule, for one process


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def device_backend(name: str, dtype) -> Backend:
    """The backend to compare against the CPU; raises DeviceUnavailableError when it cannot be had."""
    if name == "standin":
        from .testing import standin_backend

        return standin_backend(dtype)
    try:
        return backend_module.get_backend(name, dtype)
    except backend_module.DeviceUnavailableError as exc:
        raise backend_module.DeviceUnavailableError(
            f"{exc.reason}; `--device standin` checks the comparison and the device boundary without a GPU", exc.device
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``parity`` command's options."""
    # Imported here: the command line's package loads this module only when the command is run.
    from .cli.arguments import add_import_option, learning_rate, non_negative_int, positive_float, positive_int

    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cuda",
        help="device compared against the CPU (default: cuda); 'standin' is the CPU stand-in for the "
        "device boundary, which checks the comparison and host-array leaks without a GPU",
    )
    parser.add_argument("--model", default="seed", metavar="seed|default|plain|FILE",
                        help="a built-in architecture or an architecture file (.toml, .json) for 28x28 images (default: seed)")
    add_import_option(parser)
    parser.add_argument("--steps", type=positive_int, default=20, help="training steps to compare (default: 20)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per step (default: 32)")
    parser.add_argument("--dtype", choices=backend_module.DTYPES, default="float32", help="float dtype (default: float32)")
    parser.add_argument("--conv-algorithm", choices=CONV_CHOICES, default="auto", help="convolution algorithm (default: auto)")
    parser.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="sgd", help="sgd (momentum 0.9) or adam (default: sgd)")
    parser.add_argument("--lr", type=learning_rate, default=None, help="learning rate (default: 0.01 for sgd, 0.001 for adam)")
    parser.add_argument("--data", choices=DATA_SOURCES, default="synthetic", help="batches from seeded noise or the bundled subset (default: synthetic)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the weights and the synthetic data (default: 0)")
    parser.add_argument(
        "--tolerance",
        type=positive_float,
        default=None,
        help="largest relative difference accepted (default: 1e-4 for float32, 1e-9 for float64)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the verdict line")


def run(args: argparse.Namespace) -> int:
    """Run the comparison the arguments describe; returns the exit status (0 pass, 1 fail).

    Raises DeviceUnavailableError without the device, and ValueError for a model the run cannot
    train: the command line reports both in one line, exit status 2.
    """
    device = device_backend(args.device, args.dtype)
    reference = backend_module.get_backend("cpu", args.dtype)
    report = compare(
        reference,
        device,
        model=args.model,
        steps=args.steps,
        batch_size=args.batch_size,
        conv_algorithm=args.conv_algorithm,
        seed=args.seed,
        data=args.data,
        optimizer=args.optimizer,
        lr=args.lr,
        tolerance=args.tolerance,
    )
    print(report.summary() if args.quiet else report.format())
    return 0 if report.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``cnn-backend parity ARGV``: the same one-line errors and exit statuses."""
    from .cli import main as command_line

    return command_line(["parity", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
