"""The CPU stand-in for the device boundary: it refuses host arrays exactly where CuPy does (or more
strictly), and the whole library - training step, evaluation, saving, checkpoints, the batch loader,
augmentation and the command line - runs on it, so a host array leaking into the device path fails
here, on machines without a GPU."""

from __future__ import annotations

import numpy
import pytest
import scipy.signal

from cnn_backend.backend import Backend, cpu_backend, get_backend
from cnn_backend.data import BatchLoader
from cnn_backend.layers import FullyConnected, Layer, SoftmaxCrossEntropy
from cnn_backend.model import Sequential, plain_cnn, seed_cnn
from cnn_backend.optim import SGD, Adam
from cnn_backend.testing import DeviceArray, HostArrayError, StandinBackend, standin_backend
from cnn_backend.training import evaluate, fit, train_step


def optional_module(name: str):
    """Import a module of the package that may not exist in every version of it."""
    return pytest.importorskip(name, reason=f"{name} is not part of this version of the package")


@pytest.fixture
def arrays(standin):
    """A float32 device array ``(3, 4)`` and the host array it came from."""
    host = numpy.arange(12, dtype=numpy.float32).reshape(3, 4)
    return standin.to_device(host), host


# --------------------------------------------------------------------------------------------------
# The boundary: what must fail
# --------------------------------------------------------------------------------------------------


def test_implicit_conversion_to_numpy_raises(arrays):
    device, _ = arrays
    for convert in (numpy.asarray, numpy.array, numpy.ascontiguousarray, lambda a: numpy.asarray(a, dtype=float)):
        with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
            convert(device)
    with pytest.raises(TypeError):
        memoryview(device)
    # NumPy must not find a way around __array__ either.
    assert not hasattr(device, "__array_interface__") and not hasattr(device, "__array_struct__")


@pytest.mark.parametrize(
    "mix",
    [
        lambda d, h: d + h,
        lambda d, h: h + d,
        lambda d, h: d * h,
        lambda d, h: h @ d.T,
        lambda d, h: d == h,
        lambda d, h: d + numpy.asarray(1.0),  # even a 0-d NumPy array, as CuPy
        lambda d, h: numpy.add(d, h),
        lambda d, h: numpy.concatenate([d, h]),
    ],
    ids=["device+host", "host+device", "multiply", "host@device", "compare", "0-d host", "numpy.add", "numpy.concatenate"],
)
def test_mixing_device_and_host_arrays_raises(arrays, mix):
    device, host = arrays
    with pytest.raises(TypeError):
        mix(device, host)


def test_device_functions_refuse_host_arrays(standin, arrays):
    device, host = arrays
    xp = standin.xp
    with pytest.raises(HostArrayError, match="xp.concatenate"):
        xp.concatenate([device, host])
    with pytest.raises(HostArrayError):
        xp.matmul(device, host.T)
    with pytest.raises(HostArrayError):
        xp.maximum(host, 0)
    with pytest.raises(HostArrayError):
        device.take(numpy.array([0, 1]), axis=0)


def test_inplace_updates_with_host_arrays_raise(arrays):
    device, host = arrays
    with pytest.raises(HostArrayError):
        device += host
    with pytest.raises(TypeError):
        host_copy = host.copy()
        host_copy += device  # NumPy asks the device array, which refuses


def test_scipy_on_device_arrays_raises(standin, arrays):
    device, _ = arrays
    with pytest.raises(TypeError, match="Implicit conversion"):
        scipy.signal.fftconvolve(device, device, mode="same", axes=(-2, -1))
    with pytest.raises(HostArrayError):
        standin.signal.fftconvolve(device, numpy.ones((2, 2), numpy.float32), mode="same")


def test_assigning_host_arrays_into_device_arrays_raises(arrays, standin):
    device, host = arrays
    index = standin.to_device(numpy.array([0, 2]))
    for target in (0, slice(None), Ellipsis, index):
        same_shape_on_host = numpy.zeros(device[target].shape, numpy.float32)
        with pytest.raises(HostArrayError):
            device[target] = same_shape_on_host


