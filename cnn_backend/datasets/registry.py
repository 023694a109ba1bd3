"""The datasets known by name: one row each (files, published checksums, shape, classes, licence).

Checksums are the ones the datasets' publishers give (MD5), as recorded by torchvision for MNIST,
Fashion-MNIST and KMNIST (``torchvision/datasets/mnist.py``). torchvision reads CIFAR-10's pickled
Python version; the MD5 of the *binary* version used here is the one on the dataset's own page
(https://www.cs.toronto.edu/~kriz/cifar.html).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset.

    ``files`` maps each downloaded file to its MD5; ``mirrors`` are base URLs tried in order.
    ``format`` is ``"idx"`` (``split_files`` names the images and labels file of each split) or
    ``"cifar10-binary"`` (``split_files`` names the batch files inside ``archive_folder``).
    ``mirror_symmetric``: a left-right mirrored image keeps its class (clothes, photographs; not
    digits or characters), so training-time flips suit it. ``split_sizes`` (images per split) and
    ``size_text`` (the download's size) are for messages; docs/datasets.md's table repeats them, and
    a test checks that the two agree.
    """

    name: str
    title: str
    format: str
    mirrors: tuple[str, ...]
    files: dict[str, str]
    split_files: dict[str, tuple[str, ...]]
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]
    homepage: str
    licence: str
    citation: str
    archive_folder: str | None = None
    size_text: str = ""
    mirror_symmetric: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.split_files)


def _idx_split_files() -> dict[str, tuple[str, ...]]:
    return {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }


FASHION_MNIST = DatasetInfo(
    name="fashion-mnist",
    title="Fashion-MNIST",
    format="idx",
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    files={
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    split_files=_idx_split_files(),
    image_shape=(1, 28, 28),
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    split_sizes={"train": 60_000, "test": 10_000},
    homepage="https://github.com/zalandoresearch/fashion-mnist",
    licence="MIT (Zalando SE)",
    citation="Xiao, Rasul, Vollgraf: Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms, arXiv:1708.07747 (2017)",
    size_text="30 MB",
    mirror_symmetric=True,
)

MNIST = DatasetInfo(
    name="mnist",
    title="MNIST",
    format="idx",
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    files={
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    split_files=_idx_split_files(),
    image_shape=(1, 28, 28),
    class_names=tuple(str(digit) for digit in range(10)),
    split_sizes={"train": 60_000, "test": 10_000},
    homepage="http://yann.lecun.com/exdb/mnist/",
    licence="CC BY-SA 3.0 (as distributed by its authors)",
    citation="LeCun, Bottou, Bengio, Haffner: Gradient-based learning applied to document recognition, Proc. IEEE 86(11) (1998)",
    size_text="11 MB",
)

KMNIST = DatasetInfo(
    name="kmnist",
    title="Kuzushiji-MNIST",
    format="idx",
    mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
    files={
        "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
        "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
        "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
        "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
    },
    split_files=_idx_split_files(),
    image_shape=(1, 28, 28),
    class_names=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    split_sizes={"train": 60_000, "test": 10_000},
    homepage="https://github.com/rois-codh/kmnist",
    licence="CC BY-SA 4.0",
    citation="Clanuwat et al.: Deep Learning for Classical Japanese Literature, arXiv:1812.01718 (2018); KMNIST Dataset (created by CODH), adapted from Kuzushiji Dataset (created by NIJL and others), doi:10.20676/00000341",
    size_text="20 MB",
)

CIFAR10 = DatasetInfo(
    name="cifar10",
    title="CIFAR-10",
    format="cifar10-binary",
    mirrors=("https://www.cs.toronto.edu/~kriz/",),
    files={"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
    split_files={
        "train": tuple(f"data_batch_{index}.bin" for index in range(1, 6)),
        "test": ("test_batch.bin",),
    },
    archive_folder="cifar-10-batches-bin",
    image_shape=(3, 32, 32),
    class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    split_sizes={"train": 50_000, "test": 10_000},
    homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
    licence="no licence stated; the authors ask that the report below be cited",
    citation="Krizhevsky: Learning Multiple Layers of Features from Tiny Images, tech. report, University of Toronto (2009)",
    size_text="162 MB",
    mirror_symmetric=True,
)

DATASETS: dict[str, DatasetInfo] = {info.name: info for info in (FASHION_MNIST, MNIST, KMNIST, CIFAR10)}


def dataset_info(name: str) -> DatasetInfo:
    """The registry row of ``name``; a DataError-friendly ValueError lists the known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None
