"""Every name the library takes from ``xp``, ``signal`` and device arrays exists in CuPy.

A workload covering every layer, convolution algorithm, model, the loss, every optimiser option,
the training loop, evaluation, prediction and saving runs on a fresh stand-in device, which records
each name used; the names are then looked up in the installed CuPy (``cupy``, ``cupy.ndarray``) and
among the exports of ``cupyx.scipy.signal`` - read from its source, since importing it needs the CUDA
libraries. Needs CuPy installed, not a GPU.
"""

from __future__ import annotations

import numpy
import pytest

pytest.importorskip(
    "cupy",
    reason="CuPy is not installed, so the names the code uses cannot be checked against it "
    "(pip install 'cnn-backend[cuda12]' or '[cuda13]'; no GPU needed)",
)

from cnn_backend import parity  # noqa: E402  (after the skip: nothing here is useful without CuPy)
from cnn_backend.backend import get_backend  # noqa: E402
from cnn_backend.data import BatchLoader  # noqa: E402
from cnn_backend.layers import (  # noqa: E402
    GELU,
    AvgPool,
    BatchNorm,
    Convolution,
    Dropout,
    Flatten,
    FullyConnected,
    GlobalAvgPool,
    LeakyReLU,
    MaxPool,
    ReLU,
    Residual,
    Sigmoid,
    SoftmaxCrossEntropy,
    Tanh,
)
from cnn_backend.model import Sequential, default_cnn, plain_cnn, seed_cnn  # noqa: E402
from cnn_backend.optim import SGD, Adam  # noqa: E402
from cnn_backend.testing import (  # noqa: E402
    DeviceUsage,
    cupy_signal_exports,
    missing_cupy_names,
    standin_backend,
    standin_only_attributes,
)
from cnn_backend.training import evaluate, fit, train_step  # noqa: E402


