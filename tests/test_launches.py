"""Device work counted on the stand-in: the counting rules, the optimisers' launches per step, and
bounds on each built-in model's launches per training step and per inference batch."""

from __future__ import annotations

import json

import numpy
import pytest

from cnn_backend import benchmark
from cnn_backend.launches import count_launches
from cnn_backend.model import plain_cnn, seed_cnn
from cnn_backend.optim import SGD, Adam
from cnn_backend.testing import standin_backend

# Launches per step, float32, gemm convolutions (independent of the batch size). Measured on this
# code: the figure in the comment. Each bound leaves less headroom than the model has parameters,
# so one more operation per parameter (or per kernel offset) fails the test. Before the flat buffer
# the same steps took: seed 96 (sgd) / 132 (adam), plain 134 (sgd) / 206 (adam), a mean counted as
# one launch. The training bounds rose with the measured figures when a mean came to count as CuPy's
# two CUB kernels (+1 for the loss's mean; +4 more for the default network's two 4-D BatchNorms),
# keeping the same headroom.
LAUNCH_BOUNDS = {
    ("seed", "train", "sgd"): 89,  # measured 87
    ("seed", "train", "adam"): 98,  # measured 96
    ("seed", "infer", None): 47,  # measured 46
    ("default", "train", "sgd"): 200,  # measured 194
    ("default", "train", "adam"): 209,  # measured 203
    ("default", "infer", None): 60,  # measured 58
    ("plain", "train", "sgd"): 110,  # measured 107
    ("plain", "train", "adam"): 119,  # measured 116
    ("plain", "infer", None): 40,  # measured 38
}


@pytest.mark.parametrize("model, mode, optimizer", list(LAUNCH_BOUNDS), ids=lambda v: str(v))
def test_launches_per_step_stay_under_their_bounds(model, mode, optimizer):
    row = count_launches(model, mode, batch_size=8, optimizer=optimizer or "sgd")
    assert row["device_reads"] == 0, "a step must not read device values back (a GPU sync each)"
    bound = LAUNCH_BOUNDS[model, mode, optimizer]
    assert row["launches"] <= bound, f"{row['launches']} launches: {row['launches_by_name']}"


def _step_launches(optimizer, backend) -> int:
    for param in optimizer.params:
        param.grad = backend.xp.ones_like(param.data)
    optimizer.step()  # the first step allocates the scratch arrays
    backend.usage.reset_counters()
    optimizer.step()
    return backend.usage.kernel_launches


@pytest.mark.parametrize("build", [seed_cnn, plain_cnn])
def test_a_flat_optimiser_step_takes_the_same_few_launches_for_any_model(build):
    be = standin_backend("float32")
    model = build(be, seed=0)
    n = len(model.parameters())
    expected = {
        # launches per step for the whole flat buffer; per parameter on the per-parameter path
        lambda ps: Adam(ps, backend=be): 13,
        lambda ps: Adam(ps, weight_decay=0.01, backend=be): 14,
        lambda ps: SGD(ps, lr=0.1, backend=be): 2,
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, backend=be): 4,
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, backend=be): 8,
    }
    for make, launches in expected.items():
        assert _step_launches(make(model.parameters()), be) == launches
        # The same optimiser over a list that is not the model's flat buffer: once per parameter.
        assert _step_launches(make(list(reversed(model.parameters()))), be) == launches * n


def test_counting_rules_follow_what_a_gpu_would_run():
    be = standin_backend("float32")
    xp, usage = be.xp, be.usage
    a = be.to_device(numpy.ones((4, 6), dtype=numpy.float32))
    assert usage.kernel_launches == 1 and usage.bytes_allocated == 96  # the transfer
    cases = [
        (lambda: a.reshape(6, 4), 0, 0),  # views launch nothing
        (lambda: a.T, 0, 0),
        (lambda: a[1:3], 0, 0),
        (lambda: xp.broadcast_to(a[0], (3, 6)), 0, 0),
        (lambda: xp.empty((10,), dtype=xp.float32), 0, 40),  # allocation only
        (lambda: xp.zeros((10,), dtype=xp.float32), 1, 40),
        (lambda: a + 1.0, 1, 96),
        (lambda: a.T.reshape(-1), 1, 96),  # a copy: not a view
        (lambda: a.sum(), 1, 4),
        # A mean is a CUB sum, then a division, where CuPy's default CUB accelerator takes it: a
        # contiguous array reduced over all axes, or trailing (C order) or leading (F order) ones.
        (lambda: a.mean(), 2, 4),
        (lambda: xp.mean(a, axis=1), 2, 16),
        (lambda: numpy.mean(a, axis=-1), 2, 16),
        (lambda: a.var(axis=1), 3, 16),  # that mean, then the variance's own reduction
        (lambda: xp.mean(a, axis=0), 1, 24),  # otherwise CuPy's one fused reduction kernel
        (lambda: xp.mean(a.T, axis=1), 1, 24),
        (lambda: xp.multiply(a, 2.0, out=a), 1, 0),  # written in place
        (lambda: a.__iadd__(1.0), 1, 0),
        (lambda: a.__setitem__((slice(0, 2),), 0.0), 1, 0),
        (lambda: a.get(), 1, 0),  # device to host
        (lambda: xp.asarray(a), 0, 0),  # already on the device
    ]
    for make, launches, allocated in cases:
        usage.reset_counters()
        make()
        assert (usage.kernel_launches, usage.bytes_allocated) == (launches, allocated), make
    out = xp.empty((4, 6), dtype=xp.float32)
    assert xp.multiply(a, 2.0, out=out) is out  # as CuPy: the output array itself


def test_benchmark_prints_the_launch_table(tmp_path, capsys):
    path = tmp_path / "launches.json"
    argv = ["--launches", "--models", "seed", "--algorithms", "gemm", "--train-batch-sizes", "4",
            "--infer-batch-sizes", "4", "--json", str(path)]  # fmt: skip
    assert benchmark.main(argv) == 0
    rows = json.loads(path.read_text())["launches"]
    assert [(r["mode"], r["optimizer"]) for r in rows] == [("train", "sgd"), ("train", "adam"), ("infer", None)]
    adam = rows[1]
    assert adam["parameters"] == 4 and adam["per_parameter_launches"] > adam["launches"] + 30
    out = capsys.readouterr().out
    assert "launches" in out and "per-param" in out
