"""The CPU backend keeps freed memory in the process: training steps reuse it instead of faulting in
fresh pages (glibc's malloc; see cnn_backend/allocator.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cnn_backend import allocator

ROOT = Path(__file__).resolve().parent.parent
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

#: a BatchNorm network's training steps at batch 64, then the page faults per step after warm-up
FAULTS_PER_STEP = textwrap.dedent(
    """
    import resource, numpy
    from cnn_backend import allocator
    from cnn_backend.backend import cpu_backend
    from cnn_backend.layers import SoftmaxCrossEntropy
    from cnn_backend.model import Sequential
    from cnn_backend.optim import SGD
    from cnn_backend.spec import read_spec_file
    from cnn_backend.training import train_step

    be = cpu_backend()
    model = Sequential.from_spec(read_spec_file("examples/default-bn.toml"), (1, 28, 28), backend=be, seed=0)
    optimizer, loss = SGD(model.parameters(), lr=0.01, momentum=0.9, backend=be), SoftmaxCrossEntropy(be)
    rng = numpy.random.default_rng(0)
    x, y = rng.random((64, 1, 28, 28)).astype(numpy.float32), rng.integers(0, 10, size=64)
    for _ in range(3):
        train_step(model, loss, optimizer, x, y)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        train_step(model, loss, optimizer, x, y)
    print(allocator.keep_freed_memory(), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
    """
)


def faults_per_step(**environment) -> tuple[str, float]:
    env = {key: value for key, value in os.environ.items() if key not in allocator.GLIBC_VARIABLES}
    env.update(environment)
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_STEP], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    applied, faults = result.stdout.split()
    return applied, float(faults)


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's; other C libraries keep their own policy")
def test_training_steps_reuse_freed_memory():
    # Without the thresholds this step faults in about 2,600 fresh pages (10 MiB) every time.
    applied, faults = faults_per_step()
    assert applied == "True"
    assert faults < 50, f"{faults} page faults per step"


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's; other C libraries keep their own policy")
@pytest.mark.parametrize("variable, value", [("CNN_BACKEND_KEEP_FREED_MEMORY", "0"), ("MALLOC_TRIM_THRESHOLD_", "131072")])
def test_malloc_is_left_alone_when_asked(variable, value):
    applied, _ = faults_per_step(**{variable: value})
    assert applied == "False"


@pytest.mark.parametrize("value, requested", [("", True), ("1", True), ("On", True), ("0", False), ("false", False), ("off", False)])
def test_the_variable_reads_the_usual_words_for_on_and_off(monkeypatch, value, requested):
    monkeypatch.setenv(allocator.KEEP_FREED_MEMORY_ENV, value)
    assert allocator.requested_by_environment() is requested


def test_a_value_that_is_neither_on_nor_off_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv(allocator.KEEP_FREED_MEMORY_ENV, "maybe")
    with pytest.raises(ValueError) as excinfo:
        allocator.requested_by_environment()
    assert str(excinfo.value) == (
        "CNN_BACKEND_KEEP_FREED_MEMORY='maybe' is neither on nor off; set it to 0 (leave glibc's malloc as it is) or 1, or unset it"
    )
