"""The one definition of the segmentation network, used by training, prediction and the benchmarks."""

import math
from typing import Any

import torch
from monai.networks.nets import UNet
from torch import nn


def model_config(
    channels: tuple[int, ...], strides: tuple[int, ...], num_res_units: int, dropout: float
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
    }


def build_model(config: dict[str, Any]) -> nn.Module:
    """A MONAI UNet from a model_config dict."""
    return UNet(**config)


def size_multiple(config: dict[str, Any]) -> int:
    """Each input side must be a multiple of this: the product of the strides (2^4 = 16 by default)."""
    multiple = 1
    for stride in config["strides"]:
        multiple *= stride
    return multiple


def set_output_prior(model: nn.Module, foreground_fraction: float) -> None:
    """Start the network predicting the training set's share of nerve pixels everywhere.

    The bias of the last convolution is set to log(p / (1 - p)) (the prior-probability start of Lin et
    al., 2017, "Focal loss"). MONAI's UNet ends in a one-channel instance norm, so its output is centred
    near zero (p = 0.5) and, with Adam's steps of about the learning rate, would need hundreds of steps
    just to learn that nerve pixels are rare; with this start it learns the nerve from the first steps.
    """
    p = min(max(foreground_fraction, 1e-4), 0.5)
    last = [module for module in model.modules() if isinstance(module, nn.Conv2d | nn.ConvTranspose2d)][-1]
    with torch.no_grad():
        last.bias.fill_(math.log(p / (1 - p)))
