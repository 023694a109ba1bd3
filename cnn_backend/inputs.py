"""What a trained model expects as input, recorded with it: class names, channel count, image size
and the per-channel normalisation, so evaluation and prediction prepare images as training did.

:class:`InputSpec` is stored in checkpoints and model files (``__inputs__``, JSON): training writes
it, ``Sequential.save`` writes the model's ``input_spec``. Files without one (earlier versions, all
trained on Fashion-MNIST, or a model saved with none set) get :meth:`InputSpec.legacy`: a 28x28
greyscale input (the model's recorded shape when it has one) and Fashion-MNIST's class names
(generic ``class <i>`` names when the output size is not 10).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

from .data import CLASS_NAMES, FASHION_MNIST_SHAPE, Normalization, prepare_images
from .datasets.base import DataError, LabelledImages, shape_text

INPUTS_KEY = "__inputs__"


@dataclass(frozen=True)
class InputSpec:
    class_names: tuple[str, ...]
    channels: int
    image_size: tuple[int, int]
    normalization: Normalization | None = None
    recorded: bool = True  # False for the assumed input of a file that recorded none
    names_assumed: bool = False  # trained on files that store no class names (an IDX folder)

    def __post_init__(self) -> None:
        if isinstance(self.class_names, str) or not all(isinstance(name, str) for name in self.class_names):
            raise ValueError(f"InputSpec: class_names must be a sequence of strings, one per class, got {self.class_names!r:.60}")
        object.__setattr__(self, "class_names", tuple(self.class_names))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Per-sample shape ``(C, H, W)``."""
        return (self.channels, *self.image_size)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def for_data(cls, data: LabelledImages, normalization: Normalization | None = None) -> "InputSpec":
        channels, height, width = data.image_shape
        return cls(tuple(data.class_names), channels, (height, width), normalization, names_assumed=data.names_assumed)

    @classmethod
    def legacy(cls, num_outputs: int = len(CLASS_NAMES), input_shape=None) -> "InputSpec":
        """The assumed input of a file that records none: Fashion-MNIST's names (generic ones when
        the network has not ten outputs) and ``input_shape`` when the model config gives one, else 1x28x28."""
        names = CLASS_NAMES if num_outputs == len(CLASS_NAMES) else generic_class_names(num_outputs)
        channels, height, width = FASHION_MNIST_SHAPE
        if input_shape is not None and len(input_shape) == 3 and int(input_shape[0]) in (1, 3):
            channels, height, width = (int(size) for size in input_shape)
        return cls(tuple(names), channels, (height, width), None, recorded=False)

    def config(self) -> dict:
        return {
            "class_names": list(self.class_names),
            "channels": self.channels,
            "image_size": list(self.image_size),
            "normalization": self.normalization.config() if self.normalization else None,
            **({"class_names_assumed": True} if self.names_assumed else {}),
        }

    @classmethod
    def from_config(cls, config: dict) -> "InputSpec":
        try:
            names = tuple(str(name) for name in config["class_names"])
            channels = int(config["channels"])
            height, width = (int(size) for size in config["image_size"])
            normalization = Normalization.from_config(config.get("normalization"))
            names_assumed = bool(config.get("class_names_assumed", False))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed input description ({exc})") from None
        if channels not in (1, 3) or not names or min(height, width) < 1:
            raise ValueError(f"malformed input description (channels {channels}, size {height}x{width}, {len(names)} classes)")
        return cls(names, channels, (height, width), normalization, names_assumed=names_assumed)

    def describe(self) -> str:
        text = f"{shape_text(self.input_shape)} input, {self.num_classes} classes"
        if self.normalization is not None:
            text += ", normalised per channel"
        return text + ("" if self.recorded else " (assumed: the file records no input description; set model.input_spec before saving it to record one)")

    def check(self, data: LabelledImages, what: str) -> str | None:
        """Refuse data whose image shape, class count or class names (in label order) differ from
        what the model was trained on: the same count under other names would be scored silently
        against the wrong classes (a renamed class folder reorders them all). Returns a note when
        the names differ but one side's are assumed (IDX files store none): paired by index."""
        if data.image_shape != self.input_shape:
            raise DataError(
                f"the model was trained on {shape_text(self.input_shape)} images but {what} has "
                f"{shape_text(data.image_shape)} ones; pass the data it was trained on"
            )
        if data.num_classes != self.num_classes:
            raise DataError(f"the model knows {self.num_classes} classes but {what} has {data.num_classes}")
        differ = [index for index, (mine, theirs) in enumerate(zip(self.class_names, data.class_names)) if mine != theirs]
        # Names are compared where both sides know them: not for a file that recorded none, nor for
        # IDX files, which store none (a folder of MNIST's files is named as Fashion-MNIST).
        if differ and self.recorded and not (self.names_assumed or data.names_assumed):
            first = differ[0]
            order = " (the same names in another order)" if sorted(self.class_names) == sorted(data.class_names) else ""
            raise DataError(
                f"{what} names its classes differently from the model{order}: class {first} is {data.class_names[first]!r} there "
                f"but {self.class_names[first]!r} for the model, so its labels would score the wrong classes; pass data with "
                f"the model's classes ({_listed(self.class_names)})"
            )
        if differ and self.recorded:
            return (
                f"{what} names its classes {_listed(data.class_names, 3)} and the model {_listed(self.class_names, 3)}, "
                f"one of them assumed (IDX files store no names): its labels are paired with the model's classes by index"
            )
        return None

    def prepare(self, images, dtype) -> numpy.ndarray:
        """Host uint8 ``(N, C, H, W)`` images as the model's float input, on the host."""
        return prepare_images(images, dtype, self.normalization)


def _listed(names: tuple[str, ...], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f", ... {len(names)} in all" if len(names) > shown else "")


def generic_class_names(count: int) -> tuple[str, ...]:
    """``("class 0", "class 1", ...)``: the names of a network's outputs when none were recorded."""
    return tuple(f"class {index}" for index in range(count))
