"""The one definition of the segmentation network, used by training, prediction and the benchmarks."""

import math
from typing import Any

import torch
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNet
from torch import nn


def model_config(
    channels: tuple[int, ...], strides: tuple[int, ...], num_res_units: int, dropout: float, *, presence: bool = True
) -> dict[str, Any]:
    """The constructor arguments of the network, as stored in a checkpoint."""
    return {
        "spatial_dims": 2,
        "in_channels": 1,  # grayscale ultrasound
        "out_channels": 1,  # one logit per pixel: nerve or not
        "channels": list(channels),
        "strides": list(strides),
        "num_res_units": num_res_units,
        "dropout": dropout,
        "presence": presence,  # the image-level output: is the target in the image at all?
    }


class PresenceUNet(UNet):
    """MONAI's UNet, plus an image-level output: the logit that the target is anywhere in the image.

    The presence head reads the UNet's bottleneck, its coarsest and most global features: their average
    and their maximum over the image, then one linear layer. It is trained beside the mask (see
    training.SegmentationLoss), and an image it judges empty gets an empty mask (postprocess.to_mask): a
    whole-image decision that a per-pixel threshold or a minimum area cannot make well.

    forward returns (mask logits (B, 1, H, W), presence logits (B,)), or (mask logits, None) with
    presence=False (checkpoints made before the presence output existed load that way).
    """

    def __init__(self, presence: bool = False, **unet_arguments: Any) -> None:
        super().__init__(**unet_arguments)
        self.presence_head = nn.Linear(2 * self.channels[-1], 1) if presence else None
        self._bottleneck: torch.Tensor | None = None
        if presence:
            bottleneck_block(self).register_forward_hook(self._keep_bottleneck)

    def _keep_bottleneck(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._bottleneck = output

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask_logits = super().forward(images)
        if self.presence_head is None:
            return mask_logits, None
        features, self._bottleneck = self._bottleneck, None
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return mask_logits, self.presence_head(pooled)[:, 0]


def bottleneck_block(unet: UNet) -> nn.Module:
    """The innermost block of a MONAI UNet: each level is Sequential(down, SkipConnection(next level), up)."""
    block = unet.model
    while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
        block = block[1].submodule
    return block


def build_model(config: dict[str, Any]) -> PresenceUNet:
    """The network of a model_config dict (one without "presence", from an older checkpoint, has none)."""
    return PresenceUNet(**config)


def size_multiple(config: dict[str, Any]) -> int:
    """Each input side must be a multiple of this: the product of the strides (2^4 = 16 by default)."""
    multiple = 1
    for stride in config["strides"]:
        multiple *= stride
    return multiple


def log_odds(p: float) -> float:
    """log(p / (1 - p)), with p kept away from 0 and 1."""
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def set_output_prior(model: PresenceUNet, foreground_fraction: float, present_fraction: float) -> None:
    """Start the network predicting the training set's share of target pixels everywhere, and its share of
    images with a target for presence.

    The bias of the last convolution is set to log(p / (1 - p)) (the prior-probability start of Lin et
    al., 2017, "Focal loss"). MONAI's UNet ends in a one-channel instance norm, so its output is centred
    near zero (p = 0.5) and, with Adam's steps of about the learning rate, would need hundreds of steps
    just to learn that nerve pixels are rare; with this start it learns the nerve from the first steps.
    """
    last = [module for module in model.modules() if isinstance(module, nn.Conv2d | nn.ConvTranspose2d)][-1]
    with torch.no_grad():
        last.bias.fill_(log_odds(min(foreground_fraction, 0.5)))
        if model.presence_head is not None:
            model.presence_head.bias.fill_(log_odds(present_fraction))