def run_workload(tmp_path) -> DeviceUsage:
    """Exercise every device code path of the library on one stand-in device; returns what it used."""
    be = standin_backend("float64")
    rng = numpy.random.default_rng(0)

    # Every layer, forward and backward, in both dtypes.
    for dtype in ("float64", "float32"):
        device = be.with_dtype(dtype)
        layers = [
            Convolution(2, 3, 3, algorithm="gemm", rng=0, backend=device),
            Convolution(2, 3, 3, stride=2, padding=1, algorithm="gemm", rng=0, backend=device),
            Convolution(2, 3, 3, algorithm="signal", rng=0, backend=device),
            Convolution(2, 3, 3, stride=2, padding=1, algorithm="signal", rng=0, backend=device),
            Convolution(2, 3, 3, padding=1, algorithm="auto", rng=0, backend=device),
            ReLU(device),
            MaxPool(2, backend=device),
            MaxPool(3, stride=2, backend=device),
            Flatten(device),
            Dropout(0.5, rng=0, backend=device),
            Convolution(2, 3, 3, bias=False, algorithm="gemm", rng=0, backend=device),
            Convolution(2, 3, 3, bias=False, algorithm="signal", rng=0, backend=device),
            BatchNorm(2, backend=device),
            AvgPool(2, backend=device),
            AvgPool(3, stride=2, backend=device),
            GlobalAvgPool(device),
            LeakyReLU(0.1, backend=device),
            Tanh(device),
            Sigmoid(device),
            GELU(device),
            Residual([Convolution(out_channels=2, kernel_size=3, padding=1, backend=device), BatchNorm(backend=device)]),
            Residual([Convolution(out_channels=4, kernel_size=3, stride=2, padding=1, backend=device), ReLU(device)]),
        ]
        for layer in layers:
            if isinstance(layer, Residual):
                layer.build((2, 9, 9), numpy.random.default_rng(0))
            x = device.to_device(rng.standard_normal((2, 2, 9, 9)).astype(dtype))
            y = layer.forward(x)
            layer.backward(device.xp.ones_like(y))
        # BatchNorm on dense input, and in evaluation mode (running statistics) on a batch of one.
        for shape in ((3, 2), (1, 2, 4, 4)):
            norm = BatchNorm(2, backend=device)
            norm.forward(device.to_device(rng.standard_normal((4,) + shape[1:]).astype(dtype)))
            norm.training = False
            norm.backward(norm.forward(device.to_device(rng.standard_normal(shape).astype(dtype))))
        dense = FullyConnected(6, 4, rng=0, backend=device)
        dense.backward(dense.forward(device.to_device(rng.standard_normal((3, 6)).astype(dtype))))
        dropout = Dropout(0.3, rng=0, backend=device)
        dropout.training = False
        dropout.backward(dropout.forward(device.to_device(rng.standard_normal((3, 6)))))

    # Both models with both algorithms; the loss with its input checks; every optimiser option.
    optimizers = [
        lambda p, d: SGD(p, lr=0.01, backend=d),
        lambda p, d: SGD(p, lr=0.01, momentum=0.9, weight_decay=1e-4, backend=d),
        lambda p, d: SGD(p, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4, backend=d),
        lambda p, d: Adam(p, lr=1e-3, backend=d),
        lambda p, d: Adam(p, lr=1e-3, weight_decay=1e-2, backend=d),
    ]
    x = rng.random((2, 1, 28, 28))
    y = be.to_device(rng.integers(0, 10, size=2))
    for build, algorithm, make_optimizer in [
        (seed_cnn, "gemm", optimizers[0]),
        (seed_cnn, "signal", optimizers[1]),
        (plain_cnn, "gemm", optimizers[2]),
        (plain_cnn, "signal", optimizers[3]),
        (seed_cnn, "auto", optimizers[4]),
        (default_cnn, "gemm", optimizers[4]),
        (default_cnn, "signal", optimizers[2]),
    ]:
        model = build(be, seed=0, algorithm=algorithm)
        optimizer = make_optimizer(model.parameters(), be)
        train_step(model, SoftmaxCrossEntropy(be), optimizer, x, y)
        optimizer.load_state_dict(optimizer.state_dict())
        # The same optimiser over parameters outside the flat buffer: updated one by one.
        make_optimizer(list(reversed(model.parameters())), be).step()
        model.layers[0].params["weight"].detach_from_flat()
        model.flatten_parameters()

    # The training loop over a resident and a streamed loader, with validation; evaluation, prediction.
    images = rng.integers(0, 256, size=(40, 28, 28), dtype=numpy.uint8)
    labels = rng.integers(0, 10, size=40)
    validation = (images[32:, None].astype("float64") / 255, labels[32:])
    for max_device_bytes in (1 << 30, 0):
        model = plain_cnn(be, seed=0, dropout=0.5)
        loader = BatchLoader(images[:32], labels[:32], be, batch_size=16, max_device_bytes=max_device_bytes)
        fit(model, SGD(model.parameters(), lr=0.01, momentum=0.9, backend=be), loader, 1, validation=validation, log_every=1)
    evaluate(model, *validation, batch_size=3)
    model.predict(validation[0], batch_size=3)

    # Saving and loading onto the device; moving a model between devices.
    loaded = Sequential.load(model.save(tmp_path / "model.npz"), be)
    loaded.to(be.with_dtype("float32")).to("cpu").to(be)

    # A network from an architecture file with buffers (BatchNorm) and residual blocks: a training
    # step, evaluation, its summary, saving and loading the buffers onto the device.
    from pathlib import Path

    from cnn_backend.spec import build_model

    resnet = build_model(Path(__file__).resolve().parent.parent / "examples" / "small-resnet.toml", (1, 28, 28), be, seed=0)
    train_step(resnet, SoftmaxCrossEntropy(be, label_smoothing=0.1), Adam(resnet.parameters(), lr=1e-3, backend=be), x, y)
    evaluate(resnet, *validation, batch_size=3, flip_average=True)
    resnet.summary()
    Sequential.load(resnet.save(tmp_path / "resnet.npz"), be).to(be.with_dtype("float32"))

    try:  # augmentation, where this version of the package has it
        from cnn_backend.augment import RandomCropFlip
    except ImportError:
        pass
    else:
        RandomCropFlip(be, padding=2, seed=0)(be.to_device(validation[0]), 1, 1)

    # Colour images, normalised per channel on the device, then augmented.
    from cnn_backend.data import Normalization

    colour = rng.integers(0, 256, size=(8, 3, 6, 5), dtype=numpy.uint8)
    colour_loader = BatchLoader(colour, labels[:8], be, batch_size=4, normalization=Normalization.from_images(colour))
    for x, _ in colour_loader.epoch(0):
        RandomCropFlip(be, padding=1, seed=0)(x, 1, 1)

    # The data-parallel path on the device: packing the gradients, broadcasting the parameters,
    # sharded validation and the per-interval reduction (a two-process communicator whose
    # collectives leave arrays as they are, since one process holds both "ranks" here).
    from cnn_backend.augment import RandomCropFlip
    from cnn_backend.distributed import GradientAverager, SingleProcess, average_buffers, broadcast_parameters

    class TwoProcesses(SingleProcess):
        size = 2

    model = plain_cnn(be, seed=0, dropout=0.5)
    loader = BatchLoader(images[:32], labels[:32], be, batch_size=16, rank=0, size=2)
    fit(model, SGD(model.parameters(), lr=0.01, backend=be), loader, 1, validation=validation, log_every=1,
        communicator=TwoProcesses(), augment=RandomCropFlip(be, seed=0))
    GradientAverager(model, TwoProcesses())(weight=0.5)
    broadcast_parameters(model, TwoProcesses())
    average_buffers(model, TwoProcesses())
    evaluate(model, *validation, batch_size=3, communicator=TwoProcesses())

    # The parity run's own tracing.
    parity.compare(get_backend("cpu", "float64"), be, model="seed", steps=1, batch_size=2)
    return be.usage


