"""What a network configuration may ask for: the bounds that a checkpoint (data from anywhere) and train.py's
settings share, checked before any network is built (nerveseg/checkpoint.py, nerveseg/training/runs.py)."""

import math
from typing import Any

from nerveseg import encoders
from nerveseg.model import network_of

MAX_CHANNELS = 4096  # the feature channels of one level (the UNet's largest: 256)
MAX_LEVELS = 10  # levels of the network (the default: 5)
MAX_STRIDE = 8  # the down-sampling of one level (the default: 2)
MAX_RES_UNITS = 16  # residual units per level (the default: 2)
MAX_FEATURE_VALUES = 2**26  # the feature maps of one image, all levels: 67 million values, 256 MiB as float32
# (the UNet at 160x224 holds 1.1 million; at 1024x1024, 33 million)


def check_network_request(config: Any, image_size: Any) -> None:
    """Refuse (ValueError, saying what is out of bounds) a configuration and input size (height, width) that ask for
    more than the bounds above: what a network of them would take in memory, checked before it is built."""
    def whole_numbers(values: Any, low: int, high: float) -> bool:
        return isinstance(values, list | tuple) and all(type(value) is int and low <= value <= high
                                                        for value in values)

    if not isinstance(config, dict):
        raise ValueError(f"its model_config is {type(config).__name__}, not a mapping")
    channels, strides = config.get("channels"), config.get("strides")
    if not whole_numbers(channels, 1, MAX_CHANNELS) or not 2 <= len(channels) <= MAX_LEVELS:
        raise ValueError(f"channels must be 2 to {MAX_LEVELS} whole numbers from 1 to {MAX_CHANNELS}, not "
                         f"{str(channels)[:80]}")
    if not whole_numbers(strides, 1, MAX_STRIDE):
        raise ValueError(f"strides must be whole numbers from 1 to {MAX_STRIDE}, not {str(strides)[:80]}")
    sides = [config.get("in_channels", 1), config.get("out_channels", 1), config.get("num_res_units", 0)]
    if not whole_numbers(sides[:2], 1, MAX_CHANNELS) or not whole_numbers(sides[2:], 0, MAX_RES_UNITS):
        raise ValueError(f"in_channels and out_channels must be whole numbers from 1 to {MAX_CHANNELS} and "
                         f"num_res_units from 0 to {MAX_RES_UNITS}, not {', '.join(str(side)[:20] for side in sides)}")
    if not whole_numbers([config.get("frozen_stages", 0)], 0, len(encoders.LITE_BLOCKS)):
        raise ValueError(f"frozen_stages must be a whole number from 0 to {len(encoders.LITE_BLOCKS)}, not "
                         f"{str(config.get('frozen_stages'))[:20]}")
    if not whole_numbers(image_size, 0, math.inf) or len(image_size) != 2:
        raise ValueError(f"its image size must be two whole numbers (height, width), not {str(image_size)[:80]}")
    values = feature_values(config, image_size)
    if values > MAX_FEATURE_VALUES:
        raise ValueError(f"an input of {image_size[0]}x{image_size[1]} with channels {list(channels)} holds "
                         f"{values / 1e6:,.0f} million feature values per image, above the bound of "
                         f"{MAX_FEATURE_VALUES / 1e6:.0f} million (smaller images or fewer channels)")


def feature_values(config: dict[str, Any], image_size: tuple[int, int]) -> int:
    """How many values the network's feature maps hold for one image: the input and output at full size, and each
    level's channels at its size (each level smaller than the one above by its stride, in both directions)."""
    height, width = image_size
    channels = network_of(config).level_channels(config["channels"])
    total, scale = (config.get("in_channels", 1) + config.get("out_channels", 1)) * height * width, 1
    for level_channels, stride in zip(channels, [1, *config["strides"]], strict=False):
        scale *= stride
        total += level_channels * (height // scale) * (width // scale)
    return total
