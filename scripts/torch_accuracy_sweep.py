"""Reference accuracies from PyTorch for networks and recipes close to this library's default:
trained on ``train[:50000]``, scored on ``train[50000:]`` after every epoch (plain and flip-averaged).

PyTorch trains these networks faster than this library on a CPU, so a candidate recipe is screened
here before a full ``cnn-backend train`` run. Each configuration is one JSON object; one JSON line
per run is printed (per epoch: epoch, accuracy %, flip-averaged accuracy %, cumulative seconds).

    python scripts/torch_accuracy_sweep.py --data DIR \\
        '{"network": "default-bn", "flip": true, "label_smoothing": 0.1}' \\
        '{"network": "default", "epochs": 10}'

Keys (defaults): network (default), epochs (10), batch_size (64), lr (2e-3), schedule ("cosine":
one epoch of linear warm-up then cosine decay, as the default recipe; or "one-cycle": PyTorch's
OneCycleLR with lr as its peak, no momentum cycling, as ``--schedule one-cycle``), optimizer ("adamw", as the default recipe; or
"sgd": Nesterov momentum 0.9), weight_decay (1e-4), dropout (0.4: before the dense head's output
layer; c3-7x7 and c3-cheap, without a dense layer, keep 0.3), hidden (128: the dense head's width), init ("torch": PyTorch's own; or
"library": this library's default, He normal for convolutions and hidden dense layers, Glorot
uniform for the output layer, zero biases), flip (false: random left-right flips), crop (0: random
shifts of up to this many pixels each way, the uncovered border filled with the background, as
``--augment crop1-flip`` and ``crop-flip`` do with 1 and 2), erase (0: the probability of random
erasing, one rectangle of 2-33% of the image with aspect ratio 0.3-3.3 set to the background, as
torchvision's ``RandomErasing`` draws them), ema (0: no average; else the decay of an exponential moving
average of the weights and BatchNorm statistics, updated every step and scored instead of the
weights), label_smoothing (0), seed (0). Networks: ``NETWORKS`` (described in ``build``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnn_backend.data import load_fashion_mnist  # noqa: E402

TRAIN_SAMPLES = 50_000
NETWORKS = ("default", "default-bn", "default-bn-after-pool", "narrow-bn-after-pool", "narrow16-bn-after-pool", "c3-7x7", "c3-cheap", "c3-cheap-fc")
DEFAULTS = {
    "network": "default", "epochs": 10, "batch_size": 64, "lr": 2e-3, "schedule": "cosine", "optimizer": "adamw", "weight_decay": 1e-4,
    "dropout": 0.4, "hidden": 128, "init": "torch", "flip": False, "crop": 0, "erase": 0.0, "ema": 0.0, "label_smoothing": 0.0, "seed": 0,
}
OPTIMIZERS = ("adamw", "sgd")
INITS = ("torch", "library")
SCHEDULES = ("cosine", "one-cycle")
CHOICES = {"network": NETWORKS, "optimizer": OPTIMIZERS, "init": INITS, "schedule": SCHEDULES}
#: numeric keys: what each is, its type, and the half-open range [low, high) it must lie in
RANGES = {
    "epochs": ("a count", int, 1, math.inf),
    "batch_size": ("a count", int, 1, math.inf),
    "hidden": ("a width", int, 1, math.inf),
    "seed": ("a seed", int, 0, math.inf),
    "crop": ("a pixel count", int, 0, math.inf),
    "lr": ("a learning rate", float, 0, math.inf),
    "weight_decay": ("a coefficient", float, 0, math.inf),
    "dropout": ("a rate", float, 0, 1),
    "label_smoothing": ("a rate", float, 0, 1),
    "erase": ("a probability", float, 0, 1),
    "ema": ("a decay", float, 0, 1),
}


def conv_block(nn, channels_in: int, channels_out: int, batch_norm: bool, pool: bool, norm_after_pool: bool = False) -> list:
    layers = [nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=not batch_norm)]
    norm = [nn.BatchNorm2d(channels_out)] if batch_norm else []
    pooling = [nn.MaxPool2d(2)] if pool else []
    return layers + (pooling + norm if norm_after_pool else norm + pooling) + [nn.ReLU()]


def two_convolutions(nn, widths: tuple, batch_norm: bool, norm_after_pool: bool = False) -> list:
    """The default's two pooled convolution blocks with ``widths`` filters (BatchNorm before or after each pooling)."""
    first, second = widths
    return conv_block(nn, 1, first, batch_norm, True, norm_after_pool) + conv_block(nn, first, second, batch_norm, True, norm_after_pool)


def dense_head(nn, features: int, batch_norm: bool, dropout: float, hidden: int = DEFAULTS["hidden"]) -> list:
    norm = [nn.BatchNorm1d(hidden)] if batch_norm else []
    return [nn.Flatten(), nn.Linear(features, hidden, bias=not batch_norm), *norm, nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10)]


