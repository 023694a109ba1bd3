"""scripts/profile_step.py: a step's time, its page faults and each layer's share, for any network;
bad input refused in one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "profile_step.py"


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def layer_rows(stdout: str) -> dict:
    rows = {}
    for line in stdout.splitlines():
        match = re.fullmatch(r"\s*(\d+) (\w+)\s+([\d.]+)\s+([\d.]+)", line)
        if match:
            rows[int(match[1]), match[2]] = (float(match[3]), float(match[4]))
    return rows


def test_a_training_step_is_timed_layer_by_layer():
    result = run_script("--model", "examples/default-bn.toml", "--batch", "8", "--steps", "3", "--warmup", "1", "--layers")
    assert result.returncode == 0, result.stderr
    headline = result.stdout.splitlines()[0]
    assert headline.startswith("examples/default-bn.toml, training step of 8, cpu float32: ")
    if sys.platform.startswith("linux"):
        assert "page faults per step" in headline
    rows = layer_rows(result.stdout)
    assert len(rows) == 14  # every layer of the spec, in order
    assert [name for _, name in sorted(rows)][:3] == ["Convolution", "BatchNorm", "MaxPool"]
    for (index, name), (forward, backward) in rows.items():
        if name in ("Convolution", "BatchNorm", "FullyConnected"):
            assert forward > 0 and backward > 0, (index, name)
    total = float(re.search(r"layers in all\s+([\d.]+)", result.stdout)[1])
    assert total == pytest.approx(sum(f + b for f, b in rows.values()), abs=0.01 * len(rows))


def test_an_inference_batch_has_no_backward_pass():
    result = run_script("--model", "default", "--mode", "infer", "--batch", "8", "--steps", "2", "--warmup", "1", "--layers")
    assert result.returncode == 0, result.stderr
    assert "inference batch of 8" in result.stdout
    rows = layer_rows(result.stdout)
    assert rows and all(backward == 0 for _, backward in rows.values())
    # The default network's first convolution runs with its max-pool as one operation (timed as the convolution's).
    assert rows[0, "Convolution"][0] > 0 and rows[1, "MaxPool"][0] == 0


def test_the_hot_operations_are_timed_by_call_site():
    result = run_script("--model", "default", "--batch", "8", "--steps", "3", "--warmup", "1", "--calls")
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^\s*([\d.]+)\s+(\d+)  (\S.*)$", result.stdout, flags=re.M)
    sites = {site.removesuffix(", split"): (float(ms), int(calls)) for ms, calls, site in rows}
    # The second convolution's three products (16 * 9 = 144 rows of im2col, 48 filters, 14 * 14 * 8
    # pixels): forward, then both gradients at once.
    assert {"matmul 48x144 @ 144x1568", "matmuls 144x1568 @ 1568x48 and 144x48 @ 48x1568, at once"} <= set(sites), sorted(sites)
    assert any(site.startswith("map_chunks batch_norm_forward.normalise") for site in sites)
    assert all(calls >= 1 and ms >= 0 for ms, calls in sites.values())
    total = float(re.search(r"^\s*([\d.]+)\s+in these operations", result.stdout, flags=re.M)[1])
    assert total == pytest.approx(sum(ms for ms, _ in sites.values()), abs=0.002 * len(sites))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--calls", "--device", "cuda"], "--calls times the CPU backend's operations: use it with --device cpu"),
        (["--model", "resnet-9000"], "error: unknown model 'resnet-9000'"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--batch", "-2"], "--batch must be >= 1, got -2"),
    ],
)
def test_bad_input_is_refused_in_one_line(args, message):
    result = run_script(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
