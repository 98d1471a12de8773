"""Augmenting whole batches on the training device at every step (the cached images stay as they were read)."""

import math

import torch
import torch.nn.functional as F

from nerveseg.errors import UserError

AUGMENTATIONS = ("light", "nnunet")  # today's small changes, or with nnU-Net's 2-D additions (see BatchAugment)


class BatchAugment:
    """Random changes suited to ultrasound, drawn per image but applied to a whole batch at once on its
    device (one grid_sample for the batch instead of one MONAI transform call per image).

    Small affine changes (the probe moves and tilts a little): rotation, zoom and shift, bilinear for the
    image and nearest for the mask, zeros outside. Gamma and gain changes (machines and settings differ)
    and a little noise. No vertical flip: depth has a direction in ultrasound. The left-right flip is off
    by default (flip_prob): it turns a left-side scan into a right-side one.

    nnU-Net's 2-D augmentation (Isensee et al., 2021), as options: a zoom range (zoom_range, 0.7-1.4 there,
    instead of 1 +- scale), Gaussian blur (sigma 0.5-1 pixel, chance blur_prob), simulated low resolution (down
    to 50-100% of the side by nearest neighbour and back by bilinear, chance low_resolution_prob) and contrast
    (x 0.75-1.25 around the image's mean, chance contrast_prob). BatchAugment.preset("nnunet", ...) turns them
    on with nnU-Net's chances.
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
        zoom_range: tuple[float, float] | None = None,
        blur_prob: float = 0.0,
        low_resolution_prob: float = 0.0,
        contrast_prob: float = 0.0,
    ) -> None:
        self.rotate, self.scale, self.shift = math.radians(rotate_degrees), scale, shift
        self.flip_prob, self.intensity_prob, self.affine_prob = flip_prob, intensity_prob, affine_prob
        self.zoom_range = zoom_range or (1 - scale, 1 + scale)
        self.blur_prob, self.low_resolution_prob, self.contrast_prob = blur_prob, low_resolution_prob, contrast_prob

    @classmethod
    def preset(cls, name: str, **options: float) -> "BatchAugment":
        """The augmentation AUGMENTATION names: "light" (today's, of the options given) or "nnunet" (with nnU-Net's
        2-D zoom range, blur, low resolution and contrast)."""
        if name not in AUGMENTATIONS:
            raise UserError(f"AUGMENTATION {name!r} is not one of {', '.join(AUGMENTATIONS)}")
        if name == "nnunet":
            options |= {"zoom_range": (0.7, 1.4), "blur_prob": 0.2, "low_resolution_prob": 0.25, "contrast_prob": 0.15}
        return cls(**options)

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
        zoom = torch.where(moved, uniform(*self.zoom_range), 1.0)
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
        if self.blur_prob > 0:
            images = gaussian_blur(images, torch.where(chance(self.blur_prob), uniform(0.5, 1.0), 0.0))
        if self.low_resolution_prob > 0:
            images = lower_resolution(images, torch.where(chance(self.low_resolution_prob), uniform(0.5, 1.0), 1.0))
        gamma = torch.where(chance(self.intensity_prob), uniform(0.7, 1.5), 1.0).view(-1, 1, 1, 1)
        gain = torch.where(chance(self.intensity_prob), uniform(0.8, 1.2), 1.0).view(-1, 1, 1, 1)
        noise = torch.where(chance(self.intensity_prob / 2), 0.03, 0.0).view(-1, 1, 1, 1)
        images = images.clamp(0, 1) ** gamma * gain
        if self.contrast_prob > 0:
            contrast = torch.where(chance(self.contrast_prob), uniform(0.75, 1.25), 1.0).view(-1, 1, 1, 1)
            mean = images.mean(dim=(1, 2, 3), keepdim=True)
            images = (images - mean) * contrast + mean
        images = images + noise * torch.randn(images.shape, device=device, generator=generator)
        return images.clamp(0, 1), labels


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Each (1, H, W) image of the batch blurred with its own Gaussian's sigma in pixels (0: unchanged), in two
    separable passes of one grouped convolution for the whole batch."""
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    spread = sigmas.clamp(min=1e-3).to(images.dtype)[:, None]
    kernels = torch.exp(-0.5 * (offsets[None] / spread) ** 2)
    kernels = torch.where(sigmas[:, None] > 0, kernels, (offsets == 0).to(images.dtype)[None])
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    count = images.shape[0]
    planes = F.pad(images.transpose(0, 1), (radius, radius, radius, radius), mode="replicate")  # (1, B, H, W)
    planes = F.conv2d(planes, kernels.view(count, 1, -1, 1), groups=count)
    planes = F.conv2d(planes, kernels.view(count, 1, 1, -1), groups=count)
    return planes.transpose(0, 1)


def lower_resolution(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Each image reduced to `factor` of its sides (nearest neighbour) and brought back (bilinear): the look of a
    coarser scan. Images with factor 1 are unchanged."""
    images = images.clone()
    height, width = images.shape[-2:]
    for index in torch.nonzero(factors < 1).flatten().tolist():
        factor = float(factors[index])
        small = F.interpolate(images[index : index + 1], size=(max(1, round(height * factor)),
                                                             max(1, round(width * factor))), mode="nearest-exact")
        images[index : index + 1] = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
    return images

