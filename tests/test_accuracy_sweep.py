"""scripts/torch_accuracy_sweep.py: refuses bad configurations in one line, and (with PyTorch) its
reference networks are the library's in arithmetic, its "library" initialisation draws the library's
schemes, and its random shifts and erasing change images as they say."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "torch_accuracy_sweep.py"


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "config, message",
    [
        ('{"netw": 1}', "unknown keys ['netw']"),
        ("{network: default}", "is not JSON"),
        ('{"network": "resnet"}', "unknown network 'resnet'"),
        ('{"optimizer": "lamb"}', "unknown optimizer 'lamb'"),
        ('{"init": "orthogonal"}', "unknown init 'orthogonal'"),
        ('{"schedule": "linear"}', "unknown schedule 'linear'"),
        ('{"ema": 1.5}', "ema must be a decay in [0, 1)"),
        ('{"erase": 1.0}', "erase must be a probability in [0, 1)"),
        ('{"dropout": 1}', "dropout must be a rate in [0, 1) in"),
        ('{"crop": 1.5}', "crop must be a pixel count in [0, inf) in"),
        ('{"epochs": 0}', "epochs must be a count in [1, inf) in"),
        ('{"lr": "fast"}', "lr must be a learning rate in [0, inf) in"),
    ],
)
def test_a_bad_configuration_is_refused_in_one_line(config, message):
    result = run_script('{"network": "default"}', config)  # refused before any run starts
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def load_sweep():
    return load_script(SCRIPT)


def test_the_reference_default_network_has_the_library_default_arithmetic():
    torch = pytest.importorskip("torch")
    from cnn_backend import get_backend
    from cnn_backend.model import plain_cnn
    from cnn_backend.summary import summarize

    sweep = load_sweep()
    reference = sweep.build(torch.nn, "default")
    library = summarize(plain_cnn(get_backend("cpu"), seed=0))
    assert sweep.multiply_accumulates(torch.nn, reference) == library.total_macs == 4_241_152
    assert sum(p.numel() for p in reference.parameters()) == library.total_params


@pytest.mark.parametrize(
    "network, hidden, example",
    [
        ("default-bn", 128, "default-bn.toml"),
        ("default-bn-after-pool", 128, "default-bn-after-pool.toml"),
        ("narrow-bn-after-pool", 128, "narrow-bn-after-pool.toml"),
        ("narrow16-bn-after-pool", 128, "narrow16-bn-after-pool.toml"),
        ("narrow16-bn-after-pool", 256, "narrow16-dense256-bn-after-pool.toml"),
    ],
)
def test_a_reference_network_has_its_example_files_arithmetic(network, hidden, example):
    torch = pytest.importorskip("torch")
    from cnn_backend import get_backend
    from cnn_backend.spec import build_model
    from cnn_backend.summary import summarize

    sweep = load_sweep()
    reference = sweep.build(torch.nn, network, hidden=hidden)
    library = summarize(build_model(SCRIPT.parent.parent / "examples" / example, (1, 28, 28), get_backend("cpu"), seed=0))
    # the sweep counts the products' arithmetic; the library also counts BatchNorm's one per value
    products = sum(row.macs for row in library.rows if row.type in ("Convolution", "FullyConnected"))
    assert sweep.multiply_accumulates(torch.nn, reference) == products
    # the examples' hidden dense layer keeps its biases, which the BatchNorm after it cancels
    assert library.total_params - sum(p.numel() for p in reference.parameters()) == hidden


def test_a_thread_count_below_one_is_refused():
    result = run_script("--threads", "0", "{}")
    assert result.returncode == 2 and "--threads must be >= 1, got 0" in result.stderr


def test_a_random_shift_moves_each_image_and_fills_the_border_with_the_background():
    torch = pytest.importorskip("torch")
    images = torch.arange(3 * 25, dtype=torch.float64).reshape(3, 1, 5, 5)
    shifted = load_sweep().random_shift(torch, images, 1, -1.0, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    for image, result in zip(images[:, 0], shifted[:, 0]):
        # Some offset (dy, dx) in [-1, 1]^2 explains the result: the image moved, background around it.
        matches = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                padded = torch.nn.functional.pad(image, (1, 1, 1, 1), value=-1.0)
                matches.append(torch.equal(result, padded[1 + dy : 6 + dy, 1 + dx : 6 + dx]))
        assert sum(matches) == 1


def test_the_library_initialisation_matches_the_library_schemes():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    sweep = load_sweep()
    model = sweep.build(torch.nn, "default-bn-after-pool")
    sweep.library_init(torch.nn, model)
    weighted = [layer for layer in model if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear))]
    second_conv, hidden, output = weighted[1], weighted[2], weighted[3]
    assert second_conv.weight.std().item() == pytest.approx(math.sqrt(2 / 288), rel=0.03)  # He, fan_in 32 * 9
    assert hidden.weight.std().item() == pytest.approx(math.sqrt(2 / 3136), rel=0.03)
    assert output.weight.abs().max().item() <= math.sqrt(6 / (128 + 10))  # Glorot uniform bound
    assert all(layer.bias is None or not layer.bias.any() for layer in weighted)


def test_random_erasing_sets_one_rectangle_of_the_drawn_size_to_the_background():
    torch = pytest.importorskip("torch")
    images = torch.ones(2000, 1, 28, 28)
    erased = load_sweep().random_erase(torch, images, 0.5, -1.0, torch.Generator().manual_seed(0))
    changed = erased[:, 0] != 1
    assert torch.all(erased[:, 0][changed] == -1.0)
    touched = changed.flatten(1).any(1)
    assert 0.45 < touched.float().mean().item() < 0.55  # the probability
    for mask in changed[touched][:200]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        # One solid rectangle: every pixel between its first and last row and column.
        assert mask.sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    areas = changed[touched].flatten(1).sum(1).float() / 784
    assert areas.min() >= 0.01 and areas.max() <= 0.36  # 2-33% drawn, sides rounded and clipped