def test_host_index_arrays_are_refused(arrays):
    device, _ = arrays
    with pytest.raises(HostArrayError):
        device[numpy.array([0, 2])]
    with pytest.raises(HostArrayError):
        device[numpy.array([0, 2])] = 1.0


def test_a_device_scalar_is_not_an_index(standin):
    # cupy.ndarray has no __index__: range(), list indexing and slicing bounds need int(...) first.
    with pytest.raises(TypeError):
        range(standin.xp.asarray(3))


# --------------------------------------------------------------------------------------------------
# The boundary: what must work
# --------------------------------------------------------------------------------------------------


def test_python_and_numpy_scalars_mix_freely_and_keep_the_dtype(arrays):
    device, _ = arrays
    for result in (device * 2, device * 2.0, 2.0 - device, device / 3, device * numpy.float32(2), numpy.float32(2) * device):
        assert isinstance(result, DeviceArray) and result.dtype == numpy.float32


def test_explicit_transfers_copy(standin):
    host = numpy.ones(3, numpy.float32)
    device = standin.to_device(host)
    host[:] = 5  # a transfer is a copy: the device keeps what was sent
    back = standin.to_numpy(device)
    assert type(back) is numpy.ndarray
    numpy.testing.assert_array_equal(back, numpy.ones(3))
    back[:] = 7
    numpy.testing.assert_array_equal(device.get(), numpy.ones(3))
    assert standin.xp.asarray(device) is device  # already on the device: no transfer
    assert standin.to_device(host, dtype="float64").dtype == numpy.float64