def three_convolutions(nn, widths: tuple) -> list:
    """BatchNorm convolutions of ``widths`` filters: at 28x28 and 14x14 (each then pooled), the third at 7x7."""
    first, second, third = widths
    return two_convolutions(nn, (first, second), True) + conv_block(nn, second, third, True, False)


def build(nn, network: str, dropout: float = DEFAULTS["dropout"], hidden: int = DEFAULTS["hidden"]):
    """The networks compared (multiply-accumulates per sample in brackets)."""
    if network == "default":  # this library's default network and dropout (4.24 M)
        return nn.Sequential(*two_convolutions(nn, (32, 64), False), *dense_head(nn, 64 * 49, False, dropout, hidden))
    if network == "default-bn":  # the same with BatchNorm, as examples/default-bn.toml (4.24 M)
        return nn.Sequential(*two_convolutions(nn, (32, 64), True), *dense_head(nn, 64 * 49, True, dropout, hidden))
    if network == "default-bn-after-pool":  # BatchNorm after each pooling, as examples/default-bn-after-pool.toml (4.24 M)
        return nn.Sequential(*two_convolutions(nn, (32, 64), True, norm_after_pool=True), *dense_head(nn, 64 * 49, True, dropout, hidden))
    if network == "narrow-bn-after-pool":  # the same with 24, 48 filters, as examples/narrow-bn-after-pool.toml (2.50 M)
        return nn.Sequential(*two_convolutions(nn, (24, 48), True, norm_after_pool=True), *dense_head(nn, 48 * 49, True, dropout, hidden))
    if network == "narrow16-bn-after-pool":  # 16, 48 filters: a first layer two thirds as wide (1.77 M)
        return nn.Sequential(*two_convolutions(nn, (16, 48), True, norm_after_pool=True), *dense_head(nn, 48 * 49, True, dropout, hidden))
    if network == "c3-7x7":  # 32, 64, 96 filters, no dense layer (6.60 M)
        return nn.Sequential(*three_convolutions(nn, (32, 64, 96)), nn.Flatten(), nn.Dropout(0.3), nn.Linear(96 * 49, 10))
    if network == "c3-cheap":  # 24, 48, 64 filters, no dense layer (3.59 M)
        return nn.Sequential(*three_convolutions(nn, (24, 48, 64)), nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 49, 10))
    if network == "c3-cheap-fc":  # the same with the default's BatchNorm dense head (3.96 M)
        return nn.Sequential(*three_convolutions(nn, (24, 48, 64)), *dense_head(nn, 64 * 49, True, dropout, hidden))
    raise ValueError(f"unknown network {network!r}; choose one of {', '.join(NETWORKS)}")


def library_init(nn, model) -> None:
    """This library's initialisation (cnn_backend/init.py): He normal, the last layer Glorot uniform."""
    weighted = [layer for layer in model if isinstance(layer, (nn.Conv2d, nn.Linear))]
    for layer in weighted:
        if layer is weighted[-1]:
            nn.init.xavier_uniform_(layer.weight)
        else:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def random_shift(torch, images, pixels: int, background, generator):
    """Each image padded by ``pixels`` of background and cropped back at a random offset."""
    n, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (pixels, pixels, pixels, pixels), value=float(background))
    top = torch.randint(0, 2 * pixels + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * pixels + 1, (n,), generator=generator)
    rows = (top[:, None] + torch.arange(height))[:, :, None]
    cols = (left[:, None] + torch.arange(width))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


def random_erase(torch, images, probability: float, background, generator):
    """With ``probability``, one rectangle of each image set to the background (torchvision's
    ``RandomErasing`` scale (0.02, 0.33) and ratio (0.3, 3.3), the sides clipped to the image)."""
    n, _, height, width = images.shape
    area = height * width * (0.02 + 0.31 * torch.rand(n, generator=generator))
    aspect = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * torch.rand(n, generator=generator))
    tall = torch.sqrt(area * aspect).round().clamp(1, height).long()
    wide = torch.sqrt(area / aspect).round().clamp(1, width).long()
    top = (torch.rand(n, generator=generator) * (height - tall + 1)).long()
    left = (torch.rand(n, generator=generator) * (width - wide + 1)).long()
    rows, cols = torch.arange(height), torch.arange(width)
    inside_rows = (rows >= top[:, None]) & (rows < (top + tall)[:, None])
    inside_cols = (cols >= left[:, None]) & (cols < (left + wide)[:, None])
    erased = inside_rows[:, :, None] & inside_cols[:, None, :] & (torch.rand(n, generator=generator) < probability)[:, None, None]
    return torch.where(erased[:, None], torch.as_tensor(float(background)), images)


def multiply_accumulates(nn, model) -> int:
    total, side = 0, 28
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            total += side * side * layer.out_channels * layer.in_channels * 9
        elif isinstance(layer, nn.MaxPool2d):
            side //= 2
        elif isinstance(layer, nn.Linear):
            total += layer.in_features * layer.out_features
    return total


