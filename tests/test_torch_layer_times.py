"""scripts/torch_layer_times.py: the default network's products and second convolution beside
PyTorch's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "torch_layer_times.py"


def test_the_products_timed_are_the_three_of_each_layer_in_a_training_step():
    script = load_script(SCRIPT)
    convolution, dense = script.timed_layers()
    shapes = script.product_shapes(8)
    flops = [2 * m * k * n for _, m, k, n in shapes]
    # Forward, weight gradient and input gradient: each as many multiply-adds as the layer's forward.
    assert flops[:3] == [2 * 8 * convolution.macs()] * 3
    assert flops[3:] == [2 * 8 * dense.macs()] * 3


def test_the_script_prints_every_product_and_both_convolution_modes():
    pytest.importorskip("torch")
    result = subprocess.run([sys.executable, str(SCRIPT), "--batch", "2", "--repeats", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(re.findall(r"^  (convolution 2|dense 1) .* @ .*\d+\.\d +\d+\.\d$", result.stdout, flags=re.M)) == 6
    assert len(re.findall(r"forward +\d+\.\d+ \(.*\) +forward \+ backward +\d+\.\d+", result.stdout)) == 3