def test_scalar_reads_work_and_are_counted(standin, arrays):
    device, host = arrays
    total = device.sum()
    standin.usage.reset_counters()
    assert float(total) == host.sum()
    assert int(device[1, 1]) == 5
    assert bool(device[2, 3] > 0)
    assert device[0, 1].item() == 1.0
    assert device[0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert f"{total:.1f}" == "66.0"
    assert standin.usage.device_reads == 6


def test_results_stay_device_arrays_never_numpy_scalars(standin, arrays):
    device, _ = arrays
    xp = standin.xp
    for result in (device.sum(), device[0, 0], xp.max(device), device.argmax(), (device > 1).all(), numpy.sum(device)):
        assert isinstance(result, DeviceArray) and result.shape == ()
    assert isinstance(device, xp.ndarray) and not isinstance(device, numpy.ndarray)
    assert xp.float32 is numpy.float32 and xp.newaxis is None


def test_views_indexing_and_inplace_operations_stay_on_the_device(standin, arrays):
    device, host = arrays
    xp = standin.xp
    for view in (device.T, device.reshape(4, 3), device[1:, ::2], device[..., None], device.transpose(1, 0), device.astype("float64")):
        assert isinstance(view, DeviceArray)
    expected = host.copy()
    device[:, ::2] += 1  # through a view, as on CuPy
    expected[:, ::2] += 1
    rows, cols = standin.to_device(numpy.array([0, 2])), standin.to_device(numpy.array([1, 3]))
    device[rows, cols] -= 1
    expected[[0, 2], [1, 3]] -= 1
    device *= 2.0
    expected *= 2.0
    device[0] = device[1]
    expected[0] = expected[1]
    xp.add.at(device, (rows, cols), 1.0)
    numpy.add.at(expected, ([0, 2], [1, 3]), 1.0)
    numpy.testing.assert_array_equal(device.get(), expected)
    assert [type(row) for row in device] == [DeviceArray] * 3 and len(device) == 3


def test_namespaces_reach_submodules_and_record_names(standin):
    xp, usage = standin.xp, standin.usage
    x = xp.arange(8, dtype=xp.float64)
    assert isinstance(xp.linalg.norm(x), DeviceArray)
    assert isinstance(xp.fft.rfft(x), DeviceArray)
    assert isinstance(xp.lib.stride_tricks.sliding_window_view(x, 3), DeviceArray)
    assert isinstance(xp.random.default_rng(0).random(3), DeviceArray)
    assert isinstance(numpy.exp(x), DeviceArray)  # NumPy forwards to the device, as CuPy does
    assert {"arange", "float64", "linalg.norm", "fft.rfft", "lib.stride_tricks.sliding_window_view"} <= usage.module_names
    assert "exp" in usage.dispatched_names


def test_backend_variants_share_the_device(standin):
    as_float64 = standin.with_dtype("float64")
    assert isinstance(as_float64, StandinBackend) and isinstance(as_float64, Backend)
    assert as_float64.name == "standin" and as_float64.dtype == numpy.float64
    assert as_float64.usage is standin.usage
    assert get_backend(standin) is standin
    standin.synchronize()
    assert standin.usage.synchronizations == 1


# --------------------------------------------------------------------------------------------------
# Leaks are caught end to end
# --------------------------------------------------------------------------------------------------


class HostBiasLayer(Layer):
    """A deliberately leaky layer: its bias was never sent to the device."""

    def forward(self, x):
        return x + numpy.ones(x.shape[1:], dtype=x.dtype)

    def backward(self, dy):
        return dy


def test_a_leaking_layer_passes_on_the_cpu_and_fails_on_the_standin(standin):
    x = numpy.random.default_rng(0).random((2, 4)).astype(numpy.float32)
    cpu = get_backend("cpu")
    Sequential([FullyConnected(4, 4, rng=0, backend=cpu), HostBiasLayer(cpu)]).forward(x)
    with pytest.raises(HostArrayError):
        Sequential([FullyConnected(4, 4, rng=0, backend=standin), HostBiasLayer(standin)]).forward(x)


def test_labels_left_on_the_host_are_caught(standin):
    """Inside the library, host labels in a device computation are caught; the loss layer itself
    sends the labels it is given to the device first, as the model does with its input."""
    from cnn_backend import functional as F

    logits = standin.to_device(numpy.zeros((4, 10), numpy.float32))
    with pytest.raises(TypeError):
        F.softmax_cross_entropy(standin, logits, numpy.array([0, 1, 2, 3]))
    assert float(standin.to_numpy(SoftmaxCrossEntropy(standin).forward(logits, numpy.array([0, 1, 2, 3])))) == pytest.approx(numpy.log(10))


# --------------------------------------------------------------------------------------------------
# The library on the stand-in
# --------------------------------------------------------------------------------------------------


def host_batch(n=8, seed=0):
    rng = numpy.random.default_rng(seed)
    return rng.random((n, 1, 28, 28)).astype(numpy.float32), rng.integers(0, 10, size=n)


def host_images(n=48, seed=0):
    rng = numpy.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=numpy.uint8), rng.integers(0, 10, size=n)


@pytest.mark.parametrize("algorithm", ["gemm", "signal"])
@pytest.mark.parametrize("build", [seed_cnn, plain_cnn], ids=["seed", "plain"])
def test_a_training_step_runs_on_the_standin_as_on_the_cpu(standin, build, algorithm):
    x, y = host_batch(n=4)
    results = []
    # Against the plain CPU path: the parallel one rounds its split products differently.
    for be in (cpu_backend(parallel=False), standin):
        model = build(be, seed=0, algorithm=algorithm)
        optimizer = Adam(model.parameters(), lr=1e-3, weight_decay=1e-2, backend=be)
        loss, n_correct = train_step(model, SoftmaxCrossEntropy(be), optimizer, x, be.to_device(y))
        results.append((be.to_numpy(loss), be.to_numpy(n_correct), [be.to_numpy(p.data) for p in model.parameters()]))
    (cpu_loss, cpu_correct, cpu_params), (loss, correct, params) = results
    assert loss == cpu_loss and correct == cpu_correct
    for cpu_param, param in zip(cpu_params, params):
        numpy.testing.assert_array_equal(param, cpu_param)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_a_training_step_reads_nothing_back_from_the_device(standin, label_smoothing):
    model = seed_cnn(standin, seed=0)
    optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4, backend=standin)
    loss_fn = SoftmaxCrossEntropy(standin, check_inputs=False, label_smoothing=label_smoothing)
    x, y = (standin.to_device(a) for a in host_batch())
    standin.usage.reset_counters()
    for _ in range(3):
        train_step(model, loss_fn, optimizer, x, y)
    assert standin.usage.device_reads == 0
    assert standin.usage.transfers_to_device == 0