@pytest.fixture(scope="module")
def usage(tmp_path_factory) -> DeviceUsage:
    return run_workload(tmp_path_factory.mktemp("cupy-names"))


#: what the NCCL communicator and the device binding take from CuPy (cnn_backend.distributed)
CUDA_NAMES = ("get_current_stream", "Device", "runtime.getDeviceCount", "nccl")
NCCL_NAMES = ("available", "get_unique_id", "NcclCommunicator", "NCCL_SUM", "NCCL_FLOAT32", "NCCL_FLOAT64", "allReduce", "bcast")


def test_the_distributed_path_takes_only_names_cupy_has():
    import importlib
    import importlib.util

    from cnn_backend.testing import _has_dotted

    from cnn_backend.backend import cuda_nccl

    cupy = importlib.import_module("cupy")
    assert isinstance(cuda_nccl().available, bool)  # imported here without CuPy's missing-library warning
    assert [name for name in CUDA_NAMES if not _has_dotted(cupy.cuda, name, "cupy.cuda")] == []
    # Without the NCCL library cupy.cuda.nccl holds only `available`; the names live in CuPy's
    # compiled binding, whose symbol table names every function and method it defines.
    binding = importlib.util.find_spec("cupy_backends.cuda.libs.nccl")
    assert binding is not None and binding.origin, "CuPy's NCCL binding is missing"
    text = open(binding.origin, "rb").read()
    assert [name for name in NCCL_NAMES[1:] if name.encode() not in text] == []


def test_the_workload_used_the_device(usage):
    assert usage.module_names and usage.signal_names and usage.array_attributes
    assert "fftconvolve" in usage.signal_names  # the "signal" convolution algorithm ran


def test_every_xp_name_exists_in_cupy(usage):
    assert missing_cupy_names(usage)["xp"] == [], f"used as xp.<name> but missing from cupy; recorded: {sorted(usage.module_names)}"


def test_every_signal_name_is_exported_by_cupyx_scipy_signal(usage):
    assert missing_cupy_names(usage)["signal"] == [], f"recorded: {sorted(usage.signal_names)}"


def test_every_array_method_and_attribute_exists_on_cupy_ndarray(usage):
    assert missing_cupy_names(usage)["array"] == [], f"recorded: {sorted(usage.array_attributes)}"


def test_every_numpy_function_applied_to_device_arrays_exists_in_cupy(usage):
    # CuPy forwards numpy.<f>(cupy_array) to cupy.<f>, and fails when there is none.
    assert missing_cupy_names(usage)["dispatched"] == [], f"recorded: {sorted(usage.dispatched_names)}"


def test_every_keyword_argument_is_one_cupy_takes(usage):
    assert "out" in usage.keywords["xp.multiply"]  # keywords were recorded
    assert missing_cupy_names(usage)["keywords"] == [], f"recorded: {dict(usage.keywords)}"


