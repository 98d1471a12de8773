"""The MONAI transforms: reading and resizing (cached once), augmentation (every step).

Images are read with PIL (MONAI does not pick it for .tif by itself) with reverse_indexing=False, so
arrays are (height, width) exactly as PIL and every image viewer show them, not transposed.
"""

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import PILReader
from monai.transforms import (
    Compose,
    CopyItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    Resized,
    ScaleIntensityRanged,
)
from PIL import Image


def to_grayscale(image: Image.Image) -> Image.Image:
    """PIL converter: any input image (RGB, palette, 8-bit) as 8-bit grayscale."""
    return image if image.mode == "L" else image.convert("L")


def image_reader() -> PILReader:
    """The reader every stage uses: PIL, grayscale, not transposed."""
    return PILReader(converter=to_grayscale, reverse_indexing=False)


class RecordSized(MapTransform):
    """Store the image's (height, width) before resizing, to bring predictions back to it."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        d["original_size"] = torch.tensor(d[self.keys[0]].shape[-2:])
        return d


def load_transforms(image_size: Sequence[int], with_label: bool, keep_full_label: bool = False) -> Compose:
    """Read, scale to [0, 1] and resize whole images (and masks, by nearest neighbour): done once, then cached.

    keep_full_label keeps the mask at its original size too (as "full_label", uint8), for the Dice at
    the original resolution.
    """
    keys = ["image", "label"] if with_label else ["image"]
    steps = [
        LoadImaged(keys, reader=image_reader(), image_only=True),
        EnsureChannelFirstd(keys, channel_dim="no_channel"),
        RecordSized("image"),
        ScaleIntensityRanged(keys, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
    ]
    if keep_full_label:
        steps += [
            CopyItemsd("label", names="full_label"),
            EnsureTyped("full_label", dtype=torch.uint8, track_meta=False),
        ]
    steps += [Resized("image", spatial_size=image_size, mode="area")]
    if with_label:
        steps += [Resized("label", spatial_size=image_size, mode="nearest-exact")]
    steps += [EnsureTyped(keys, dtype=torch.float32, track_meta=False)]
    return Compose(steps)


def augment_transforms(
    rotate_degrees: float,
    scale: float,
    shift: float,
    flip_prob: float,
    intensity_prob: float,
    image_size: Sequence[int],
) -> Compose:
    """Random changes suited to ultrasound, applied to each training sample at every step.

    Small affine changes (the probe moves and tilts a little), gamma and gain changes (machines and
    settings differ) and a little noise. No vertical flip: depth has a direction in ultrasound. The
    left-right flip is off by default (flip_prob): it turns a left-side scan into a right-side one.
    """
    radians = np.deg2rad(rotate_degrees)
    steps = [
        RandAffined(
            ["image", "label"],
            prob=0.8,
            rotate_range=radians,
            scale_range=(scale, scale),
            translate_range=(shift * image_size[0], shift * image_size[1]),
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        ),
        RandAdjustContrastd("image", prob=intensity_prob, gamma=(0.7, 1.5)),
        RandScaleIntensityd("image", factors=0.2, prob=intensity_prob),
        RandGaussianNoised("image", prob=intensity_prob / 2, std=0.03),
    ]
    if flip_prob > 0:
        steps.append(RandFlipd(["image", "label"], prob=flip_prob, spatial_axis=1))
    return Compose(steps)