def test_an_epoch_reads_back_per_log_interval_not_per_step(standin):
    images, labels = host_images(64)
    reads = []
    for n_images in (32, 64):  # 4 and 8 steps, one log interval each
        model = seed_cnn(standin, seed=0)
        loader = BatchLoader(images[:n_images], labels[:n_images], standin, batch_size=8)
        optimizer = SGD(model.parameters(), lr=0.01, backend=standin)
        standin.usage.reset_counters()
        fit(model, optimizer, loader, epochs=1, log_every=1000)
        reads.append(standin.usage.device_reads)
    assert reads[0] == reads[1]


@pytest.mark.parametrize("on_device", [False, True], ids=["host-input", "device-input"])
def test_evaluation_reads_back_the_same_few_times_for_any_number_of_chunks(standin, on_device):
    images, labels = host_batch(48)
    model = seed_cnn(standin, seed=0)
    given = standin.to_device(images) if on_device else images
    reads = []
    for batch_size in (48, 4):  # 1 and 12 evaluation chunks
        standin.usage.reset_counters()
        model.predict_logits(given, batch_size=batch_size)
        predict_reads = standin.usage.device_reads
        evaluate(model, given, labels, batch_size=batch_size)
        reads.append((predict_reads, standin.usage.device_reads))
    assert reads[0] == reads[1]
    # The non-finite check: none for host input, one device read for device input.
    assert reads[0][0] == (1 if on_device else 0)


def test_evaluation_loss_is_the_mean_cross_entropy(standin):
    images, labels = host_batch(40)
    model = seed_cnn("cpu", seed=0)
    logits = model.predict_logits(images).astype(numpy.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - numpy.log(numpy.exp(shifted).sum(axis=1, keepdims=True))
    expected = -log_probs[numpy.arange(40), labels].mean()
    for backend in ("cpu", standin):
        result = evaluate(seed_cnn(backend, seed=0), images, labels, batch_size=7)
        assert result["loss"] == pytest.approx(expected, rel=1e-6)
        assert result["accuracy"] == numpy.mean(logits.argmax(axis=1) == labels)


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "streamed"])
def test_batch_loader_and_fit_on_the_standin(standin, resident):
    images, labels = host_images(40)
    loader = BatchLoader(images[:32], labels[:32], standin, batch_size=8, max_device_bytes=1 << 30 if resident else 0)
    assert loader.resident is resident
    for x, y in loader.epoch(1):
        assert isinstance(x, DeviceArray) and x.dtype == numpy.float32 and x.shape == (8, 1, 28, 28)
        assert isinstance(y, DeviceArray) and y.dtype == numpy.int64
    validation = (images[32:, None].astype(numpy.float32) / 255, labels[32:])
    histories = []
    for be in (cpu_backend(parallel=False), standin):  # the plain path: split products round differently
        model = plain_cnn(be, seed=0, dropout=0.5)
        optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9, backend=be)
        loader = BatchLoader(images[:32], labels[:32], be, batch_size=8, max_device_bytes=1 << 30 if resident else 0)
        histories.append([(s.train_loss, s.val_loss, s.val_accuracy) for s in fit(model, optimizer, loader, 1, validation=validation)])
    assert histories[0] == histories[1]


