"""A CPU stand-in for the CUDA device boundary, so host-array leaks fail on machines without a GPU.

CuPy arrays refuse to become NumPy arrays implicitly and refuse to mix with NumPy arrays. Code that
forgets a transfer (a label array left on the host, ``numpy.asarray`` on device data, a SciPy call on
a device array) therefore works on the CPU backend and only breaks on a GPU. :func:`standin_backend`
returns a :class:`~cnn_backend.backend.Backend` whose arrays behave like CuPy's at that boundary
while computing with NumPy and SciPy underneath::

    be = standin_backend("float64")
    model = seed_cnn(be)             # runs exactly as on CUDA, minus the GPU
    be.usage.device_reads            # how often device values were read back (syncs on a GPU)
    be.usage.kernel_launches         # device operations that wrote device memory (launches on a GPU)
    missing_cupy_names(be.usage)     # names and keywords the code used that CuPy lacks or refuses

What the stand-in enforces, like CuPy:

* ``numpy.asarray(a)`` / ``numpy.array(a)`` (and every NumPy or SciPy function that calls them) raise
  ``TypeError``; ``a.get()``, ``Backend.to_numpy``, ``float(a)``, ``int(a)``, ``bool(a)`` and
  ``a.item()`` work (each counted in :attr:`DeviceUsage.device_reads`).
* any operation mixing a device array with a NumPy array raises :class:`HostArrayError` (a
  ``TypeError``); Python and NumPy scalars mix freely.
* ``xp.asarray`` / ``xp.array`` are the host-to-device transfer and always copy.
* reductions and scalar indexing give 0-d device arrays, never NumPy scalars.

What the stand-in counts (:class:`DeviceUsage`), as a GPU would see it: every call that writes
device memory is one *launch* (a kernel or a copy on the stream): ufuncs and operators, reductions,
matrix products, creation functions that fill (``zeros``, ``ones``, ``full`` ...), assignments into
slices, copies, casts, fancy indexing, and transfers both ways. Calls whose result is a view of an
input (``reshape`` of a contiguous array, ``.T``, slicing, ``broadcast_to`` ...) launch nothing, and
``empty``/``empty_like`` only allocate. ``bytes_allocated`` adds up the new arrays' sizes. A SciPy
signal function counts as one launch although CuPy runs several kernels for it (FFTs, products). A
``mean`` counts as the kernels CuPy runs for it under its default CUB accelerator: two (a CUB sum,
then a division) where CUB takes it, one where CuPy falls back to its own reduction kernel (see
:func:`_reduction_kernels`); ``var`` and ``std`` add their own kernels to that mean's.

Where CuPy is lenient the stand-in is stricter, on purpose: a NumPy index array (``a[host_index]``)
and a NumPy value assigned through an index array (``a[device_index] = host_values``) are silently
copied to the device on every use by CuPy; the stand-in refuses both, so indices and values are sent
once, explicitly, with ``Backend.to_device``.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import operator
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy

from .backend import Backend, float_dtype

STANDIN_NAME = "standin"

# The host-to-device transfer functions: the only xp calls that accept NumPy arrays.
TRANSFER_FUNCTIONS = frozenset({"asarray", "array", "asanyarray"})

IMPLICIT_CONVERSION_MESSAGE = (
    "Implicit conversion to a NumPy array is not allowed. "
    "Please use `.get()` to construct a NumPy array explicitly."
)


class HostArrayError(TypeError):
    """A NumPy (host) array reached an operation on device arrays; CuPy raises a TypeError there too."""


@dataclass
class DeviceUsage:
    """What code did with a stand-in device: the names it used and how often data crossed the boundary.

    Names are dotted paths relative to their namespace (``"matmul"``, ``"linalg.norm"``, ``"add.at"``).
    """

    #: names taken from ``backend.xp``
    module_names: set[str] = field(default_factory=set)
    #: names taken from ``backend.signal``
    signal_names: set[str] = field(default_factory=set)
    #: methods and attributes read from device arrays (``"reshape"``, ``"T"``, ``"argmax"`` ...)
    array_attributes: set[str] = field(default_factory=set)
    #: NumPy functions and ufuncs called on device arrays (CuPy forwards them to its own by name)
    dispatched_names: set[str] = field(default_factory=set)
    #: methods and attributes read from objects ``xp`` returned, by type (``"Generator.random"``)
    object_attributes: set[str] = field(default_factory=set)
    #: keyword names passed, by call: ``"xp.sum"``, ``"signal.fftconvolve"``, ``"ndarray.astype"``,
    #: ``"Generator.random"``, ``"numpy.mean"`` (a NumPy function called on device arrays)
    keywords: defaultdict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    #: device-to-host reads: ``get``, ``item``, ``tolist``, ``float``/``int``/``bool``, formatting
    device_reads: int = 0
    #: explicit host-to-device transfers through ``xp.asarray`` / ``xp.array``
    transfers_to_device: int = 0
    #: calls of ``Backend.synchronize``
    synchronizations: int = 0
    #: device operations that wrote device memory: one kernel launch (or copy) each on a GPU
    kernel_launches: int = 0
    #: bytes of the new device arrays created (views excluded)
    bytes_allocated: int = 0
    #: ``kernel_launches`` by operation (``"matmul"``, ``"operator iadd"``, ``"setitem"`` ...)
    launches_by_name: Counter = field(default_factory=Counter)

    def reset_counters(self) -> None:
        self.device_reads = self.transfers_to_device = self.synchronizations = 0
        self.kernel_launches = self.bytes_allocated = 0
        self.launches_by_name = Counter()

    def record_launch(self, name: str, allocated: int = 0, kernels: int = 1) -> None:
        """Count one device operation called ``name`` that allocated ``allocated`` bytes and ran
        ``kernels`` kernels."""
        self.kernel_launches += kernels
        self.bytes_allocated += allocated
        self.launches_by_name[name] += kernels

    def record_keywords(self, call: str, kwargs: dict) -> None:
        """Note the keyword names a call passed (``call`` as in :attr:`keywords`)."""
        if kwargs:
            self.keywords[call].update(kwargs)


# --------------------------------------------------------------------------------------------------
# Crossing the boundary
# --------------------------------------------------------------------------------------------------


def _refuse_host(where: str) -> HostArrayError:
    return HostArrayError(
        f"{where}: a NumPy array was mixed with device arrays; send it with Backend.to_device "
        "(CuPy raises here too)"
    )


def _to_host_operands(value: Any, where: str, allow_host: bool = False) -> Any:
    """Replace device arrays by their NumPy buffers (recursively in lists, tuples and dicts).

    NumPy arrays are refused unless ``allow_host`` (the transfer functions).
    """
    if isinstance(value, DeviceArray):
        return value._host
    if isinstance(value, numpy.ndarray):
        if allow_host:
            return value
        raise _refuse_host(where)
    if isinstance(value, (list, tuple)):
        items = [_to_host_operands(item, where, allow_host) for item in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {key: _to_host_operands(item, where, allow_host) for key, item in value.items()}
    return value


def _to_device_results(value: Any, usage: DeviceUsage) -> Any:
    """Wrap NumPy results as device arrays; NumPy scalars become 0-d arrays, as CuPy returns."""
    if isinstance(value, numpy.ndarray):
        return DeviceArray(value, usage)
    if isinstance(value, numpy.generic):
        return DeviceArray(numpy.asarray(value), usage)
    if isinstance(value, tuple):
        items = [_to_device_results(item, usage) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_to_device_results(item, usage) for item in value]
    if isinstance(value, (numpy.random.Generator, numpy.random.RandomState)):
        return _DeviceObject(value, usage)
    return value


#: creation functions that allocate without writing (no kernel on a GPU)
ALLOCATING_ONLY = frozenset({"empty", "empty_like"})


def _host_arrays(value: Any, found: list) -> list:
    """Every NumPy array inside ``value`` (recursively in lists, tuples and dicts)."""
    if isinstance(value, numpy.ndarray):
        found.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _host_arrays(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _host_arrays(item, found)
    return found


def _record_result(
    usage: DeviceUsage, name: str, result: Any, operands: Any, wrote: bool = False, kernels: int = 1
) -> None:
    """Count the launch a call made (``kernels`` of them): if it wrote an output (``out=``, in place,
    or returned nothing), or if it returned arrays that are not views of its (host-converted) ``operands``."""
    if wrote or result is None:
        usage.record_launch(name, kernels=kernels)
        return
    inputs = _host_arrays(operands, [])
    new = [
        array
        for array in _host_arrays(result, [])
        if not any(numpy.may_share_memory(array, source) for source in inputs)
    ]
    new += [scalar for scalar in (result if isinstance(result, tuple) else (result,)) if isinstance(scalar, numpy.generic)]
    if not new:
        return
    allocated = sum(int(array.nbytes) for array in new)
    if name in ALLOCATING_ONLY:
        usage.bytes_allocated += allocated
    else:
        usage.record_launch(name, allocated, kernels)


#: Kernels CuPy runs for these reductions where its CUB accelerator (on by default: CUPY_ACCELERATORS
#: is "cub" unless set) takes them. ``mean`` is a CUB sum then ``true_divide(result, n, out=result)``
#: (cupy/_core/_routines_statistics.pyx, _ndarray_mean); ``var`` is that mean then its own reduction,
#: ``std`` that variance then a ``sqrt`` (_var, _std). Without CUB the mean is one fused kernel.
CUB_REDUCTION_KERNELS = {"mean": 2, "var": 3, "std": 4}


def _reduction_kernels(name: str, args: tuple, kwargs: dict) -> int:
    """Kernels one call ``name(*args, **kwargs)`` runs on CuPy, its (host) array first (the array
    itself for an ``ndarray.`` method): 1 but for the reductions in :data:`CUB_REDUCTION_KERNELS`."""
    kernels = CUB_REDUCTION_KERNELS.get(name.removeprefix("ndarray."))
    if kernels is None or not args or not isinstance(args[0], numpy.ndarray):
        return 1
    axis = kwargs.get("axis", args[1] if len(args) > 1 else None)
    return kernels if _cub_reduces(args[0], axis) else kernels - 1


def _cub_reduces(array: numpy.ndarray, axis: Any) -> bool:
    """Whether CuPy's CUB path takes a reduction of ``array`` over ``axis`` (cupy/cuda/cub.pyx,
    cub_reduction): a non-empty C- or F-contiguous array reduced over all its axes, or over
    consecutive axes ending at the last (C order) or starting at the first (F order)."""
    if array.size == 0 or not (array.flags.c_contiguous or array.flags.f_contiguous):
        return False
    ndim = array.ndim
    axes = sorted({int(a) % ndim for a in (range(ndim) if axis is None else numpy.atleast_1d(axis))})
    if len(axes) == ndim:
        return True
    if not axes or axes != list(range(axes[0], axes[-1] + 1)):
        return False
    # An array both C- and F-contiguous counts as C, as in cub_reduction.
    return axes[-1] == ndim - 1 if array.flags.c_contiguous else axes[0] == 0


def _dispatched_name(function: Any) -> str:
    """``numpy.linalg.norm`` -> ``"linalg.norm"``: the path CuPy looks the function up under."""
    module = getattr(function, "__module__", None) or "numpy"
    parts = [part for part in module.split(".")[1:] if not part.startswith("_")]
    return ".".join(parts + [function.__name__])


# --------------------------------------------------------------------------------------------------
# Device arrays
# --------------------------------------------------------------------------------------------------


class DeviceArray:
    """An array "on the device": a NumPy buffer that behaves like a ``cupy.ndarray`` at the host boundary.

    Not a ``numpy.ndarray`` subclass on purpose: NumPy turns subclasses into plain arrays without
    asking them, so only a separate type can refuse ``numpy.asarray`` as CuPy does.
    """

    __slots__ = ("_host", "_usage")
    __array_priority__ = 100.0  # as cupy.ndarray: NumPy defers mixed binary operators to us
    __hash__ = None  # type: ignore[assignment]  # mutable, like every ndarray

    def __init__(self, host: numpy.ndarray, usage: DeviceUsage) -> None:
        self._host = host
        self._usage = usage

    # -- the host boundary ---------------------------------------------------------------------------

    def __array__(self, dtype=None, copy=None):
        raise TypeError(IMPLICIT_CONVERSION_MESSAGE)

    def get(self, stream=None, order="C", out=None, blocking=True) -> numpy.ndarray:
        """A host copy (the explicit device-to-host transfer)."""
        self._read("get")
        self._usage.record_launch("device-to-host")
        host = numpy.array(self._host, order=order, copy=True)
        if out is not None:
            out[...] = host
            return out
        return host

    def item(self, *args):
        self._read("item")
        self._usage.record_launch("device-to-host")
        return self._host.item(*args)

    def tolist(self):
        self._read("tolist")
        self._usage.record_launch("device-to-host")
        return self._host.tolist()

    def _read(self, name: str) -> None:
        self._usage.array_attributes.add(name)
        self._usage.device_reads += 1

    def __float__(self) -> float:
        self._usage.device_reads += 1
        self._usage.record_launch("device-to-host")
        return float(self._host)

    def __int__(self) -> int:
        self._usage.device_reads += 1
        self._usage.record_launch("device-to-host")
        return int(self._host)

    def __complex__(self) -> complex:
        self._usage.device_reads += 1
        self._usage.record_launch("device-to-host")
        return complex(self._host)

    def __bool__(self) -> bool:
        self._usage.device_reads += 1
        self._usage.record_launch("device-to-host")
        return bool(self._host)

    def __format__(self, spec: str) -> str:
        self._usage.device_reads += 1
        self._usage.record_launch("device-to-host")
        return format(self._host, spec)

    # No __index__: cupy.ndarray has none, so ``range(device_scalar)`` must fail here as well.

    def __repr__(self) -> str:
        return "device_" + repr(self._host)

    __str__ = __repr__

    # -- NumPy's dispatch protocols ------------------------------------------------------------------

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        # ``numpy.exp(device)`` works on CuPy (forwarded to cupy.exp); ``host + device`` raises.
        name = ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}"
        self._usage.dispatched_names.add(name)
        where = f"numpy.{name}"
        self._usage.record_keywords(where, kwargs)
        out = kwargs.get("out")
        operands = (_to_host_operands(inputs, where), _to_host_operands(kwargs, where))
        result = getattr(ufunc, method)(*operands[0], **operands[1])
        _record_result(self._usage, name, result, operands, wrote=out is not None)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _to_device_results(result, self._usage)

    def __array_function__(self, function, types, args, kwargs):
        name = _dispatched_name(function)
        self._usage.dispatched_names.add(name)
        where = f"numpy.{name}"
        self._usage.record_keywords(where, kwargs)
        operands = (_to_host_operands(args, where), _to_host_operands(kwargs, where))
        result = function(*operands[0], **operands[1])
        _record_result(self._usage, name, result, operands, kernels=_reduction_kernels(name, *operands))
        return _to_device_results(result, self._usage)

    # -- indexing ------------------------------------------------------------------------------------

    def __getitem__(self, key):
        result = self._host[_to_host_operands(key, "indexing a device array")]
        # A scalar index gives a 0-d view on CuPy (NumPy's scalar stands in for it): no launch.
        if not isinstance(result, numpy.generic):
            _record_result(self._usage, "getitem", result, self._host)
        return _to_device_results(result, self._usage)

    def __setitem__(self, key, value) -> None:
        self._host[_to_host_operands(key, "indexing a device array")] = _to_host_operands(
            value, "assigning into a device array"
        )
        self._usage.record_launch("setitem")

    def __len__(self) -> int:
        return len(self._host)

    def __iter__(self):
        # As CuPy: iterating yields device sub-arrays (no transfer).
        for index in range(len(self._host)):
            yield self[index]

    # -- copies --------------------------------------------------------------------------------------

    def __copy__(self) -> "DeviceArray":
        self._usage.record_launch("copy", int(self._host.nbytes))
        return DeviceArray(self._host.copy(), self._usage)

    def __deepcopy__(self, memo) -> "DeviceArray":
        return self.__copy__()

    # -- every other attribute: NumPy's, recorded, with results kept on the device --------------------

    def __getattr__(self, name: str):
        # Dunders (``__array_interface__``, ``__array_struct__`` ...) would let NumPy read the buffer
        # directly, bypassing ``__array__``: a CuPy array has none of them.
        if name.startswith("__") or name in DeviceArray.__slots__:
            raise AttributeError(name)
        self._usage.array_attributes.add(name)
        value = getattr(self._host, name)
        if callable(value):
            return _DeviceMethod(value, self._usage, f"ndarray.{name}", self._host)
        return _to_device_results(value, self._usage)


def _binary_operator(function):
    def method(self, other):
        operand = _to_host_operands(other, f"operator {function.__name__}")
        result = function(self._host, operand)
        _record_result(self._usage, f"operator {function.__name__}", result, (self._host, operand))
        return _to_device_results(result, self._usage)

    return method


def _reflected_operator(function):
    def method(self, other):
        operand = _to_host_operands(other, f"operator {function.__name__}")
        result = function(operand, self._host)
        _record_result(self._usage, f"operator {function.__name__}", result, (self._host, operand))
        return _to_device_results(result, self._usage)

    return method


def _inplace_operator(function):
    def method(self, other):
        function(self._host, _to_host_operands(other, f"operator {function.__name__}"))
        self._usage.record_launch(f"operator {function.__name__}")
        return self

    return method


def _unary_operator(function):
    def method(self):
        result = function(self._host)
        _record_result(self._usage, f"operator {function.__name__}", result, self._host)
        return _to_device_results(result, self._usage)

    return method


# The operators cupy.ndarray defines (it has no __imatmul__ and no __round__).
_ARITHMETIC = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "lshift", "rshift", "and", "or", "xor")
for _name in _ARITHMETIC + ("matmul",):
    _function = getattr(operator, f"{_name}_" if _name in ("and", "or") else _name)
    setattr(DeviceArray, f"__{_name}__", _binary_operator(_function))
    setattr(DeviceArray, f"__r{_name}__", _reflected_operator(_function))
for _name in _ARITHMETIC:
    setattr(DeviceArray, f"__i{_name}__", _inplace_operator(getattr(operator, f"i{_name}")))
for _name in ("lt", "le", "eq", "ne", "gt", "ge"):
    setattr(DeviceArray, f"__{_name}__", _binary_operator(getattr(operator, _name)))
setattr(DeviceArray, "__divmod__", _binary_operator(divmod))
setattr(DeviceArray, "__rdivmod__", _reflected_operator(divmod))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(DeviceArray, f"__{_name}__", _unary_operator(getattr(operator, _name)))
del _name, _function


class _DeviceMethod:
    """A bound method of a device array: device arguments in, device results out, host arrays refused."""

    __slots__ = ("_method", "_usage", "_where", "_owner")

    def __init__(self, method, usage: DeviceUsage, where: str, owner=None) -> None:
        self._method, self._usage, self._where, self._owner = method, usage, where, owner

    def __call__(self, *args, **kwargs):
        self._usage.record_keywords(self._where, kwargs)
        operands = (_to_host_operands(args, self._where), _to_host_operands(kwargs, self._where))
        result = self._method(*operands[0], **operands[1])
        out = kwargs.get("out")
        kernels = _reduction_kernels(self._where, (self._owner, *operands[0]), operands[1])
        _record_result(self._usage, self._where, result, (self._owner, operands), wrote=out is not None, kernels=kernels)
        if isinstance(out, DeviceArray):
            return out  # as CuPy: the output array itself
        return _to_device_results(result, self._usage)


class _DeviceObject:
    """A device-side object (e.g. a random Generator): its methods return device arrays."""

    def __init__(self, target, usage: DeviceUsage) -> None:
        self._target, self._usage = target, usage

    def __getattr__(self, name: str):
        value = getattr(self._target, name)
        qualified = f"{type(self._target).__name__}.{name}"
        self._usage.object_attributes.add(qualified)
        if callable(value):
            return _DeviceMethod(value, self._usage, qualified)
        return value


# --------------------------------------------------------------------------------------------------
# Module-like namespaces: the stand-in's xp and signal
# --------------------------------------------------------------------------------------------------


class DeviceFunction:
    """A NumPy/SciPy function (or ufunc) taking and returning device arrays.

    Attribute access reaches ufunc methods (``xp.add.at``) as device functions too.
    """

    def __init__(
        self, function, usage: DeviceUsage, names: set[str], label: str, qualified_name: str, transfers_host: bool = False
    ) -> None:
        self._function = function
        self._usage = usage
        self._names = names
        self._label = label
        self.__name__ = qualified_name
        self._transfers_host = transfers_host

    def __call__(self, *args, **kwargs):
        where = f"{self._label}.{self.__name__}"
        self._usage.record_keywords(where, kwargs)
        if self._transfers_host:
            return self._transfer(*args, **kwargs)
        operands = (_to_host_operands(args, where), _to_host_operands(kwargs, where))
        result = self._function(*operands[0], **operands[1])
        out = kwargs.get("out")
        kernels = _reduction_kernels(self.__name__, *operands)
        _record_result(self._usage, self.__name__, result, operands, wrote=out is not None, kernels=kernels)
        if isinstance(out, DeviceArray):
            return out  # as CuPy: the output array itself, so ``out is result`` holds
        return _to_device_results(result, self._usage)

    def _transfer(self, data, *args, **kwargs):
        # ``xp.asarray(device_array)`` is a no-op (or a cast); anything else is host data crossing over.
        if isinstance(data, DeviceArray):
            dtype = kwargs.get("dtype", args[0] if args else None)
            if self.__name__ != "array" and (dtype is None or numpy.dtype(dtype) == data.dtype):
                return data
            result = self._function(data._host, *args, **kwargs)
            _record_result(self._usage, self.__name__, result, data._host)
            return DeviceArray(result, self._usage)
        self._usage.transfers_to_device += 1
        host = self._function(_to_host_operands(data, "", allow_host=True), *args, **kwargs)
        # A transfer copies: later changes to the host buffer must not show on the device.
        host = numpy.array(host, copy=True)
        self._usage.record_launch("host-to-device", int(host.nbytes))
        return DeviceArray(host, self._usage)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(self._function, name)
        qualified = f"{self.__name__}.{name}"
        self._names.add(qualified)
        if callable(value) and not isinstance(value, type):
            return DeviceFunction(value, self._usage, self._names, self._label, qualified)
        return value

    def __repr__(self) -> str:
        return f"<stand-in device function {self.__name__}>"


class DeviceNamespace:
    """A module-like view of NumPy (``xp``) or ``scipy.signal`` (``signal``) for the stand-in.

    Every name taken from it is recorded in ``names``; functions are wrapped as
    :class:`DeviceFunction`, submodules as namespaces, ``ndarray`` is :class:`DeviceArray`, and
    types and constants (``float32``, ``dtype``, ``pi``, ``newaxis``) pass through as CuPy's do.
    """

    def __init__(
        self, module: ModuleType, usage: DeviceUsage, names: set[str], label: str, prefix: str = "", host_transfers: bool = False
    ) -> None:
        self._module = module
        self._usage = usage
        self._names = names
        self._label = label
        self._prefix = prefix
        self._host_transfers = host_transfers
        self._cache: dict[str, Any] = {}
        self.__name__ = f"standin:{module.__name__}"

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        qualified = self._prefix + name
        value = getattr(self._module, name)  # AttributeError names the missing attribute
        self._names.add(qualified)
        if name in self._cache:
            return self._cache[name]
        if isinstance(value, ModuleType):
            wrapped = DeviceNamespace(value, self._usage, self._names, self._label, qualified + ".")
        elif value is numpy.ndarray:
            wrapped = DeviceArray
        elif isinstance(value, type) or not callable(value):
            wrapped = value
        else:
            transfers = self._host_transfers and not self._prefix and name in TRANSFER_FUNCTIONS
            wrapped = DeviceFunction(value, self._usage, self._names, self._label, qualified, transfers_host=transfers)
        self._cache[name] = wrapped
        return wrapped

    def __dir__(self) -> list[str]:
        return dir(self._module)

    def __repr__(self) -> str:
        return f"<stand-in namespace over {self._module.__name__}>"


# --------------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StandinBackend(Backend):
    """A :class:`Backend` whose ``xp``/``signal`` are stand-in namespaces; see the module docstring."""

    @property
    def usage(self) -> DeviceUsage:
        """Names used and boundary crossings, shared by every dtype variant of this device."""
        return self.xp._usage

    def synchronize(self) -> None:
        self.usage.synchronizations += 1


def standin_backend(dtype: Any = "float32", usage: DeviceUsage | None = None) -> StandinBackend:
    """A fresh stand-in device (with its own :class:`DeviceUsage` unless one is given)."""
    import scipy.signal

    usage = DeviceUsage() if usage is None else usage
    xp = DeviceNamespace(numpy, usage, usage.module_names, "xp", host_transfers=True)
    signal = DeviceNamespace(scipy.signal, usage, usage.signal_names, "signal")
    return StandinBackend(STANDIN_NAME, xp, signal, float_dtype(dtype))


def is_device_array(value: Any) -> bool:
    """True for stand-in device arrays."""
    return isinstance(value, DeviceArray)


# --------------------------------------------------------------------------------------------------
# Checking recorded names against CuPy
# --------------------------------------------------------------------------------------------------


def cupy_signal_exports() -> set[str]:
    """Names ``cupyx.scipy.signal`` exports, read from the installed package's source.

    Importing the module needs the CUDA libraries (cuBLAS, cuFFT ...), which machines without a GPU
    usually lack; parsing its ``__init__.py`` needs only the files. Raises ``ModuleNotFoundError``
    when CuPy is not installed.
    """
    spec = importlib.util.find_spec("cupyx")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("cupyx (part of CuPy) is not installed")
    root = Path(next(iter(spec.submodule_search_locations))).parent
    return _exported_names(root, "cupyx.scipy.signal")


def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _exported_names(root: Path, module: str) -> set[str]:
    """Public names a module binds at top level: imports (star imports followed), defs, classes, assignments."""
    path = _module_file(root, module)
    if path is None:
        return set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package.split(".")
                source = ".".join(base[: len(base) - node.level + 1] + ([source] if source else []))
            for alias in node.names:
                if alias.name == "*":
                    names |= _star_exports(root, source)
                else:
                    names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return {name for name in names if not name.startswith("_")}


def _star_exports(root: Path, module: str) -> set[str]:
    path = _module_file(root, module)
    if path is None:
        return set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return _exported_names(root, module)


_MISSING = object()


def _resolve_dotted(root: Any, dotted: str, module_prefix: str) -> Any:
    """``root.<dotted>``, or ``_MISSING``."""
    target = root
    for depth, part in enumerate(dotted.split(".")):
        if hasattr(target, part):
            target = getattr(target, part)
            continue
        # Lazily imported submodules (cupy.lib.stride_tricks ...) appear only once imported.
        try:
            target = importlib.import_module(".".join([module_prefix, *dotted.split(".")[: depth + 1]]))
        except ImportError:
            return _MISSING
    return target


def _has_dotted(root: Any, dotted: str, module_prefix: str) -> bool:
    return _resolve_dotted(root, dotted, module_prefix) is not _MISSING


#: The ufunc methods CuPy implements, and for which ufuncs (by ``ufunc.name``): every cupy.ufunc has
#: all five, but reduce, accumulate and reduceat raise NotImplementedError except for these, and
#: ``at`` except where the ufunc has a scatter kernel (``_scatter_op``: add, subtract, maximum,
#: minimum, the bitwise ones ...). cupy/_core/_kernel.pyx, class ufunc; None: every ufunc.
CUPY_UFUNC_METHODS = {
    "reduce": {"cupy_add", "cupy_multiply"},
    "accumulate": {"cupy_add", "cupy_multiply"},
    "reduceat": {"cupy_add"},
    "outer": None,
    "at": None,  # checked against _scatter_op below
}

#: The keywords a cupy.ufunc call takes: it pops these (and the private ``_where``), then raises
#: TypeError on any other, so NumPy's ``where=``, ``order=``, ``subok=`` fail (_kernel.pyx, ufunc.__call__).
CUPY_UFUNC_KEYWORDS = frozenset({"out", "dtype", "casting"})

#: Where a recorded call's namespace lives in CuPy (see DeviceUsage.keywords): ``xp.`` and ``numpy.``
#: (dispatched) names on ``cupy``, array methods on ``cupy.ndarray``, methods of the objects ``xp``
#: returns on their CuPy classes. ``signal.`` calls are read from the source (_signal_keywords).
CUPY_NAMESPACES = {
    "xp": "",
    "numpy": "",
    "ndarray": "ndarray.",
    "Generator": "random.Generator.",
    "RandomState": "random.RandomState.",
}


def _cupy_has(cupy: ModuleType, dotted: str) -> bool:
    """Whether ``cupy.<dotted>`` exists and, for a ufunc method, is implemented for that ufunc."""
    parent, _, method = dotted.rpartition(".")
    ufunc = _resolve_dotted(cupy, parent, "cupy") if parent and method in CUPY_UFUNC_METHODS else None
    if isinstance(ufunc, cupy.ufunc):
        if method == "at":
            return getattr(ufunc, "_scatter_op", None) is not None
        implemented = CUPY_UFUNC_METHODS[method]
        return implemented is None or ufunc.name in implemented
    return _has_dotted(cupy, dotted, "cupy")


def _accepted_keywords(cupy: ModuleType, call: str) -> frozenset[str] | None:
    """The keyword names the CuPy function behind ``call`` takes; None where it takes any
    (``**kwargs``) or where that cannot be told (not found: the name check reports it)."""
    namespace, _, name = call.partition(".")
    if namespace == "signal":
        return _signal_keywords(name)
    if namespace not in CUPY_NAMESPACES:
        return None
    target = _resolve_dotted(cupy, CUPY_NAMESPACES[namespace] + name, "cupy")
    if target is _MISSING:
        return None
    if isinstance(target, cupy.ufunc):
        return CUPY_UFUNC_KEYWORDS
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        # Cython functions and methods (cupy.ndarray's, the ufuncs') have no inspectable signature;
        # CuPy compiles them with embedsignature, so their docstring opens with one. Skipped without.
        return _docstring_keywords(getattr(target, "__doc__", None))
    parameters = signature.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _docstring_keywords(doc: str | None) -> frozenset[str] | None:
    """Keyword names from a Cython docstring's first line, ``_ndarray_base.sum(self, axis=None, ...) -> ...``."""
    match = re.fullmatch(r"[\w.]+\((.*)\)(?:\s*->.*)?", (doc or "").partition("\n")[0].strip())
    try:
        tree = ast.parse(f"def f({match.group(1)}): pass") if match else None
    except SyntaxError:
        return None
    return _ast_keywords(tree.body[0].args) if tree else None


