"""Backend selection and the clear errors for an unusable CUDA request."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy
import pytest
import scipy.signal

from cnn_backend import backend as backend_module
from cnn_backend.backend import DeviceUnavailableError, get_backend


def test_cpu_backend_uses_numpy_and_scipy():
    be = get_backend("cpu")
    assert be.name == "cpu"
    assert be.xp is numpy
    # scipy.signal is imported on first use (it costs a second and ~70 MiB at start-up)
    assert be.signal.fftconvolve is scipy.signal.fftconvolve
    assert be.dtype == numpy.float32
    assert get_backend("cpu", dtype="float64").dtype == numpy.float64


def test_transfers_round_trip_and_keep_dtype():
    be = get_backend("cpu")
    host = numpy.arange(6, dtype=numpy.int64).reshape(2, 3)
    on_device = be.to_device(host)
    assert on_device.dtype == numpy.int64
    assert be.to_device(host, dtype=be.dtype).dtype == numpy.float32
    numpy.testing.assert_array_equal(be.to_numpy(on_device), host)
    be.synchronize()  # a no-op on the CPU, but part of the interface


def test_a_backend_passes_through_get_backend():
    be = get_backend("cpu")
    assert get_backend(be) is be


def test_with_dtype_keeps_the_device():
    be = get_backend("cpu").with_dtype("float64")
    assert (be.name, be.dtype) == ("cpu", numpy.float64)


@pytest.mark.parametrize("bad", ["tpu", "gpu", ""])
def test_unknown_device_is_refused(bad):
    with pytest.raises(ValueError, match=r"device must be one of cpu, cuda, auto"):
        get_backend(bad)


@pytest.mark.parametrize("bad", ["float16", "int32"])
def test_unsupported_dtype_is_refused(bad):
    with pytest.raises(ValueError, match=r"dtype must be one of float32, float64"):
        get_backend("cpu", dtype=bad)


def _cuda_usable() -> bool:
    try:
        get_backend("cuda")
    except DeviceUnavailableError:
        return False
    return True


@pytest.mark.skipif(_cuda_usable(), reason="a CUDA device is usable here: auto picks it")
def test_auto_falls_back_to_cpu_without_a_gpu():
    assert get_backend("auto").name == "cpu"


def test_cuda_without_cupy_names_the_package_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(DeviceUnavailableError, match=r"CuPy is not installed.*cnn-backend\[cuda12\].*cnn-backend\[cuda13\]"):
        get_backend("cuda")
    assert get_backend("auto").name == "cpu"


def test_cuda_with_cupy_but_no_device(monkeypatch):
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    if cupy.cuda.is_available():
        pytest.skip("a CUDA device is usable here")
    with pytest.raises(DeviceUnavailableError, match=r"found no usable CUDA device"):
        get_backend("cuda")


class _FakeCuda:
    @staticmethod
    def is_available():
        return True


class _FakeCupy:
    __version__ = "14.0.0-fake"
    cuda = _FakeCuda()


def test_cuda_with_broken_cupyx_signal_says_which_import_failed(monkeypatch):
    real_import = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == "cupy":
            return _FakeCupy()
        if name == "cupyx.scipy.signal":
            raise ImportError("libcublasLt.so.12: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(backend_module.importlib, "import_module", fake_import)
    with pytest.raises(DeviceUnavailableError, match=r"cupyx\.scipy\.signal failed to import \(libcublasLt"):
        get_backend("cuda")


def test_cpu_users_never_import_cupy():
    code = (
        "import sys; import cnn_backend; from cnn_backend import get_backend, seed_cnn; "
        "m = seed_cnn(get_backend('cpu')); print('cupy' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_error_message_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(DeviceUnavailableError) as info:
        get_backend("cuda")
    assert "\n" not in str(info.value)