def test_fit_sends_the_validation_set_to_the_device_once_not_at_every_epoch(standin):
    images, labels = host_images(40)
    validation = (images[32:, None].astype(numpy.float32) / 255, labels[32:])
    transfers = {}
    for epochs in (1, 3):
        for with_validation in (False, True):
            model = seed_cnn(standin, seed=0)
            loader = BatchLoader(images[:32], labels[:32], standin, batch_size=8)
            optimizer = SGD(model.parameters(), lr=0.01, backend=standin)
            standin.usage.reset_counters()
            fit(model, optimizer, loader, epochs, validation=validation if with_validation else None)
            transfers[epochs, with_validation] = standin.usage.transfers_to_device
    assert transfers[1, True] - transfers[1, False] == 1 + 1  # the images once, one epoch's labels
    assert transfers[3, True] - transfers[3, False] == 1 + 3


def test_evaluate_mirrors_device_images_on_the_device(standin):
    images, labels = host_images(24)
    x = images[:, None].astype(numpy.float32) / 255
    model = seed_cnn(standin, seed=1)
    on_device = evaluate(model, standin.to_device(x), labels, batch_size=10, flip_average=True)
    assert on_device == evaluate(model, x, labels, batch_size=10, flip_average=True)


def test_evaluate_and_predict_on_the_standin(standin):
    images, labels = host_images(24)
    x = images[:, None].astype(numpy.float32) / 255
    cpu_model, model = seed_cnn(cpu_backend(parallel=False), seed=1), seed_cnn(standin, seed=1)
    scores = evaluate(model, x, labels, batch_size=10)
    assert isinstance(scores["loss"], float) and scores == evaluate(cpu_model, x, labels, batch_size=10)
    flipped = evaluate(model, x, labels, batch_size=10, flip_average=True)
    assert flipped == evaluate(cpu_model, x, labels, batch_size=10, flip_average=True)
    predictions = model.predict(x, batch_size=10)
    assert type(predictions) is numpy.ndarray
    numpy.testing.assert_array_equal(predictions, cpu_model.predict(x))


def test_saving_and_loading_models_through_the_standin(standin, tmp_path):
    model = plain_cnn(standin, seed=3, dropout=0.25)
    path = model.save(tmp_path / "model.npz")
    on_standin, on_cpu = Sequential.load(path, standin), Sequential.load(path, cpu_backend(parallel=False))
    for (name, param), (_, loaded), (_, cpu_param) in zip(
        model.named_parameters(), on_standin.named_parameters(), on_cpu.named_parameters()
    ):
        assert isinstance(loaded.data, DeviceArray), name
        numpy.testing.assert_array_equal(loaded.data.get(), param.data.get())
        numpy.testing.assert_array_equal(cpu_param.data, param.data.get())
    x, _ = host_batch(n=2)
    on_standin.eval(), on_cpu.eval()
    numpy.testing.assert_array_equal(on_standin.forward(x).get(), on_cpu.forward(x))


@pytest.mark.parametrize("make_optimizer", [
    lambda params, be: SGD(params, lr=0.1, momentum=0.9, backend=be),
    lambda params, be: Adam(params, lr=0.01, backend=be),
], ids=["sgd", "adam"])
def test_optimizer_state_round_trips_through_the_host(standin, make_optimizer):
    layer = FullyConnected(5, 3, rng=0, backend=standin)
    optimizer = make_optimizer(layer.params.values(), standin)
    for param in layer.params.values():
        param.grad = standin.xp.ones_like(param.data)
    optimizer.step()
    state = optimizer.state_dict()
    assert all(type(value) is numpy.ndarray for key, value in state.items() if key != "steps")
    restored = make_optimizer(layer.params.values(), standin)
    restored.load_state_dict(state)
    for name, buffers in optimizer.buffers.items():
        for original, loaded in zip(buffers, restored.buffers[name]):
            assert isinstance(loaded, DeviceArray)
            numpy.testing.assert_array_equal(loaded.get(), original.get())


