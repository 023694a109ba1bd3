"""Optimisers and learning-rate schedules.

Updates are in place on the device arrays, with Python-float hyper-parameters so that float32
parameters stay float32. ``state_dict``/``load_state_dict`` move optimiser state to and from host
arrays for checkpoints, one array per parameter.

When the parameters are exactly a model's flat buffer (``model.parameters()`` of a
:class:`~cnn_backend.model.Sequential`, see :mod:`cnn_backend.parameters`), the state buffers are
flat too and a step updates every parameter at once: a few whole-array operations per step instead
of as many per parameter (13 instead of 13 per parameter for Adam: a GPU kernel launch each).
Other parameter lists (a subset, hand-built parameters) are updated one by one with the same
operations, so both paths give identical results. A parameter whose gradient is None is skipped
(no decay, no moment update), as it always was: a step in which any gradient is None takes the
per-parameter path.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

from .backend import DTYPES, Backend, backend_of
from .init import as_integer, as_number, is_flag, is_number
from .layers import Layer
from .parameters import FlatParameters, Parameter, shared_flat_buffer


class Optimizer:
    """Base class: holds the parameters, the current learning rate and per-parameter state buffers.

    ``buffers[name][i]`` is parameter ``i``'s state buffer ``name`` (a view of one flat array per
    name when the parameters are flat). Subclasses implement :meth:`_update` on plain arrays: it is
    called once with the flat arrays, or once per parameter with that parameter's arrays.
    """

    #: the name :func:`make_optimizer` knows it by
    name: str = ""
    #: names of the per-parameter state buffers (e.g. momentum), saved in checkpoints
    buffer_names: tuple[str, ...] = ()
    #: every buffer name this kind may keep (SGD keeps a velocity only with momentum): a state
    #: holding a name of another kind's was saved by that kind
    known_buffers: tuple[str, ...] = ()
    #: how many scratch arrays (each the size of the parameters) an update needs
    scratch_count: int = 1

    def __init__(self, params: Sequence[Parameter], lr: float, backend: Backend | None = None) -> None:
        self.params = _checked_parameters(type(self).__name__, params)
        self.lr = as_number(lr, f"{type(self).__name__}: learning rate", "a finite number > 0", _finite_positive)
        self.steps = 0
        self._flat: FlatParameters | None = shared_flat_buffer(self.params)
        self.backend = self._parameters_backend() if backend is None else backend
        self._flat_buffers: dict = {}
        self.buffers: dict[str, list] = {}
        for buffer_name in self.buffer_names:
            self._flat_buffers[buffer_name], self.buffers[buffer_name] = self._zero_state()
        self._scratch = None
        self._placement = self._parameters_placement()

    def _parameters_backend(self) -> Backend:
        """The device the parameters live on, for an optimiser built without ``backend=``: the
        model's flat buffer knows it, and so does each parameter still in one (a subset of a
        model's); outside one, NumPy arrays are on the CPU, CuPy's on CUDA."""
        if not self.params:
            raise ValueError(f"{type(self).__name__}: the parameter list is empty; pass model.parameters()")
        in_flat_buffers = {None if p.flat is None else p.flat.backend for p in self.params}
        if len(in_flat_buffers) == 1 and None not in in_flat_buffers:
            return in_flat_buffers.pop()
        by_array = [backend_of(p.data) for p in self.params]
        if None not in by_array and len({backend.name for backend in by_array}) == 1:
            return by_array[0]
        raise ValueError(
            f"{type(self).__name__}: cannot tell which device these parameters are on; pass backend=model.backend"
        )

    def _parameters_placement(self):
        """The parameters' array type and dtype: what the state arrays must match."""
        return (type(self.params[0].data), self.params[0].data.dtype) if self.params else None

    def _follow_parameters(self) -> None:
        """Convert the state to the parameters' device and dtype when they moved after this
        optimiser was built (``model.to``): an optimiser made before ``model.to(get_backend("cpu", "float64"))`` then
        keeps float64 moments, converted rather than reset, as PyTorch's state follows its parameters."""
        placement = self._parameters_placement()
        if placement == self._placement:
            return
        flat = shared_flat_buffer(self.params)
        if flat is not None:
            backend = flat.backend
        elif placement[0] is type(self.backend.xp.empty(0)):
            backend = self.backend.with_dtype(placement[1])
        else:
            raise ValueError(
                f"{type(self).__name__}: its parameters moved to another device after it was built; "
                "build the optimiser after moving them"
            )
        old_backend, old_buffers = self.backend, dict(self.buffers)
        self.backend, self._flat, self._scratch = backend, flat, None
        for name in self.buffer_names:
            self._flat_buffers[name], self.buffers[name] = self._zero_state()
            for new, old in zip(self.buffers[name], old_buffers[name]):
                new[...] = backend.to_device(old_backend.to_numpy(old).astype(backend.dtype))
        self._placement = placement

    def _zero_state(self):
        """``(flat array or None, per-parameter arrays)``, zero, laid out like the parameters."""
        xp = self.backend.xp
        if self._flat is not None:
            flat = xp.zeros(self._flat.size, dtype=self._flat.dtype)
            return flat, self._flat.views(flat)
        return None, [xp.zeros_like(p.data) for p in self.params]

    def zero_grad(self) -> None:
        """Set every parameter's gradient to zero, as PyTorch's ``optimizer.zero_grad()`` does. Here
        each backward pass replaces the gradients instead of adding to them, so a training loop
        need not call it; it is kept for loops written for PyTorch."""
        for parameter in self.params:
            if parameter.grad is not None:
                parameter.grad[...] = 0

    def step(self) -> None:
        """Apply one update from the gradients stored in the parameters."""
        # Checked at every step, not only when built: a schedule (or code) sets ``lr`` between steps.
        # Zero is a schedule's start or end (no update); a negative rate would climb the loss.
        if not (is_number(self.lr) and math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"{type(self).__name__}: the learning rate must be a finite number >= 0, got {self.lr!r} (set by a schedule or by code)")
        self._follow_parameters()
        self.steps += 1
        if self._scratch is None:
            self._scratch = [self._zero_state() for _ in range(self.scratch_count)]
        flat = self._current_flat()
        if flat is not None and all(p.grad is not None for p in self.params):
            state = {name: self._flat_buffers[name] for name in self.buffer_names}
            self._update(flat.data, flat.grad, state, [whole for whole, _ in self._scratch])
            return
        for index, param in enumerate(self.params):
            if param.grad is not None:
                state = {name: bufs[index] for name, bufs in self.buffers.items()}
                self._update(param.data, param.grad, state, [parts[index] for _, parts in self._scratch])

    def _current_flat(self) -> FlatParameters | None:
        """The flat buffer to update whole, if the parameters are still exactly one.

        A model that rebuilt its buffer with the same layout (``flatten_parameters`` after a
        parameter left it) is followed; the state arrays stay valid since the layout is the same.
        """
        flat = self._flat
        if flat is None or flat.covers(self.params):
            return flat
        rebuilt = shared_flat_buffer(self.params)
        if rebuilt is not None and (rebuilt.offsets, rebuilt.size, rebuilt.dtype) == (flat.offsets, flat.size, flat.dtype):
            self._flat = rebuilt
            return rebuilt
        return None

    def _update(self, data, grad, state: dict, scratch: list) -> None:
        """Update ``data`` in place from ``grad``, the state arrays ``state[name]`` and writable
        ``scratch`` arrays, all of ``data``'s shape."""
        raise NotImplementedError

    def config(self) -> dict:
        """Hyper-parameters that rebuild this optimiser."""
        return {"lr": self.lr}

    def state_dict(self) -> dict:
        """Host copies of the state buffers plus the step count, by name (copies even on the CPU,
        where ``to_numpy`` returns the live buffer: the next step would change a saved state)."""
        self._follow_parameters()
        state = {f"{name}/{i}": self.backend.to_numpy(buf).copy() for name, bufs in self.buffers.items() for i, buf in enumerate(bufs)}
        state["steps"] = self.steps
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`. All of it is checked before anything changes, so a refused
        state leaves this optimiser as it was. Buffers may be any array-likes (lists included); a
        buffer of this kind that this optimiser does not keep (a velocity, without momentum) is ignored."""
        self._follow_parameters()
        owner = type(self).__name__
        if not isinstance(state, Mapping):
            raise ValueError(f"{owner}: optimiser state must be a dict as state_dict() returns, got {type(state).__name__}")
        self._check_kind(state)
        if "steps" not in state:
            raise ValueError(f"{owner}: optimiser state has no 'steps' entry; pass a dict that state_dict() returned")
        steps = state["steps"]
        if getattr(steps, "ndim", None) == 0:  # a 0-d array, as a state saved with numpy.savez holds
            steps = steps.item()
        # Below 0, Adam's bias correction 1 - beta ** steps goes negative, flipping the updates.
        steps = as_integer(steps, f"{owner}: optimiser state 'steps'", 0)
        loaded = {}
        for name, bufs in self.buffers.items():
            for i, buf in enumerate(bufs):
                key = f"{name}/{i}"
                value = self._device_numbers(state[key], key) if key in state else None
                if value is None or tuple(value.shape) != tuple(buf.shape):
                    raise ValueError(f"{owner}: optimiser state {key!r} is missing or has the wrong shape")
                # Checked after the cast: a float64 value too large for float32 becomes infinite.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    value = value.astype(buf.dtype)
                if not bool(self.backend.xp.isfinite(value).all()):
                    raise ValueError(
                        f"{owner}: optimiser state {key!r} holds NaN or infinite values; "
                        "use a state saved before the run diverged"
                    )
                loaded[key] = (buf, value)
        for buf, value in loaded.values():
            buf[...] = value  # copied into place: the buffers may be views of one flat array
        self.steps = steps

    def _device_numbers(self, value, key: str):
        """``value`` (an array of this device or the host, or a list) on this device; a one-line
        ValueError when it is not numbers."""
        try:
            array = self.backend.to_device(value)
        except (TypeError, ValueError):  # ragged lists, objects no array holds
            array = None
        if array is None or array.dtype.kind not in "iuf":
            raise ValueError(f"{type(self).__name__}: optimiser state {key!r} must be an array of numbers, got {_short(value)}")
        return array

    def _check_kind(self, state: Mapping) -> None:
        """Refuse a state holding buffers this kind never keeps, naming the kind that keeps them."""
        foreign = sorted({str(key).split("/")[0] for key in state if key != "steps"} - set(self.known_buffers))
        if not foreign:
            return
        owner = type(self).__name__
        kinds = [cls.__name__ for cls in OPTIMIZERS.values() if set(foreign) <= set(cls.known_buffers)]
        names = ", ".join(repr(name) for name in foreign)
        if kinds:
            raise ValueError(
                f"{owner}: this optimiser state was saved by {kinds[0]} (its {names} buffers); "
                f"load it into {kinds[0]}, or load a state saved by {owner}"
            )
        raise ValueError(f"{owner}: optimiser state holds unknown buffers {names}; pass a dict that {owner}.state_dict() returned")


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    ``v = momentum * v + (g + weight_decay * w)``; ``w -= lr * v`` (or ``lr * (g + momentum * v)``
    with Nesterov), as in PyTorch.
    """

    name = "sgd"
    known_buffers = ("velocity",)

    def __init__(
        self,
        params: Sequence[Parameter],
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        backend: Backend | None = None,
    ) -> None:
        momentum = as_number(momentum, "SGD: momentum", "in [0, 1)", lambda value: 0.0 <= value < 1.0)
        weight_decay = as_number(weight_decay, "SGD: weight_decay", "a finite number >= 0", _finite_non_negative)
        if not is_flag(nesterov):  # "no" would be true
            raise ValueError(f"SGD: nesterov must be true or false, got {nesterov!r}")
        if nesterov and not momentum:
            # Nesterov without momentum is plain SGD: a momentum was forgotten (PyTorch refuses it too).
            raise ValueError(f"SGD: nesterov=True needs a momentum > 0, got momentum={momentum!r}")
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, bool(nesterov)
        self.buffer_names = ("velocity",) if momentum else ()
        self.scratch_count = 2 if nesterov and momentum and weight_decay else 1
        super().__init__(params, lr, backend)

    def config(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay, "nesterov": self.nesterov}

    def _update(self, data, grad, state: dict, scratch: list) -> None:
        xp = self.backend.xp
        work = scratch[0]
        if self.weight_decay:
            xp.multiply(data, self.weight_decay, out=work)
            work += grad
            grad = work
        if self.momentum:
            velocity = state["velocity"]
            velocity *= self.momentum
            velocity += grad
            if self.nesterov:
                ahead = scratch[1] if grad is work else work
                xp.multiply(velocity, self.momentum, out=ahead)
                ahead += grad
                grad = ahead
            else:
                grad = velocity
        if grad is work or (len(scratch) > 1 and grad is scratch[1]):
            grad *= self.lr
            data -= grad
        else:
            xp.multiply(grad, self.lr, out=work)
            data -= work


class Adam(Optimizer):
    """Adam with bias correction; ``weight_decay`` is decoupled (AdamW): ``w -= lr * wd * w``."""

    name = "adam"
    buffer_names = known_buffers = ("first_moment", "second_moment")

    def __init__(
        self,
        params: Sequence[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        backend: Backend | None = None,
    ) -> None:
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):  # not a pair
            beta1 = beta2 = None
        if not (is_number(beta1) and is_number(beta2)):
            raise ValueError(f"Adam: betas must be a pair of numbers in [0, 1), got {betas!r}")
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"Adam: betas must be in [0, 1), got {betas!r}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.eps = as_number(eps, "Adam: eps", "a finite number >= 0", _finite_non_negative)
        self.weight_decay = as_number(weight_decay, "Adam: weight_decay", "a finite number >= 0", _finite_non_negative)
        super().__init__(params, lr, backend)

    def config(self) -> dict:
        return {"lr": self.lr, "betas": [self.beta1, self.beta2], "eps": self.eps, "weight_decay": self.weight_decay}

    def step(self) -> None:
        # Bias corrections depend only on the step count: computed once per step on the host.
        self._correction1 = 1.0 - self.beta1 ** (self.steps + 1)
        self._correction2 = 1.0 - self.beta2 ** (self.steps + 1)
        super().step()

    def _update(self, data, grad, state: dict, scratch: list) -> None:
        xp = self.backend.xp
        m, v, work = state["first_moment"], state["second_moment"], scratch[0]
        m *= self.beta1
        xp.multiply(grad, 1.0 - self.beta1, out=work)
        m += work
        v *= self.beta2
        xp.multiply(grad, grad, out=work)
        work *= 1.0 - self.beta2
        v += work
        if self.weight_decay:
            data *= 1.0 - self.lr * self.weight_decay  # w -= lr * wd * w in one pass, as PyTorch's AdamW
        # data -= lr / c1 * m / (sqrt(v / c2) + eps), one operation at a time into the scratch array.
        xp.multiply(v, 1.0 / self._correction2, out=work)
        xp.sqrt(work, out=work)
        work += self.eps
        xp.divide(m, work, out=work)
        work *= self.lr / self._correction1
        data -= work


def _short(value) -> str:
    """A value for a one-line message, cut if long."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def _checked_parameters(owner: str, params) -> list[Parameter]:
    """``params`` as a list, refused in one line unless every item is a float32 or float64
    :class:`Parameter` (a model, named parameters or a lone parameter are common slips)."""
    expected = f"{owner}: expected parameters (model.parameters()), got"
    if callable(getattr(params, "parameters", None)):  # a Sequential
        raise TypeError(f"{expected} a {type(params).__name__}: pass model.parameters()")
    if isinstance(params, Layer):
        raise TypeError(f"{expected} a {type(params).__name__} layer: pass [param for _, param in layer.named_parameters()]")
    if isinstance(params, Parameter):
        raise TypeError(f"{expected} a single Parameter: pass a list of it, [param]")
    if isinstance(params, Mapping):
        raise TypeError(f"{expected} a {type(params).__name__}: pass a list of its parameters, list(params.values())")
    if isinstance(params, (str, bytes)) or not hasattr(params, "__iter__"):
        raise TypeError(f"{expected} {_short(params)}")
    params = list(params)
    for index, param in enumerate(params):
        if isinstance(param, tuple) and len(param) == 2 and isinstance(param[1], Parameter):
            raise TypeError(f"{expected} (name, parameter) pairs: pass model.parameters(), not named_parameters()")
        if not isinstance(param, Parameter):
            raise TypeError(f"{expected} a {type(param).__name__} at index {index}; every item must be a cnn_backend Parameter")
    for index, param in enumerate(params):
        dtype = getattr(param.data, "dtype", None)
        if dtype is None:
            raise TypeError(f"{owner}: parameter {index} holds a {type(param.data).__name__}, not an array; make it Parameter(array)")
        # Updates in float16 lose most steps to rounding and integers cannot take them at all.
        if str(dtype) not in DTYPES:
            raise ValueError(f"{owner}: parameters of dtype {dtype} cannot be updated; use {' or '.join(DTYPES)}")
    return params


OPTIMIZERS = {cls.name: cls for cls in (SGD, Adam)}


def make_optimizer(name: str, params: Sequence[Parameter], backend: Backend, **kwargs) -> Optimizer:
    """Build an optimiser by name (``"sgd"`` or ``"adam"``)."""
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None
    return cls(params, backend=backend, **kwargs)


# -- learning-rate schedules -------------------------------------------------------------------------


def _cosine_between(start: float, end: float, fraction: float) -> float:
    """Half a cosine from ``start`` (``fraction`` 0) to ``end`` (``fraction`` 1)."""
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * fraction))


def _finite_non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def _finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


class ConstantSchedule:
    """The base learning rate at every step."""

    name = "constant"

    def __init__(self, base_lr: float) -> None:
        self.base_lr = as_number(base_lr, f"{type(self).__name__}: base_lr", "a finite number > 0", _finite_positive)

    def __call__(self, step: int) -> float:
        return self.base_lr

    def config(self) -> dict:
        """The schedule as JSON-ready data: ``name`` plus the constructor arguments."""
        return {"name": self.name, "base_lr": self.base_lr}


class StepSchedule(ConstantSchedule):
    """``base_lr * gamma ** (step // step_size)``."""

    name = "step"

    def __init__(self, base_lr: float, step_size: int, gamma: float = 0.1) -> None:
        super().__init__(base_lr)
        # Refused, not truncated: int(1.5) would decay every step.
        self.step_size = as_integer(step_size, "StepSchedule: step_size", 1)
        self.gamma = as_number(gamma, "StepSchedule: gamma", "a finite number > 0", _finite_positive)

    def __call__(self, step: int) -> float:
        return self.base_lr * self.gamma ** (step // self.step_size)

    def config(self) -> dict:
        return {**super().config(), "step_size": self.step_size, "gamma": self.gamma}


class CosineSchedule(ConstantSchedule):
    """Linear warm-up over ``warmup_steps``, then cosine decay from ``base_lr`` to ``min_lr`` at ``total_steps``."""

    name = "cosine"

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> None:
        super().__init__(base_lr)
        total_steps = as_integer(total_steps, "CosineSchedule: total_steps", 1)  # refused, not truncated
        warmup_steps = as_integer(warmup_steps, "CosineSchedule: warmup_steps", 0)
        if not warmup_steps < total_steps:
            raise ValueError(
                f"CosineSchedule: need total_steps >= 1 and 0 <= warmup_steps < total_steps, got {total_steps}, {warmup_steps}"
            )
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.min_lr = as_number(min_lr, "CosineSchedule: min_lr", "a finite number >= 0", _finite_non_negative)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return _cosine_between(self.base_lr, self.min_lr, progress)

    def config(self) -> dict:
        return {
            **super().config(),
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_lr": self.min_lr,
        }


class OneCycleSchedule(ConstantSchedule):
    """The one-cycle policy (Smith & Topin), as ``torch.optim.lr_scheduler.OneCycleLR`` with its
    cosine annealing and without momentum cycling: from ``base_lr / div_factor`` up to ``base_lr``
    over the first ``pct_start`` of ``total_steps``, then down to ``base_lr / (div_factor *
    final_div_factor)`` at the last step, each half a cosine."""

    name = "one-cycle"

    def __init__(
        self, base_lr: float, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4
    ) -> None:
        super().__init__(base_lr)
        self.total_steps = as_integer(total_steps, "OneCycleSchedule: total_steps", 2)  # refused, not truncated
        self.pct_start = as_number(pct_start, "OneCycleSchedule: pct_start", "in (0, 1)", lambda value: 0.0 < value < 1.0)
        self.div_factor = as_number(div_factor, "OneCycleSchedule: div_factor", "a finite number > 0", _finite_positive)
        self.final_div_factor = as_number(final_div_factor, "OneCycleSchedule: final_div_factor", "a finite number > 0", _finite_positive)

    def __call__(self, step: int) -> float:
        initial_lr = self.base_lr / self.div_factor
        final_lr = initial_lr / self.final_div_factor
        peak_step = self.pct_start * self.total_steps - 1  # the step at base_lr, as PyTorch counts it
        last_step = self.total_steps - 1
        if step <= peak_step:
            return _cosine_between(initial_lr, self.base_lr, step / peak_step if peak_step > 0 else 1.0)
        return _cosine_between(self.base_lr, final_lr, min(1.0, (step - peak_step) / (last_step - peak_step)))

    def config(self) -> dict:
        return {
            **super().config(),
            "total_steps": self.total_steps,
            "pct_start": self.pct_start,
            "div_factor": self.div_factor,
            "final_div_factor": self.final_div_factor,
        }


SCHEDULE_TYPES = {cls.name: cls for cls in (ConstantSchedule, StepSchedule, CosineSchedule, OneCycleSchedule)}