def _ast_keywords(arguments: ast.arguments) -> frozenset[str] | None:
    """The names a parsed ``def`` takes by keyword; None if it takes ``**kwargs``."""
    if arguments.kwarg is not None:
        return None
    return frozenset(arg.arg for arg in arguments.args + arguments.kwonlyargs)


@functools.lru_cache(maxsize=None)
def _signal_definitions() -> dict[str, list[ast.arguments]]:
    """The parameters of every top-level function in ``cupyx.scipy.signal``'s source, by name
    (importing it needs the CUDA libraries, so ``inspect`` cannot be used; see cupy_signal_exports)."""
    spec = importlib.util.find_spec("cupyx")
    root = Path(next(iter(spec.submodule_search_locations))) / "scipy" / "signal"
    definitions: dict[str, list[ast.arguments]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef):
                definitions[node.name].append(node.args)
    return definitions


def _signal_keywords(name: str) -> frozenset[str] | None:
    """Keyword names of the one ``cupyx.scipy.signal`` function so named; None if not one."""
    found = {_ast_keywords(arguments) for arguments in _signal_definitions().get(name, [])}
    return found.pop() if len(found) == 1 else None


def _unsupported_keywords(cupy: ModuleType, usage: DeviceUsage) -> list[str]:
    """Recorded keyword arguments the CuPy function would refuse, as ``"xp.sum(where=)"``."""
    unsupported = []
    for call, names in usage.keywords.items():
        accepted = _accepted_keywords(cupy, call)
        if accepted is not None:
            unsupported += [f"{call}({name}=)" for name in names - accepted]
    return sorted(unsupported)