def test_training_checkpoints_round_trip_through_the_standin(standin, tmp_path):
    checkpoint = optional_module("cnn_backend.checkpoint")
    from cnn_backend.optim import ConstantSchedule

    model = plain_cnn(standin, seed=0, dropout=0.5)
    optimizer = Adam(model.parameters(), lr=1e-3, backend=standin)
    x, y = host_batch(n=4)
    train_step(model, SoftmaxCrossEntropy(standin), optimizer, x, standin.to_device(y))
    path = checkpoint.save_checkpoint(
        tmp_path / "last.npz", model, optimizer, epoch=1, schedule=ConstantSchedule(1e-3),
        settings={"seed": 0}, loader_seed=0, best={"epoch": 1, "val_accuracy": 0.5}, history=[],
    )
    loaded = checkpoint.load_checkpoint(path)
    restored_model = loaded.build_model(standin)
    restored_optimizer = loaded.build_optimizer(restored_model)
    for (_, param), (_, restored) in zip(model.named_parameters(), restored_model.named_parameters()):
        numpy.testing.assert_array_equal(restored.data.get(), param.data.get())
    for name, buffers in optimizer.buffers.items():
        for original, restored in zip(buffers, restored_optimizer.buffers[name]):
            assert isinstance(restored, DeviceArray)
            numpy.testing.assert_array_equal(restored.get(), original.get())
    # Both continue identically: same weights, same optimiser state, same dropout masks.
    for m, o in ((model, optimizer), (restored_model, restored_optimizer)):
        train_step(m, SoftmaxCrossEntropy(standin), o, x, standin.to_device(y))
    for (_, param), (_, restored) in zip(model.named_parameters(), restored_model.named_parameters()):
        numpy.testing.assert_array_equal(restored.data.get(), param.data.get())


def test_augmentation_runs_on_the_standin(standin):
    augment = optional_module("cnn_backend.augment")
    x, _ = host_batch(n=6)
    on_cpu = augment.RandomCropFlip(get_backend("cpu"), padding=2, seed=1)(x, 1, 1)
    on_standin = augment.RandomCropFlip(standin, padding=2, seed=1)(standin.to_device(x), 1, 1)
    assert isinstance(on_standin, DeviceArray) and on_standin.dtype == numpy.float32
    numpy.testing.assert_array_equal(on_standin.get(), on_cpu)


def test_command_line_trains_resumes_and_evaluates_on_the_standin(monkeypatch, tmp_path, capsys):
    cli = optional_module("cnn_backend.cli")
    import cnn_backend.backend as backend_module

    requested = []

    def device_lookup(device="auto", dtype="float32"):
        requested.append(device)
        return standin_backend(dtype)

    # The command line asks for CUDA and gets the stand-in: every array it touches is a "device" array.
    monkeypatch.setattr(backend_module, "get_backend", device_lookup)
    monkeypatch.setattr(cli, "get_backend", device_lookup, raising=False)
    out = tmp_path / "run"
    common = ["--device", "cuda", "--quiet"]
    status = cli.main(
        ["train", "--model", "seed", "--epochs", "1", "--batch-size", "16", "--data", "bundled",
         "--train-split", ":64", "--val-split", "64:96", "--out", str(out), *common]
    )
    assert status == 0, capsys.readouterr().err
    assert cli.main(["train", "--resume", str(out / "last.npz"), "--epochs", "2", *common]) == 0
    assert cli.main(["evaluate", str(out / "last.npz"), "--device", "cuda"]) == 0
    captured = capsys.readouterr()
    assert "device: standin" in captured.out and requested and set(requested) == {"cuda"}
    assert (out / "last.npz").exists() and captured.err == ""


def test_checking_names_without_cupy_says_what_to_install(monkeypatch):
    import sys

    from cnn_backend.testing import missing_cupy_names

    monkeypatch.setitem(sys.modules, "cupy", None)  # as where CuPy is not installed
    with pytest.raises(ImportError, match=r"^missing_cupy_names checks names against CuPy, which is not installed: pip install cupy-cuda12x"):
        missing_cupy_names(standin_backend().usage)