def test_every_method_of_objects_xp_returned_exists_in_cupy(usage):
    assert missing_cupy_names(usage)["objects"] == [], f"recorded: {sorted(usage.object_attributes)}"


def test_cupyx_signal_exports_are_read_from_the_package_source():
    exports = cupy_signal_exports()
    assert {"fftconvolve", "correlate", "convolve2d", "czt"} <= exports  # czt arrives by a star import
    assert not any(name.startswith("_") for name in exports)


def test_the_check_reports_names_cupy_lacks():
    usage = DeviceUsage(
        module_names={"matmul", "linalg.norm", "no_such_function", "linalg.no_such_function"},
        signal_names={"fftconvolve", "no_such_filter"},
        array_attributes={"reshape", "get", "no_such_method"},
        dispatched_names={"exp", "no_such_ufunc"},
        object_attributes={"Generator.random", "Generator.no_such_method", "NoSuchType.random"},
    )
    # cupyx.scipy.signal's parameters are read from its source (importing it needs CUDA libraries).
    usage.keywords["signal.fftconvolve"] = {"mode", "axes", "no_such_keyword"}
    assert missing_cupy_names(usage) == {
        "xp": ["linalg.no_such_function", "no_such_function"],
        "signal": ["no_such_filter"],
        "array": ["no_such_method"],
        "dispatched": ["no_such_ufunc"],
        "objects": ["Generator.no_such_method", "NoSuchType.random"],
        "keywords": ["signal.fftconvolve(no_such_keyword=)"],
    }


def _small_device():
    be = standin_backend("float32")
    return be, be.to_device(numpy.arange(12, dtype=numpy.float32).reshape(3, 4))


def test_ufunc_methods_cupy_does_not_implement_are_reported():
    # Every cupy.ufunc has reduce/accumulate/at, but most raise NotImplementedError on the GPU.
    be, a = _small_device()
    xp = be.xp
    xp.maximum.reduce(a, axis=1)  # CuPy reduces only add and multiply
    numpy.maximum.accumulate(a, axis=1)  # forwarded by CuPy to cupy.maximum.accumulate
    xp.add.reduce(a, axis=0)
    xp.add.at(a, be.to_device(numpy.array([0, 0])), 1.0)  # add has a scatter kernel
    xp.maximum.outer(a[0], a[1])
    missing = missing_cupy_names(be.usage)
    assert (missing["xp"], missing["dispatched"]) == (["maximum.reduce"], ["maximum.accumulate"])


def test_keyword_arguments_cupy_refuses_are_reported():
    be, a = _small_device()
    xp = be.xp
    mask, out = a > 4.0, xp.empty_like(a)
    xp.multiply(a, 2.0, out=out, where=mask)  # a CuPy ufunc takes only out, dtype and casting
    xp.sum(a, axis=1, where=mask)  # cupy.sum(a, axis, dtype, out, keepdims): inspect.signature
    a.sum(axis=1, initial=1.0)  # compiled cupy.ndarray.sum: its signature from its docstring
    numpy.sum(a, axis=1, where=mask)  # forwarded to cupy.sum with the same keywords
    # Keywords CuPy takes.
    xp.add(a, 1.0, out=out, dtype=xp.float32, casting="same_kind")
    xp.sum(a, axis=1, keepdims=True)
    a.astype(xp.float64, copy=False)
    assert missing_cupy_names(be.usage)["keywords"] == [
        "ndarray.sum(initial=)",
        "numpy.sum(where=)",
        "xp.multiply(where=)",
        "xp.sum(where=)",
    ]


def test_methods_of_a_random_generator_from_xp_are_checked_on_cupys_generator():
    import cupy

    assert not hasattr(cupy.random.Generator, "permutation") and hasattr(cupy.random.Generator, "random")
    be, _ = _small_device()
    rng = be.xp.random.default_rng(0)
    rng.random(3, dtype=be.xp.float32)
    rng.permutation(5)
    missing = missing_cupy_names(be.usage)
    assert (missing["objects"], missing["keywords"]) == (["Generator.permutation"], [])


def test_standin_arrays_offer_nothing_cupy_arrays_lack():
    # Otherwise code could rely on something (an operator, a conversion) only the stand-in has.
    assert standin_only_attributes() == []