def _cupy_has_object_attribute(cupy: ModuleType, qualified: str) -> bool:
    """``"Generator.permutation"``: whether CuPy's counterpart of that type has the attribute."""
    kind, _, name = qualified.partition(".")
    return kind in CUPY_NAMESPACES and _has_dotted(cupy, CUPY_NAMESPACES[kind] + name, "cupy")


def missing_cupy_names(usage: DeviceUsage) -> dict[str, list[str]]:
    """Recorded names CuPy lacks or refuses, by where they were used; empty lists everywhere means
    the code would run as written on CuPy, as far as names and keywords tell.

    ``xp`` names are looked up on ``cupy`` (a ufunc method, ``maximum.reduce``, must also be one
    CuPy implements for that ufunc), ``signal`` names among the exports of ``cupyx.scipy.signal``,
    array attributes on ``cupy.ndarray``, NumPy functions called on device arrays on ``cupy`` (where
    CuPy's dispatch looks for them), and ``objects`` (methods of what ``xp`` returned, such as a
    random Generator) on CuPy's class of that name. ``keywords`` lists keyword arguments the CuPy
    function would refuse, as ``"xp.sum(where=)"``: a ufunc takes only ``out``, ``dtype`` and
    ``casting``; other functions and methods what their signature names (``inspect``, the source
    for ``signal``, the docstring for CuPy's compiled methods), and are not checked without one.
    """
    try:
        cupy = importlib.import_module("cupy")
    except ImportError:
        raise ImportError(
            "missing_cupy_names checks names against CuPy, which is not installed: pip install cupy-cuda12x "
            "(or cupy-cuda13x; it installs and imports without a GPU)"
        ) from None
    signal_exports = cupy_signal_exports()
    return {
        "xp": sorted(name for name in usage.module_names if not _cupy_has(cupy, name)),
        "signal": sorted(name for name in usage.signal_names if name.split(".")[0] not in signal_exports),
        "array": sorted(name for name in usage.array_attributes if not hasattr(cupy.ndarray, name)),
        "dispatched": sorted(name for name in usage.dispatched_names if not _cupy_has(cupy, name)),
        "objects": sorted(name for name in usage.object_attributes if not _cupy_has_object_attribute(cupy, name)),
        "keywords": _unsupported_keywords(cupy, usage),
    }


def standin_only_attributes() -> list[str]:
    """Attributes :class:`DeviceArray` defines that ``cupy.ndarray`` lacks (should be none)."""
    cupy = importlib.import_module("cupy")
    own = {name for klass in DeviceArray.__mro__[:-1] for name in vars(klass)}
    # Machinery of the stand-in itself, not API that code could come to rely on.
    machinery = {"__getattr__", "__init__", "__slots__", "_host", "_usage", "_read"}
    return sorted(name for name in own - machinery if not hasattr(cupy.ndarray, name))


__all__ = [
    "DeviceArray",
    "DeviceFunction",
    "DeviceNamespace",
    "DeviceUsage",
    "HostArrayError",
    "StandinBackend",
    "cupy_signal_exports",
    "is_device_array",
    "missing_cupy_names",
    "standin_backend",
    "standin_only_attributes",
]
