"""Array backends: the only place that knows whether arrays live on the host or on a CUDA device.

A :class:`Backend` carries the array module ``xp`` (``numpy`` or ``cupy``) and the signal module
``signal`` (``scipy.signal`` or ``cupyx.scipy.signal``). Layers, kernels, models and optimisers take
every array function from it, so the same code runs on both devices. CuPy is imported lazily, only
when CUDA is asked for (or probed by ``"auto"``): CPU users never import it.

Hot operations (Thinc's ``Ops`` is the model) are methods of the backend: the products
:meth:`Backend.matmul` and :meth:`Backend.matmuls`, :meth:`Backend.map_chunks`, the row reductions
:meth:`Backend.row_sums` and :meth:`Backend.row_dots`, and the ReLU's :meth:`Backend.rectify`. On
every device they are plain array calls; :class:`CpuBackend` runs the products and ``map_chunks``
on all cores, the row reductions as single BLAS calls and the ReLU against an array of zeros (see
:mod:`cnn_backend.threads`), so layers still read like NumPy and the device path does not change.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy

from . import allocator, threads

DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "float64")

CUDA_INSTALL_HINT = (
    "install the CuPy wheel matching your CUDA major version: "
    "pip install 'cnn-backend[cuda12]' (CUDA 12.x) or 'cnn-backend[cuda13]' (CUDA 13.x)"
)


class DeviceUnavailableError(RuntimeError):
    """Raised when a device is asked for that this machine cannot provide: ``reason`` says what is
    missing, the message also that the device was asked for."""

    def __init__(self, reason: str, device: str = "CUDA") -> None:
        super().__init__(f"{device} was requested but {reason}")
        self.reason, self.device = reason, device


@dataclass(frozen=True, eq=False)
class Backend:
    """One compute device: its array module, its signal module and the default float dtype.

    ``to_device`` moves host data onto the device; ``to_numpy`` brings device data back to the host.
    ``synchronize`` waits for queued device work (needed before reading a clock).
    """

    name: str
    xp: ModuleType
    signal: ModuleType
    dtype: numpy.dtype = numpy.dtype("float32")

    #: whether a model runs a first convolution and the 2x2 max-pool after it as one operation
    #: (``functional.conv2d_maxpool2x2_forward``): it saves NumPy's per-run cost, which CuPy's
    #: kernels do not have, so only the CPU backend does
    fuses_conv_maxpool = False
    #: whether an evaluation-mode convolution with few filters runs as
    #: ``functional.conv2d_forward_banded`` (no im2col): it saves copies that NumPy makes on one
    #: core at a time; CuPy's copies are cheap kernels, so only the CPU backend does
    bands_thin_convolutions = False

    def __deepcopy__(self, memo) -> "Backend":
        # A device handle, not data: a copied layer computes on the same device (its modules cannot be copied).
        return self

    def to_device(self, array: Any, dtype: Any = None):
        """Return ``array`` as an array of this backend (no copy when it already is one)."""
        return self.xp.asarray(array, dtype=dtype)

    def to_numpy(self, array: Any) -> numpy.ndarray:
        """Return a host (NumPy) copy of a device array; host arrays pass through."""
        if hasattr(array, "get") and not isinstance(array, numpy.ndarray):
            return array.get()
        return numpy.asarray(array)

    def synchronize(self) -> None:
        """Block until all queued work on this device has finished (a no-op on the CPU)."""

    def matmul(self, a, b, out=None):
        """``a @ b`` for 2-D arrays of any memory order (into ``out`` when given)."""
        return self.xp.matmul(a, b, out=out)

    def matmuls(self, products) -> None:
        """``out = a @ b`` for every ``(a, b, out)`` of ``products``, products independent of one
        another (a layer's weight and input gradients). Here: one after the other."""
        for a, b, out in products:
            self.matmul(a, b, out=out)

    def map_chunks(self, kernel, *arrays, axis: int = 0) -> None:
        """Run ``kernel(*arrays)``, which writes its results into some of ``arrays`` in place.

        The kernel must be correct on any equal slicing of ``axis`` of all the arrays together
        (each output element depending only on inputs at the same index of ``axis``): the CPU
        backend calls it once per chunk of that axis, one chunk per core. Here: one call.
        """
        kernel(*arrays)

    def map_range(self, kernel, length: int, size: int) -> None:
        """Run ``kernel(0, length)``; ``kernel(start, stop)`` must be correct on any split of the
        range into consecutive parts, each part writing outputs no other part writes. The CPU
        backend runs one part per core when the work (``size`` elements) is large. Here: one call.
        """
        kernel(0, length)

    def row_sums(self, rows, out, *, mean: bool = False) -> None:
        """Each row's sum (its mean with ``mean=True``) into ``out``, for a 2-D array."""
        (self.xp.mean if mean else self.xp.sum)(rows, axis=1, out=out)

    def row_dots(self, a, b, out, scratch, *, mean: bool = False) -> None:
        """``(a * b).sum(axis=1)`` (``.mean(axis=1)`` with ``mean=True``) into ``out`` for 2-D
        arrays of one shape; ``scratch``, an array of that shape, may be overwritten (the CPU
        backend does not need it)."""
        self.xp.multiply(a, b, out=scratch)
        self.row_sums(scratch, out, mean=mean)

    def rectify(self, x, out) -> None:
        """``max(x, 0)`` into ``out`` (which may be ``x``)."""
        self.xp.maximum(x, 0, out=out)

    def with_dtype(self, dtype: Any) -> "Backend":
        """The same device with another default float dtype."""
        return type(self)(self.name, self.xp, self.signal, float_dtype(dtype))

    def __repr__(self) -> str:
        return f"Backend(name={self.name!r}, dtype={self.dtype.name})"


class CudaBackend(Backend):
    """CuPy on the current CUDA device."""

    def synchronize(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()


def float_dtype(dtype: Any) -> numpy.dtype:
    """``dtype`` as a NumPy dtype, refused in one line unless it is one of :data:`DTYPES`."""
    resolved = numpy.dtype(dtype)
    if resolved.name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {resolved.name!r}")
    return resolved


class CpuBackend(Backend):
    """NumPy and SciPy on the host, with the hot operations split over every core.

    NumPy runs element-wise work and copies on one core, and releases the GIL while it does: each
    large :meth:`map_chunks` call is cut along ``axis`` into chunks that the calling thread and
    the workers of :mod:`cnn_backend.threads` share out. :meth:`matmul` splits a product the same
    way, each chunk on one BLAS thread, so no idle BLAS worker is left spinning on a core that the
    next chunk needs (see ``docs/performance.md``).
    """

    fuses_conv_maxpool = True
    bands_thin_convolutions = True

    def matmul(self, a, b, out=None):
        return threads.matmul(a, b, out)

    def matmuls(self, products) -> None:
        threads.matmuls(products)

    def map_chunks(self, kernel, *arrays, axis: int = 0) -> None:
        threads.map_chunks(kernel, arrays, axis)

    def map_range(self, kernel, length: int, size: int) -> None:
        threads.map_range(kernel, length, size)

    def row_sums(self, rows, out, *, mean: bool = False) -> None:
        threads.row_sums(rows, out, 1.0 / rows.shape[1] if mean else 1.0)

    def row_dots(self, a, b, out, scratch, *, mean: bool = False) -> None:
        threads.row_dots(a, b, out)
        if mean:
            out *= 1.0 / a.shape[1]

    def rectify(self, x, out) -> None:
        numpy.maximum(x, threads.zeros_like(x), out=out)


class _ModuleOnFirstUse(ModuleType):
    """A module imported on its first attribute access: ``scipy.signal`` costs about a second and
    70 MiB to import and only the FFT convolution algorithm uses it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._module_name = name

    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return getattr(importlib.import_module(self._module_name), attribute)


_SCIPY_SIGNAL = _ModuleOnFirstUse("scipy.signal")


def cpu_backend(dtype: Any = "float32", parallel: bool = True) -> Backend:
    """NumPy and SciPy on the host (``scipy.signal`` is imported when first used).

    ``parallel=False``: the plain single-call operations of every other device (one core for
    element-wise work, BLAS's own threads for products), the reference the fast paths are tested against.
    The parallel backend also keeps freed memory in the process (:mod:`cnn_backend.allocator`).
    """
    if parallel:
        allocator.keep_freed_memory()
    return (CpuBackend if parallel else Backend)("cpu", numpy, _SCIPY_SIGNAL, float_dtype(dtype))


def cuda_backend(dtype: Any = "float32") -> CudaBackend:
    """CuPy and ``cupyx.scipy.signal`` on the current CUDA device.

    Raises :class:`DeviceUnavailableError` with one line naming what is missing: CuPy itself, a
    usable CUDA device, or the CUDA libraries ``cupyx.scipy.signal`` needs.
    """
    try:
        cupy = importlib.import_module("cupy")
    except ImportError as exc:
        raise DeviceUnavailableError(f"CuPy is not installed ({exc}); {CUDA_INSTALL_HINT}") from None
    try:
        usable = bool(cupy.cuda.is_available())
    except Exception as exc:  # a broken driver raises instead of answering False
        raise DeviceUnavailableError(f"the CUDA driver failed: {exc}") from None
    if not usable:
        raise DeviceUnavailableError(
            f"CuPy {cupy.__version__} found no usable CUDA device "
            "(no GPU, or the NVIDIA driver is missing)"
        )
    try:
        signal = importlib.import_module("cupyx.scipy.signal")
    except Exception as exc:  # ImportError, or a RuntimeError from a missing CUDA library
        raise DeviceUnavailableError(
            f"cupyx.scipy.signal failed to import ({exc}); "
            f"the CUDA libraries are missing or mismatched: {CUDA_INSTALL_HINT}"
        ) from None
    return CudaBackend("cuda", cupy, signal, float_dtype(dtype))


def backend_of(array) -> Backend | None:
    """The backend whose arrays ``array`` is one of, in its dtype: a NumPy array the CPU's, a CuPy
    array CUDA's; None for anything else (a stand-in device's array, a list)."""
    if isinstance(array, numpy.ndarray):
        return cpu_backend(array.dtype)
    if type(array).__module__.startswith("cupy"):
        return cuda_backend(array.dtype)
    return None


def cuda_nccl() -> ModuleType:
    """CuPy's NCCL binding, ``cupy.cuda.nccl`` (a submodule ``import cupy`` leaves out); its
    ``available`` says whether the NCCL library could be loaded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CuPy warns when libnccl is missing: `available` says so
        return importlib.import_module("cupy.cuda.nccl")


def get_backend(device: str | Backend = "auto", dtype: Any = "float32") -> Backend:
    """Return the backend for ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when usable, else CPU).

    A :class:`Backend` passes through unchanged, so functions can accept either.
    """
    if isinstance(device, Backend):
        return device
    if device == "cpu":
        return cpu_backend(dtype)
    if device == "cuda":
        return cuda_backend(dtype)
    if device == "auto":
        try:
            return cuda_backend(dtype)
        except DeviceUnavailableError:
            return cpu_backend(dtype)
    raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