def run(torch, data, config: dict) -> dict:
    nn = torch.nn
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(config["seed"])
    generator = torch.Generator().manual_seed(config["seed"])
    model = build(nn, config["network"], config["dropout"], config["hidden"])
    if config["init"] == "library":
        library_init(nn, model)
    model = model.to(memory_format=torch.channels_last)
    if config["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9, nesterov=True, weight_decay=config["weight_decay"])
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    batch = config["batch_size"]
    steps_per_epoch = math.ceil(TRAIN_SAMPLES / batch)
    total_steps = config["epochs"] * steps_per_epoch

    def schedule(step: int) -> float:  # one epoch of warm-up, then cosine decay to 0
        if step < steps_per_epoch:
            return (step + 1) / steps_per_epoch
        return 0.5 * (1 + math.cos(math.pi * (step - steps_per_epoch) / max(1, total_steps - steps_per_epoch)))

    if config["schedule"] == "one-cycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config["lr"], total_steps=total_steps, cycle_momentum=False)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    averaged = None
    if config["ema"]:
        multi_average = torch.optim.swa_utils.get_ema_multi_avg_fn(config["ema"])
        averaged = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=multi_average, use_buffers=True)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
    background = x_train.min()  # the zero pixel, normalised
    start, history = time.time(), []
    for epoch in range(config["epochs"]):
        model.train()
        order = torch.randperm(TRAIN_SAMPLES, generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * batch : (step + 1) * batch]
            images, labels = x_train[index], y_train[index]
            if config["flip"]:
                flipped = torch.rand(len(index), generator=generator) < 0.5
                images = torch.where(flipped[:, None, None, None], images.flip(3), images)
            if config["crop"]:
                images = random_shift(torch, images, config["crop"], background, generator)
            if config["erase"]:
                images = random_erase(torch, images, config["erase"], background, generator)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(images.contiguous(memory_format=torch.channels_last)), labels).backward()
            optimizer.step()
            scheduler.step()
            if averaged is not None:
                averaged.update_parameters(model)
        scored = model if averaged is None else averaged
        scored.eval()
        with torch.inference_mode():
            logits = scored(x_val.contiguous(memory_format=torch.channels_last))
            mirrored = scored(x_val.flip(3).contiguous(memory_format=torch.channels_last))
        accuracy = (logits.argmax(1) == y_val).float().mean().item()
        flip_accuracy = ((logits + mirrored).argmax(1) == y_val).float().mean().item()
        history.append([epoch + 1, round(100 * accuracy, 2), round(100 * flip_accuracy, 2), round(time.time() - start, 1)])
    return {**config, "macs": multiply_accumulates(nn, model), "history": history}


def configuration_problem(given: dict, text: str) -> str | None:
    """What is wrong with a configuration's values, in one line (None when nothing is)."""
    for key, value in given.items():
        if key in CHOICES and value not in CHOICES[key]:
            return f"unknown {key} {value!r} in {text!r}; choose one of {', '.join(CHOICES[key])}"
        if key in RANGES:
            what, kind, low, high = RANGES[key]
            number = (int,) if kind is int else (int, float)
            if isinstance(value, bool) or not isinstance(value, number) or not low <= value < high:
                return f"{key} must be {what} in [{low}, {high}) in {text!r}, got {value!r}"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("configs", nargs="+", help="JSON objects, one run each (keys in the module's text)")
    parser.add_argument("--data", default="auto", help="Fashion-MNIST folder (default: the library's own lookup)")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch's CPU threads (default: 2)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    configs = []
    for text in args.configs:
        try:
            given = json.loads(text)
        except json.JSONDecodeError as error:
            parser.error(f"configuration {text!r} is not JSON: {error}")
        unknown = set(given) - set(DEFAULTS)
        if unknown:
            parser.error(f"unknown keys {sorted(unknown)} in {text!r}; known: {sorted(DEFAULTS)}")
        problem = configuration_problem(given, text)
        if problem:
            parser.error(problem)
        configs.append({**DEFAULTS, **given})
    try:
        import torch
    except ImportError:
        parser.error("PyTorch is needed for this script: pip install torch")
    torch.set_num_threads(args.threads)
    images, labels = load_fashion_mnist("train", args.data)
    x = torch.from_numpy(images.astype(numpy.float32) / 255.0).reshape(-1, 1, 28, 28)
    x = (x - x[:TRAIN_SAMPLES].mean()) / x[:TRAIN_SAMPLES].std()
    y = torch.from_numpy(labels.astype(numpy.int64))
    data = (x[:TRAIN_SAMPLES], y[:TRAIN_SAMPLES], x[TRAIN_SAMPLES:], y[TRAIN_SAMPLES:])
    for config in configs:
        print(json.dumps(run(torch, data, config)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
