"""scripts/torch_accuracy_sweep.py: refuses bad configurations in one line, and (with PyTorch) its
reference networks are the library's in arithmetic."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "torch_accuracy_sweep.py"


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "config, message",
    [
        ('{"netw": 1}', "unknown keys ['netw']"),
        ("{network: default}", "is not JSON"),
        ('{"network": "resnet"}', "unknown network 'resnet'"),
    ],
)
def test_a_bad_configuration_is_refused_in_one_line(config, message):
    result = run_script('{"network": "default"}', config)  # refused before any run starts
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_the_reference_default_network_has_the_library_default_arithmetic():
    torch = pytest.importorskip("torch")
    from cnn_backend import get_backend
    from cnn_backend.model import default_cnn
    from cnn_backend.summary import summarize

    spec = importlib.util.spec_from_file_location("torch_accuracy_sweep", SCRIPT)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    reference = sweep.build(torch.nn, "default")
    library = summarize(default_cnn(get_backend("cpu"), seed=0))
    assert sweep.multiply_accumulates(torch.nn, reference) == library.total_macs == 4_241_152
    assert sum(p.numel() for p in reference.parameters()) == library.total_params


def test_a_thread_count_below_one_is_refused():
    result = run_script("--threads", "0", "{}")
    assert result.returncode == 2 and "--threads must be >= 1, got 0" in result.stderr
