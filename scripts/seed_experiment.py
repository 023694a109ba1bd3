"""The seed article's experiment, reproduced with the vectorised layers.

Architecture: Convolution 1->1 (6x6), ReLU, MaxPool 2, Flatten, FullyConnected 121->10, softmax
cross-entropy. Data: Fashion-MNIST train[:5000] to train, train[5000:10000] to test (the bundled
subset holds exactly these). Prints one row per epoch: epoch, train accuracy, test accuracy, seconds.

    python scripts/seed_experiment.py --epochs 20 --device cpu
"""

from __future__ import annotations

import argparse
import time

from cnn_backend import SGD, get_backend, seed_cnn
from cnn_backend.data import SEED_SPLIT, BatchLoader, load_fashion_mnist, prepare_images, split_train_validation
from cnn_backend.training import fit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.78, help="test accuracy to report reaching (default: the article's 78%%)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    backend = get_backend(args.device)
    images, labels = load_fashion_mnist("train", "bundled")
    (train_x, train_y), (test_x, test_y) = split_train_validation(images, labels, *SEED_SPLIT)
    model = seed_cnn(backend, seed=args.seed)
    optimizer = SGD(model.parameters(), lr=args.lr, momentum=args.momentum, backend=backend)
    loader = BatchLoader(train_x, train_y, backend, args.batch_size, seed=args.seed)
    test_images = prepare_images(test_x, backend.dtype)

    print(f"seed CNN on {backend.name}: train[:5000], test[5000:10000], SGD lr={args.lr} momentum={args.momentum}, batch {args.batch_size}")
    print("| epoch | train acc | test acc | seconds |")
    print("| ---: | ---: | ---: | ---: |")
    reached = []

    def report(stats) -> None:
        elapsed = time.perf_counter() - started
        print(f"| {stats.epoch} | {stats.train_accuracy:.2%} | {stats.val_accuracy:.2%} | {elapsed:.1f} |", flush=True)
        if stats.val_accuracy >= args.target and not reached:
            reached.append((stats.epoch, elapsed))

    fit(model, optimizer, loader, args.epochs, validation=(test_images, test_y), on_epoch_end=report)
    if reached:
        epoch, elapsed = reached[0]
        print(f"test accuracy {args.target:.0%} first reached at epoch {epoch}, {elapsed:.1f} s after start")
        return 0
    print(f"test accuracy {args.target:.0%} not reached in {args.epochs} epochs")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
