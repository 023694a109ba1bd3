"""cnn_backend: a convolutional neural network from scratch, on NumPy/SciPy (CPU) or CuPy (CUDA GPU).

Every layer is written once against a :class:`Backend` (``xp`` = numpy or cupy, ``signal`` =
scipy.signal or cupyx.scipy.signal); :func:`get_backend` picks the device.
"""

from .backend import Backend, DeviceUnavailableError, get_backend
from .layers import (
    AvgPool,
    BatchNorm,
    GELU,
    GlobalAvgPool,
    LeakyReLU,
    Residual,
    Sigmoid,
    Tanh,
    Convolution,
    Dropout,
    Flatten,
    FullyConnected,
    MaxPool,
    ReLU,
    ShapeError,
    SoftmaxCrossEntropy,
)
from .model import ARCHITECTURES, Sequential, default_cnn, plain_cnn, seed_cnn
from .optim import SGD, Adam, CosineSchedule, OneCycleSchedule, StepSchedule
from .serialization import ModelFileError
from .spec import SpecError, build_model, register_layer
from . import gradcheck  # cnn_backend.gradcheck.check_layer_gradients, for layers of your own

__version__ = "0.1.0"

__all__ = [
    "AvgPool",
    "BatchNorm",
    "GELU",
    "GlobalAvgPool",
    "LeakyReLU",
    "Residual",
    "Sigmoid",
    "Tanh",
    "build_model",
    "ARCHITECTURES",
    "Adam",
    "Backend",
    "Convolution",
    "CosineSchedule",
    "DeviceUnavailableError",
    "Dropout",
    "Flatten",
    "FullyConnected",
    "MaxPool",
    "ModelFileError",
    "OneCycleSchedule",
    "ReLU",
    "SGD",
    "Sequential",
    "ShapeError",
    "SoftmaxCrossEntropy",
    "SpecError",
    "StepSchedule",
    "default_cnn",
    "plain_cnn",
    "get_backend",
    "register_layer",
    "seed_cnn",
]
