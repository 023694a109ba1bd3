"""Data augmentation on the device: random crops after zero padding, and horizontal flips.

The random choices (offsets, flips) are drawn on the host from a seeded generator keyed by
``(seed, epoch, step)`` - a few bytes per batch - and applied to the whole batch at once on the
device with one gather, so a run is reproducible, resumable at any epoch, and identical on CPU and GPU.
"""

from __future__ import annotations

import numpy

from .backend import Backend


class RandomCropFlip:
    """Pad each image by ``padding`` pixels of ``fill``, crop back to the original size at a random
    offset, and flip it left-right with probability ``flip_probability``.

    ``fill`` is the padding's value, one number or one per channel: 0 (black) for images in [0, 1];
    for normalised images, black as normalised, ``-mean / std`` per channel
    (:meth:`for_normalization`), so that the padding is the same black either way, as when cropping
    comes before normalising (torchvision's ``RandomCrop`` then ``Normalize``).

    Called as ``augment(x, epoch, step)`` on a device batch ``x (N, C, H, W)``, as the training loop does.
    In data-parallel training :meth:`set_batch_share` says which part of the global batch ``x`` is:
    the choices are drawn for the whole global batch and this part applied, as one process would.
    """

    def __init__(self, backend: Backend, padding: int = 2, flip_probability: float = 0.5, seed: int = 0, fill=0.0) -> None:
        if padding < 0:
            raise ValueError(f"RandomCropFlip: padding must be >= 0, got {padding!r}")
        if not 0.0 <= flip_probability <= 1.0:
            raise ValueError(f"RandomCropFlip: flip_probability must be in [0, 1], got {flip_probability!r}")
        fill = numpy.atleast_1d(numpy.asarray(fill, dtype=numpy.float64))
        if fill.ndim != 1 or not fill.size or not numpy.isfinite(fill).all():
            raise ValueError(f"RandomCropFlip: fill must be a finite number or one per channel, got {fill.tolist()!r}")
        self.backend, self.padding, self.flip_probability, self.seed = backend, int(padding), float(flip_probability), int(seed)
        self.fill = tuple(fill.tolist())
        self._fill_on_device = (None, None)  # (channels, dtype) and the fill sent for them
        self.batch_share: tuple[int, int] | None = None

    @classmethod
    def for_normalization(cls, backend: Backend, normalization, **options) -> "RandomCropFlip":
        """The augmentation for images normalised by ``normalization`` (a :class:`~cnn_backend.data.Normalization`,
        or None for images in [0, 1]): its padding is black, as normalised."""
        if normalization is not None:
            options["fill"] = [-mean / std for mean, std in zip(normalization.mean, normalization.std)]
        return cls(backend, **options)

    def set_batch_share(self, share: tuple[int, int] | None) -> None:
        """``(start, total)``: the coming batches are samples ``start ..`` of global batches of ``total``."""
        self.batch_share = share

    def config(self) -> dict:
        return {"padding": self.padding, "flip_probability": self.flip_probability, "seed": self.seed, "fill": list(self.fill)}

    def __call__(self, x, epoch: int, step: int):
        be, xp = self.backend, self.backend.xp
        n, _, height, width = x.shape
        rng = numpy.random.default_rng((self.seed, epoch, step))
        start, total = self.batch_share or (0, n)
        mine = slice(start, start + n)
        top = rng.integers(0, 2 * self.padding + 1, size=total)[mine]
        left = rng.integers(0, 2 * self.padding + 1, size=total)[mine]
        flip = (rng.random(total) < self.flip_probability)[mine]
        # Source column of every output column: shifted by the crop offset, mirrored when flipped.
        columns = numpy.arange(width)
        column_index = left[:, None] + numpy.where(flip[:, None], width - 1 - columns, columns)
        row_index = top[:, None] + numpy.arange(height)
        padded = self._padded(x)
        samples = xp.arange(n)[:, None, None]
        rows = be.to_device(row_index)[:, :, None]
        cols = be.to_device(column_index)[:, None, :]
        # Advanced indices on axes 0, 2, 3 around the channel slice: the result is (N, H, W, C).
        cropped = padded[samples, :, rows, cols]
        return xp.ascontiguousarray(cropped.transpose(0, 3, 1, 2))

    def _padded(self, x):
        xp, pad = self.backend.xp, self.padding
        if not any(self.fill):
            return xp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        n, channels, height, width = x.shape
        if len(self.fill) not in (1, channels):
            raise ValueError(f"RandomCropFlip: fill has {len(self.fill)} values for images of {channels} channels")
        padded = xp.empty((n, channels, height + 2 * pad, width + 2 * pad), dtype=x.dtype)
        padded[...] = self._device_fill(channels, x.dtype)[None, :, None, None]
        padded[:, :, pad:pad + height, pad:pad + width] = x
        return padded

    def _device_fill(self, channels: int, dtype):
        """The fill, one value per channel, on the device: sent once, not at every batch."""
        key = (channels, numpy.dtype(dtype))
        if self._fill_on_device[0] != key:
            host = numpy.broadcast_to(numpy.asarray(self.fill, dtype=dtype), (channels,))
            self._fill_on_device = (key, self.backend.to_device(host))
        return self._fill_on_device[1]


#: each named augmentation's crop padding (the largest shift, in pixels) and flip probability
AUGMENTATION_SETTINGS = {"flip": (0, 0.5), "crop1-flip": (1, 0.5), "crop-flip": (2, 0.5), "crop1": (1, 0.0), "crop": (2, 0.0)}
AUGMENTATIONS = ("none", *AUGMENTATION_SETTINGS)
#: each augmentation that flips, and the same without its flips (for data that mirroring changes)
WITHOUT_FLIPS = {"flip": "none", "crop1-flip": "crop1", "crop-flip": "crop"}


def make_augmentation(name: str, backend: Backend, seed: int = 0, normalization=None) -> RandomCropFlip | None:
    """The training-time augmentation called ``name`` (``"none"`` gives None: batches pass unchanged):
    ``"flip"`` mirrors half the images left-right, ``"crop1-flip"`` also shifts them by up to 1 pixel
    each way, ``"crop-flip"`` by up to 2 pixels; ``"crop1"`` and ``"crop"`` shift without flipping.
    ``normalization``: that of the batches (None: images in [0, 1]), so that the shifts pad with black."""
    if name == "none":
        return None
    if name not in AUGMENTATION_SETTINGS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")
    padding, flip_probability = AUGMENTATION_SETTINGS[name]
    return RandomCropFlip.for_normalization(backend, normalization, padding=padding, flip_probability=flip_probability, seed=seed)
