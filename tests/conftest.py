"""Shared fixtures: one test body runs on every device; the CUDA case skips with a reason without a GPU."""

from __future__ import annotations

import pytest

from cnn_backend.backend import DeviceUnavailableError, get_backend
from cnn_backend.testing import standin_backend


def _cuda_skip_reason() -> str | None:
    try:
        get_backend("cuda")
    except DeviceUnavailableError as exc:
        return str(exc)
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()


def pytest_collection_modifyitems(config, items):
    if CUDA_SKIP_REASON is None:
        return
    skip = pytest.mark.skip(reason=f"no usable CUDA device: {CUDA_SKIP_REASON}")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    """Device name; the ``cuda`` case is marked ``gpu`` and skipped where no GPU is usable."""
    return request.param


@pytest.fixture
def backend(device):
    """float32 backend of the ``device`` fixture."""
    return get_backend(device)


@pytest.fixture
def backend64(device):
    """float64 backend of the ``device`` fixture (gradient checks)."""
    return get_backend(device, dtype="float64")


@pytest.fixture(params=["standin", pytest.param("cuda", marks=pytest.mark.gpu)])
def device_under_test(request):
    """``dtype -> Backend`` of the device compared against the CPU in parity tests.

    ``"cuda"`` is the real GPU (marked ``gpu``: selected by ``pytest -m gpu``, skipped with a reason
    elsewhere); ``"standin"`` is the CPU stand-in for the device boundary, so the same test bodies
    also run, and catch host-array leaks, on machines without a GPU.
    """
    name = request.param

    def make(dtype="float32"):
        return standin_backend(dtype) if name == "standin" else get_backend(name, dtype)

    make.device_name = name
    return make


@pytest.fixture
def standin():
    """A fresh float32 stand-in device (its own usage record)."""
    return standin_backend("float32")


@pytest.fixture
def registry_restored():
    """Layer types registered during the test (``register_layer``) are forgotten after it, as in a
    new process: registrations are process-wide."""
    from cnn_backend.layers import LAYER_TYPES

    saved = dict(LAYER_TYPES)
    yield
    LAYER_TYPES.clear()
    LAYER_TYPES.update(saved)


@pytest.fixture(autouse=True)
def no_blas_overrides(monkeypatch):
    """The benchmark warns, on stderr, when OPENBLAS_CORETYPE or OPENBLAS_L2_SIZE is set (some
    machines set them for every process): tests of its output run as on a machine without them,
    and a test of the warnings sets them itself."""
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        monkeypatch.delenv(name, raising=False)
