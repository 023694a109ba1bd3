"""Optimisers and learning-rate schedules.

Updates are in place on the device arrays, with Python-float hyper-parameters so that float32
parameters stay float32. ``state_dict``/``load_state_dict`` move optimiser state to and from host
arrays for checkpoints.
"""

from __future__ import annotations

import math
from typing import Sequence

from .backend import Backend
from .layers import Parameter


class Optimizer:
    """Base class: holds the parameters, the current learning rate and per-parameter state buffers."""

    #: the name :func:`make_optimizer` knows it by
    name: str = ""
    #: names of the per-parameter state buffers (e.g. momentum), saved in checkpoints
    buffer_names: tuple[str, ...] = ()

    def __init__(self, params: Sequence[Parameter], lr: float, backend: Backend) -> None:
        if not lr > 0:
            raise ValueError(f"{type(self).__name__}: learning rate must be > 0, got {lr!r}")
        self.params = list(params)
        self.lr = float(lr)
        self.backend = backend
        self.steps = 0
        xp = backend.xp
        self.buffers = {name: [xp.zeros_like(p.data) for p in self.params] for name in self.buffer_names}

    def step(self) -> None:
        """Apply one update from the gradients stored in the parameters."""
        self.steps += 1
        for index, param in enumerate(self.params):
            if param.grad is not None:
                self._update(index, param)

    def _update(self, index: int, param: Parameter) -> None:
        raise NotImplementedError

    def config(self) -> dict:
        """Hyper-parameters that rebuild this optimiser."""
        return {"lr": self.lr}

    def state_dict(self) -> dict:
        """Host copies of the state buffers plus the step count, by name."""
        state = {f"{name}/{i}": self.backend.to_numpy(buf) for name, bufs in self.buffers.items() for i, buf in enumerate(bufs)}
        state["steps"] = self.steps
        return state

    def load_state_dict(self, state: dict) -> None:
        for name, bufs in self.buffers.items():
            for i, buf in enumerate(bufs):
                key = f"{name}/{i}"
                if key not in state or tuple(state[key].shape) != tuple(buf.shape):
                    raise ValueError(f"{type(self).__name__}: optimiser state {key!r} is missing or has the wrong shape")
                bufs[i] = self.backend.to_device(state[key].astype(buf.dtype))
        self.steps = int(state["steps"])


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    ``v = momentum * v + (g + weight_decay * w)``; ``w -= lr * v`` (or ``lr * (g + momentum * v)``
    with Nesterov), as in PyTorch.
    """

    name = "sgd"

    def __init__(
        self,
        params: Sequence[Parameter],
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        backend: Backend,
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {momentum!r}")
        if weight_decay < 0:
            raise ValueError(f"SGD: weight_decay must be >= 0, got {weight_decay!r}")
        self.momentum, self.weight_decay, self.nesterov = float(momentum), float(weight_decay), bool(nesterov)
        self.buffer_names = ("velocity",) if momentum else ()
        super().__init__(params, lr, backend)

    def config(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay, "nesterov": self.nesterov}

    def _update(self, index: int, param: Parameter) -> None:
        grad = param.grad
        if self.weight_decay:
            grad = grad + self.weight_decay * param.data
        if self.momentum:
            velocity = self.buffers["velocity"][index]
            velocity *= self.momentum
            velocity += grad
            grad = grad + self.momentum * velocity if self.nesterov else velocity
        param.data -= self.lr * grad


class Adam(Optimizer):
    """Adam with bias correction; ``weight_decay`` is decoupled (AdamW): ``w -= lr * wd * w``."""

    name = "adam"
    buffer_names = ("first_moment", "second_moment")

    def __init__(
        self,
        params: Sequence[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        backend: Backend,
    ) -> None:
        beta1, beta2 = betas
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"Adam: betas must be in [0, 1), got {betas!r}")
        self.beta1, self.beta2, self.eps, self.weight_decay = float(beta1), float(beta2), float(eps), float(weight_decay)
        super().__init__(params, lr, backend)

    def config(self) -> dict:
        return {"lr": self.lr, "betas": [self.beta1, self.beta2], "eps": self.eps, "weight_decay": self.weight_decay}

    def step(self) -> None:
        # Bias corrections depend only on the step count: computed once per step on the host.
        self._correction1 = 1.0 - self.beta1 ** (self.steps + 1)
        self._correction2 = 1.0 - self.beta2 ** (self.steps + 1)
        super().step()

    def _update(self, index: int, param: Parameter) -> None:
        xp = self.backend.xp
        grad = param.grad
        m = self.buffers["first_moment"][index]
        v = self.buffers["second_moment"][index]
        m *= self.beta1
        m += (1.0 - self.beta1) * grad
        v *= self.beta2
        v += (1.0 - self.beta2) * (grad * grad)
        if self.weight_decay:
            param.data -= (self.lr * self.weight_decay) * param.data
        step_size = self.lr / self._correction1
        denom = xp.sqrt(v * (1.0 / self._correction2))
        denom += self.eps
        param.data -= step_size * (m / denom)


OPTIMIZERS = {cls.name: cls for cls in (SGD, Adam)}


def make_optimizer(name: str, params: Sequence[Parameter], backend: Backend, **kwargs) -> Optimizer:
    """Build an optimiser by name (``"sgd"`` or ``"adam"``)."""
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None
    return cls(params, backend=backend, **kwargs)


# -- learning-rate schedules -------------------------------------------------------------------------


class ConstantSchedule:
    """The base learning rate at every step."""

    name = "constant"

    def __init__(self, base_lr: float) -> None:
        self.base_lr = float(base_lr)

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
        if step_size < 1:
            raise ValueError(f"StepSchedule: step_size must be >= 1, got {step_size!r}")
        self.step_size, self.gamma = int(step_size), float(gamma)

    def __call__(self, step: int) -> float:
        return self.base_lr * self.gamma ** (step // self.step_size)

    def config(self) -> dict:
        return {**super().config(), "step_size": self.step_size, "gamma": self.gamma}


class CosineSchedule(ConstantSchedule):
    """Linear warm-up over ``warmup_steps``, then cosine decay from ``base_lr`` to ``min_lr`` at ``total_steps``."""

    name = "cosine"

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> None:
        super().__init__(base_lr)
        if total_steps < 1 or not 0 <= warmup_steps < total_steps:
            raise ValueError(
                f"CosineSchedule: need total_steps >= 1 and 0 <= warmup_steps < total_steps, got {total_steps}, {warmup_steps}"
            )
        self.total_steps, self.warmup_steps, self.min_lr = int(total_steps), int(warmup_steps), float(min_lr)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def config(self) -> dict:
        return {
            **super().config(),
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_lr": self.min_lr,
        }


SCHEDULE_TYPES = {cls.name: cls for cls in (ConstantSchedule, StepSchedule, CosineSchedule)}
