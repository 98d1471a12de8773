"""Getting images to the network: reading and resizing (MONAI dict transforms, cached once), and augmenting
whole batches on the training device at every step.

Images are read with PIL through nerveseg/images.py's `read_gray` (a regular file only, bounded in pixels
before decoding, upright by its EXIF orientation), as (height, width) arrays exactly as every image viewer
shows them, not transposed (which MONAI's PILReader does unless told reverse_indexing=False). The cache
holds 8-bit images and 0/1 masks at the network's size (a quarter of float32's memory); the network
sees `network_input(images)`, floats in [0, 1].
"""

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, MapTransform, Resized

from nerveseg.images import MAX_IMAGE_PIXELS, read_gray


class ReadImaged(MapTransform):
    """Read each key's file as 8-bit grayscale (nerveseg.images.read_gray) into a (1, height, width) float32
    tensor, as MONAI's LoadImaged and EnsureChannelFirstd would; the first key's notes (several frames,
    non-finite pixels) go to "notes"."""

    def __init__(self, keys: Sequence[str], *, max_pixels: int) -> None:
        super().__init__(keys)
        self.max_pixels = max_pixels

    def __call__(self, data: Mapping[Hashable, str]) -> dict:
        d = dict(data)
        for number, key in enumerate(self.keys):
            image = read_gray(d[key], max_pixels=self.max_pixels)
            d[key] = torch.from_numpy(image.pixels.astype(np.float32))[None]
            if number == 0:
                d["notes"] = image.notes
        return d


class RecordSized(MapTransform):
    """Store the image's (height, width) before resizing, to bring predictions back to it."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        d["original_size"] = torch.tensor(d[self.keys[0]].shape[-2:])
        return d


class PackFullMaskd(MapTransform):
    """Keep the mask at its original size too, packed 8 pixels a byte ("full_label"), for the Dice there."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        mask = np.asarray(d[self.keys[0]])[0] > 0
        d["full_label"] = torch.from_numpy(np.packbits(mask.ravel()))
        return d


def unpack_mask(bits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The (1, H, W) bool mask that PackFullMaskd packed."""
    height, width = int(size[0]), int(size[1])
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=height * width).reshape(1, height, width) > 0)


class ToUint8d(MapTransform):
    """Images rounded to 8 bits; masks as 0/1 bytes."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        d["image"] = torch.as_tensor(d["image"]).round().clamp(0, 255).to(torch.uint8)
        if "label" in d:
            d["label"] = (torch.as_tensor(d["label"]) > 0).to(torch.uint8)
        return d


def load_transforms(
    image_size: Sequence[int], *, with_label: bool, keep_full_label: bool = False, max_pixels: int = MAX_IMAGE_PIXELS
) -> Compose:
    """Read and resize whole images (area) and masks (nearest neighbour) to the network's size: done once.

    keep_full_label also keeps the mask at its original size, packed (see PackFullMaskd); an image of more than
    `max_pixels` pixels is refused before it is decoded.
    """
    keys = ["image", "label"] if with_label else ["image"]
    steps = [ReadImaged(keys, max_pixels=max_pixels), RecordSized("image")]
    if keep_full_label:
        steps.append(PackFullMaskd("label"))
    steps.append(Resized("image", spatial_size=image_size, mode="area"))
    if with_label:
        steps.append(Resized("label", spatial_size=image_size, mode="nearest-exact"))
    steps.append(ToUint8d(keys))
    return Compose(steps)


def collate_keep_sizes(batch: list[dict]) -> dict:
    """Stack the network inputs; keep full-size masks and names as lists (their sizes may differ)."""
    stacked = {key: torch.stack([item[key] for item in batch]) for key in ("image", "label") if key in batch[0]}
    lists = {key: [item[key] for item in batch] for key in batch[0] if key not in stacked}
    return stacked | lists


def network_input(images: torch.Tensor) -> torch.Tensor:
    """8-bit images (on any device) as the floats in [0, 1] that the network sees."""
    return images.float() / 255.0


class BatchAugment:
    """Random changes suited to ultrasound, drawn per image but applied to a whole batch at once on its
    device (one grid_sample for the batch instead of one MONAI transform call per image).

    Small affine changes (the probe moves and tilts a little): rotation, zoom and shift, bilinear for the
    image and nearest for the mask, zeros outside. Gamma and gain changes (machines and settings differ)
    and a little noise. No vertical flip: depth has a direction in ultrasound. The left-right flip is off
    by default (flip_prob): it turns a left-side scan into a right-side one.
    """

    def __init__(
        self,
        *,
        rotate_degrees: float,
        scale: float,
        shift: float,
        flip_prob: float,
        intensity_prob: float,
        affine_prob: float = 0.8,
    ) -> None:
        self.rotate, self.scale, self.shift = math.radians(rotate_degrees), scale, shift
        self.flip_prob, self.intensity_prob, self.affine_prob = flip_prob, intensity_prob, affine_prob

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment float images in [0, 1] and float 0/1 labels, both (batch, 1, height, width)."""
        count, device = images.shape[0], images.device

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(count, device=device, generator=generator)

        def chance(probability: float) -> torch.Tensor:
            return torch.rand(count, device=device, generator=generator) < probability

        moved = chance(self.affine_prob)
        angle = torch.where(moved, uniform(-self.rotate, self.rotate), 0.0)
        zoom = torch.where(moved, uniform(1 - self.scale, 1 + self.scale), 1.0)
        shift_x = torch.where(moved, uniform(-self.shift, self.shift) * 2, 0.0)  # normalised coordinates span 2
        shift_y = torch.where(moved, uniform(-self.shift, self.shift) * 2, 0.0)
        mirror = torch.where(chance(self.flip_prob), -1.0, 1.0)
        height, width = images.shape[-2:]
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # A rotation in pixels, written in normalised coordinates (x spans the width, y the height).
        theta = torch.stack(
            [
                torch.stack([cos * mirror, -sin * height / width, shift_x], 1),
                torch.stack([sin * width / height * mirror, cos, shift_y], 1),
            ],
            1,
        )
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        labels = F.grid_sample(labels, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        gamma = torch.where(chance(self.intensity_prob), uniform(0.7, 1.5), 1.0).view(-1, 1, 1, 1)
        gain = torch.where(chance(self.intensity_prob), uniform(0.8, 1.2), 1.0).view(-1, 1, 1, 1)
        noise = torch.where(chance(self.intensity_prob / 2), 0.03, 0.0).view(-1, 1, 1, 1)
        images = images.clamp(0, 1) ** gamma * gain
        images = images + noise * torch.randn(images.shape, device=device, generator=generator)
        return images.clamp(0, 1), labels
