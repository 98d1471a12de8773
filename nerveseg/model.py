"""The one definition of the segmentation network, used by training, prediction and the benchmarks."""

from typing import Any

from monai.networks.nets import UNet
from torch import nn


def model_config(channels: tuple[int, ...], strides: tuple[int, ...], num_res_units: int, dropout: float) -> dict[str, Any]:
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
