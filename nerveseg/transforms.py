"""Getting images to the network: reading and resizing (MONAI dict transforms, cached once); the training
stage augments them (nerveseg/training/augment.py).

Images are read with PIL through nerveseg/images.py's `read_gray` (a regular file only, bounded in pixels
before decoding, upright by its EXIF orientation), as (height, width) arrays exactly as every image viewer
shows them, not transposed (which MONAI's PILReader does unless told reverse_indexing=False). The cache
holds 8-bit images and 0/1 masks at the network's size (a quarter of float32's memory); the network
sees `network_input(images)`, floats in [0, 1].
"""

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Compose, MapTransform, Resized

from nerveseg.frames import read_image
from nerveseg.images import MAX_IMAGE_PIXELS
from nerveseg.video import MAX_VIDEO_FRAMES


class ReadImaged(MapTransform):
    """Read each key's file (or a DICOM or video frame, `<file>#<n>`: nerveseg.frames.read_image) as 8-bit
    grayscale into a (1, height, width) float32 tensor, as MONAI's LoadImaged and EnsureChannelFirstd would; the
    first key's notes (several frames, non-finite pixels) go to "notes"."""

    def __init__(self, keys: Sequence[str], *, max_pixels: int, max_video_frames: int = MAX_VIDEO_FRAMES) -> None:
        super().__init__(keys)
        self.max_pixels, self.max_video_frames = max_pixels, max_video_frames

    def __call__(self, data: Mapping[Hashable, str]) -> dict:
        d = dict(data)
        for number, key in enumerate(self.keys):
            image = read_image(d[key], max_pixels=self.max_pixels, max_video_frames=self.max_video_frames)
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
    image_size: Sequence[int], *, with_label: bool, keep_full_label: bool = False, max_pixels: int = MAX_IMAGE_PIXELS,
    max_video_frames: int = MAX_VIDEO_FRAMES,
) -> Compose:
    """Read and resize whole images (area) and masks (nearest neighbour) to the network's size: done once.

    keep_full_label also keeps the mask at its original size, packed (see PackFullMaskd); an image of more than
    `max_pixels` pixels, or a video of more than `max_video_frames` frames, is refused before it is decoded.
    """
    keys = ["image", "label"] if with_label else ["image"]
    steps = [ReadImaged(keys, max_pixels=max_pixels, max_video_frames=max_video_frames), RecordSized("image")]
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


