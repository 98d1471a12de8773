"""The one definition of the segmentation network, used by training, prediction, the exports and the benchmarks.

NETWORKS is the table of the networks MODEL chooses among: each entry says how to build it, what its settings
must be, which outputs give mask logits (deep supervision) and how to read them. Every network gets the same
image-level presence output (a head on its deepest features) and is called the same way,
`mask_logits, presence_logits = model(images)`, so validation, prediction, the ensemble, test-time augmentation
and the exports run any of them alike:

    unet                MONAI's UNet (residual units): the default until 2026-12-07, and every checkpoint made before
                        MODEL existed
    unetplusplus        BasicUNetPlusPlus (Zhou et al., 2018: nested dense skip paths), deep supervision on 4 outputs
    attentionunet       AttentionUnet (Oktay et al., 2018: attention gates on the skip connections)
    segresnet           SegResNet (Myronenko, 2018: residual encoder, light decoder)
    dynunet             DynUNet (MONAI's nnU-Net-style network), deep supervision on its 2 coarser decoder levels
    efficientnet-lite0  MONAI's FlexibleUNet decoder on EfficientNet-Lite0, which starts from ImageNet weights: the
                        default (it won on both real sets by cross-validation, docs/results.md)
    efficientnet-b0..b7 the same on MONAI's EfficientNet-B0..B7 (their ImageNet weights are downloaded)

The networks of MONAI take the levels' feature channels (CHANNELS) and down-sampling (STRIDES); the ImageNet
encoders (nerveseg/encoders.py) have their own levels and take DECODER_CHANNELS, coarsest last, as their
decoder's (network_channels: a model_config's "channels" are whichever the network takes).
Adding a network is one entry of NETWORKS (and, for an ImageNet encoder, one of encoders.ENCODERS).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.layers import SkipConnection
from monai.networks.nets import AttentionUnet, BasicUNetPlusPlus, DynUNet, SegResNet, UNet
from torch import nn

from nerveseg import encoders
from nerveseg.errors import UserError

PRESENCE_SIGNALS = ("head", "head+mask")  # the presence head alone, or averaged with the mask's largest probability
DEEP_SUPERVISION_LEVELS = 2  # DynUNet's coarser decoder levels with an output of their own (nnU-Net uses all but two)
ENCODER_WEIGHTS = ("imagenet", "random")  # where an ImageNet encoder starts (or a weights file: encoders.py)

@dataclass(frozen=True)
class Network:
    """One network of NETWORKS.

    summary: what it is, in words (for -h, the checkpoint's readers, the ONNX metadata and the bundle's README).
    build: its MONAI network for a model_config, the module whose output is its deepest features, and their
        channels (PresenceNetwork adds the presence head there).
    output_blocks: the blocks of the built network whose last convolution gives mask logits, the final one first
        (the others are deep supervision's).
    model_class: the whole model's own class, instead of PresenceNetwork and `build` (the UNet's: the weights'
        names of its checkpoints).
    read_output: what the network returns, as the final mask logits and deep supervision's coarser ones.
    problem: why CHANNELS and STRIDES do not suit it ("" when they do).
    size_multiple: each input side must be a multiple of this, for a model_config.
    encoder: the ImageNet encoder it starts from (nerveseg/encoders.py), "" for a network trained from scratch.
    shaped_by: the model_config keys that shape it (named with the network wherever it is described).
    level_channels: the feature channels of its levels, from CHANNELS (for the bound on its memory).
    weights: the names of its weights in a state dict, in words (the bundle's README).
    """

    summary: str
    build: Callable[[dict], tuple[nn.Module, nn.Module, int]] | None = None
    output_blocks: Callable[[nn.Module], list[nn.Module]] = lambda network: []
    model_class: type[nn.Module] | None = None
    read_output: Callable[[Any], tuple[torch.Tensor, list[torch.Tensor]]] = lambda output: (output, [])
    problem: Callable[[list[int], list[int]], str] = lambda channels, strides: ""
    size_multiple: Callable[[dict], int] = lambda config: math.prod(config["strides"])
    encoder: str = ""
    shaped_by: tuple[str, ...] = ("channels", "strides")
    level_channels: Callable[[list[int]], list[int]] = lambda channels: channels
    weights: str = "`network.*`, with `presence_head.linear.*`"


def halving(name: str, levels: int = 0) -> Callable[[list[int], list[int]], str]:
    """The problem of a network that halves the image at each level (and has exactly `levels` levels)."""

    def problem(channels: list[int], strides: list[int]) -> str:
        if levels and len(channels) != levels:
            return f"MODEL {name} has exactly {levels} levels: --channels needs {levels} values, not {len(channels)}"
        if any(stride != 2 for stride in strides):
            return f"MODEL {name} halves the image at each level: --strides must be all 2, not {list(strides)}"
        return ""

    return problem


def unet_plus_plus(config: dict) -> tuple[nn.Module, nn.Module, int]:
    channels = config["channels"]
    network = BasicUNetPlusPlus(**common_arguments(config), features=(*channels, channels[0]),
                                dropout=config["dropout"], deep_supervision=True)
    return network, network.conv_4_0, channels[4]


def attention_unet(config: dict) -> tuple[nn.Module, nn.Module, int]:
    network = AttentionUnet(**common_arguments(config), channels=config["channels"], strides=config["strides"],
                            dropout=config["dropout"])
    layer = network.model[1]
    while isinstance(layer.submodule, nn.Sequential):  # each level: Sequential(down block, next level)
        layer = layer.submodule[1]
    return network, layer.submodule, config["channels"][-1]


def seg_res_net(config: dict) -> tuple[nn.Module, nn.Module, int]:
    channels, levels = config["channels"], len(config["channels"])
    network = SegResNet(**common_arguments(config), init_filters=channels[0], dropout_prob=config["dropout"] or None,
                        blocks_down=(1, *[2] * (levels - 2), 4), blocks_up=(1,) * (levels - 1))
    return network, network.down_layers[-1], channels[0] * 2 ** (levels - 1)


def dyn_unet(config: dict) -> tuple[nn.Module, nn.Module, int]:
    channels, strides = config["channels"], config["strides"]
    supervised = min(DEEP_SUPERVISION_LEVELS, len(strides) - 1)
    network = DynUNet(**common_arguments(config), kernel_size=[3] * len(channels), strides=[1, *strides],
                      upsample_kernel_size=strides, filters=channels, dropout=config["dropout"] or None,
                      res_block=config["num_res_units"] > 0, deep_supervision=supervised > 0,
                      deep_supr_num=max(supervised, 1))
    return network, network.bottleneck, channels[-1]


def encoder_unet(config: dict) -> tuple[nn.Module, nn.Module, int]:
    network = encoders.EncoderUNet(config["model"], decoder_channels=tuple(reversed(config["channels"])),
                                   dropout=config["dropout"], frozen_stages=config.get("frozen_stages", 0))
    return network, network.deepest, network.deepest_channels


def common_arguments(config: dict) -> dict:
    return {"spatial_dims": 2, "in_channels": config["in_channels"], "out_channels": config["out_channels"]}


def dynunet_output(output: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    if output.dim() == 5:  # training: (B, 1 + levels, C, H, W), the final output first
        return output[:, 0], list(output[:, 1:].unbind(1))
    return output, []


def encoder_entry(encoder: str) -> Network:
    """The FlexibleUNet of an ImageNet encoder (encoders.ENCODERS): 5 levels, each halving the image."""
    return Network(
        summary=f"MONAI FlexibleUNet, a U-Net decoder (CHANNELS, coarsest last) on the {encoder} encoder",
        build=encoder_unet, output_blocks=lambda network: [network.unet.segmentation_head],
        problem=halving(encoder, levels=5), size_multiple=lambda config: 16, encoder=encoder, shaped_by=("channels",),
        weights=f"`network.unet.encoder.*` ({encoder}), `network.unet.decoder.*`, `network.unet.segmentation_head.*`, "
                "with `presence_head.linear.*`")


def network_channels(model: str, channels: tuple[int, ...], decoder_channels: tuple[int, ...]) -> tuple[int, ...]:
    """The channels a model_config of `model` takes: CHANNELS, its levels', for a network trained from scratch;
    DECODER_CHANNELS, its decoder's, for an ImageNet encoder (whose own levels are fixed)."""
    return decoder_channels if NETWORKS[model].encoder else channels


def model_config(
    channels: tuple[int, ...],
    strides: tuple[int, ...],
    num_res_units: int,
    dropout: float,
    *,
    presence: bool = True,
    model: str = "unet",
    presence_signal: str = "head",
    encoder_weights: str = "",
    frozen_stages: int = 0,
) -> dict[str, Any]:
    """The constructor arguments of the network, as stored in a checkpoint; `encoder_weights` says where an
    ImageNet encoder started from (start_encoder's answer), for the record; `frozen_stages` how many of its first
    stages keep those weights (none when it starts from random weights)."""
    if model not in NETWORKS:
        raise UserError(f"MODEL {model!r} is not one of {', '.join(MODELS)}")
    if presence_signal not in PRESENCE_SIGNALS:
        raise UserError(f"PRESENCE_SIGNAL {presence_signal!r} is not one of {', '.join(PRESENCE_SIGNALS)}")
    if len(strides) != len(channels) - 1:
        raise UserError(f"--strides needs one value fewer than --channels ({len(channels)} levels), not {len(strides)}")
    if problem := NETWORKS[model].problem(list(channels), list(strides)):
        raise UserError(problem)
    config = {
        "model": model,  # which network (a checkpoint without it holds the UNet)
        "spatial_dims": 2,
        "in_channels": 1,  # grayscale ultrasound
        "out_channels": 1,  # one logit per pixel: nerve or not
        "channels": list(channels),
        "strides": list(strides),
        "num_res_units": num_res_units,
        "dropout": dropout,
        "presence": presence,  # the image-level output: is the target in the image at all?
    }
    if presence_signal != "head":  # a checkpoint without it uses the head alone
        config["presence_signal"] = presence_signal
    if NETWORKS[model].encoder:
        config["encoder_weights"] = encoder_weights or "random"
        config["frozen_stages"] = frozen_stages if config["encoder_weights"] != "random" else 0
    return config


def presence_from_mask(mask_logits: torch.Tensor, presence_logits: torch.Tensor) -> torch.Tensor:
    """The presence logit of two signals: the mean of the head's probability and the mask's largest pixel
    probability (the two evidences a strong Kaggle solution averaged)."""
    largest = torch.sigmoid(mask_logits.float()).flatten(1).amax(dim=1)
    mean = (torch.sigmoid(presence_logits.float()) + largest) / 2
    mean = mean.clamp(1e-7, 1 - 1e-7)
    return torch.log(mean) - torch.log1p(-mean)


class PresenceHead(nn.Module):
    """The logit that the target is anywhere in the image, from a network's deepest features: their average and
    their maximum over the image, then one linear layer."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(2 * channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return self.linear(pooled)[:, 0]


class PresenceUNet(UNet):
    """MONAI's UNet, plus an image-level output: the logit that the target is anywhere in the image.

    The presence head reads the UNet's bottleneck, its coarsest and most global features: their average
    and their maximum over the image, then one linear layer. It is trained beside the mask (see
    training.steps.SegmentationLoss), and an image it judges empty gets an empty mask (postprocess.to_mask): a
    whole-image decision that a per-pixel threshold or a minimum area cannot make well.

    forward returns (mask logits (B, 1, H, W), presence logits (B,)), or (mask logits, None) with
    presence=False (checkpoints made before the presence output existed load that way). With
    presence_signal "head+mask", the presence of a model in eval mode also weighs the mask (presence_from_mask).
    """

    def __init__(self, presence: bool = False, presence_signal: str = "head", **unet_arguments: Any) -> None:
        super().__init__(**unet_arguments)
        # A plain Linear (not PresenceHead): the weights' names of the checkpoints made before MODEL existed
        self.presence_head = nn.Linear(2 * self.channels[-1], 1) if presence else None
        self.presence_signal = presence_signal
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
        presence_logits = self.presence_head(pooled)[:, 0]
        if self.presence_signal == "head+mask" and not self.training:
            presence_logits = presence_from_mask(mask_logits, presence_logits)
        return mask_logits, presence_logits

    def output_convolutions(self) -> list[nn.Module]:
        """The convolution that gives mask logits."""
        return [[module for module in self.modules() if isinstance(module, nn.Conv2d | nn.ConvTranspose2d)][-1]]

    def presence_linear(self) -> nn.Linear | None:
        return self.presence_head


def bottleneck_block(unet: UNet) -> nn.Module:
    """The innermost block of a MONAI UNet: each level is Sequential(down, SkipConnection(next level), up)."""
    block = unet.model
    while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
        block = block[1].submodule
    return block


class PresenceNetwork(nn.Module):
    """Any other network of NETWORKS with the presence output.

    Called like PresenceUNet. In training mode a network with deep supervision also returns the mask logits of
    its coarser outputs, at full size, as a third element (training.steps.SegmentationLoss weighs them); in eval
    mode (validation, prediction, export) it returns only the final mask and the presence.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.entry = network_of(config)
        self.network, deepest, deepest_channels = self.entry.build(config)
        self.presence_head = PresenceHead(deepest_channels) if config["presence"] else None
        self.presence_signal = config.get("presence_signal", "head")
        self._deepest: torch.Tensor | None = None
        if self.presence_head is not None:
            deepest.register_forward_hook(self._keep_deepest)

    def _keep_deepest(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._deepest = output

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mask_logits, deep = self.entry.read_output(self.network(images))
        presence_logits = None
        if self.presence_head is not None:
            features, self._deepest = self._deepest, None
            presence_logits = self.presence_head(features)
            if self.presence_signal == "head+mask" and not self.training:
                presence_logits = presence_from_mask(mask_logits, presence_logits)
        if self.training and deep:
            return mask_logits, presence_logits, deep
        return mask_logits, presence_logits

    def output_convolutions(self) -> list[nn.Module]:
        """The convolutions that give mask logits: the final one and those of deep supervision."""
        return [[module for module in block.modules() if isinstance(module, nn.Conv2d)][-1]
                for block in self.entry.output_blocks(self.network)]

    def presence_linear(self) -> nn.Linear | None:
        return self.presence_head.linear if self.presence_head is not None else None


NETWORKS = {
    "unet": Network(
        summary="MONAI UNet with residual units", model_class=PresenceUNet,
        shaped_by=("channels", "strides", "num_res_units"), weights="MONAI UNet's `model.*`, with `presence_head.*`"),
    "unetplusplus": Network(
        summary="MONAI BasicUNetPlusPlus (nested skip paths, deep supervision)", build=unet_plus_plus,
        output_blocks=lambda network: [network.final_conv_0_4, network.final_conv_0_3, network.final_conv_0_2,
                                       network.final_conv_0_1],
        read_output=lambda output: (output[-1], output[-2::-1]),  # a list, coarsest first; the full network's last
        problem=halving("unetplusplus", levels=5), shaped_by=("channels",)),
    "attentionunet": Network(
        summary="MONAI AttentionUnet (attention gates on the skips)", build=attention_unet,
        output_blocks=lambda network: [network.model[-1]]),  # its 1x1 reduce_channels convolution
    "segresnet": Network(
        summary="MONAI SegResNet (residual encoder, light decoder)", build=seg_res_net,
        output_blocks=lambda network: [network.conv_final], problem=halving("segresnet"), shaped_by=("channels",),
        level_channels=lambda channels: [channels[0] * 2**level for level in range(len(channels))]),
    "dynunet": Network(
        summary="MONAI DynUNet (nnU-Net-style, deep supervision)", build=dyn_unet,
        output_blocks=lambda network: [network.output_block,
                                       *(network.deep_supervision_heads if network.deep_supervision else [])],
        read_output=dynunet_output, shaped_by=("channels", "strides", "num_res_units")),
    **{encoder: encoder_entry(encoder) for encoder in encoders.ENCODERS},
}
MODELS = tuple(NETWORKS)


def network_of(config: dict[str, Any]) -> Network:
    """The entry of a model_config (one without "model", from before MODEL existed, is the UNet)."""
    name = config.get("model", "unet")
    if not isinstance(name, str) or name not in NETWORKS:
        raise ValueError(f"unknown network {name!r} (this version knows {', '.join(MODELS)})")
    return NETWORKS[name]


def describe_network(config: dict[str, Any]) -> str:
    """The network of a model_config in words: for the checkpoint's readers, the ONNX metadata and the bundle."""
    entry = network_of(config)
    shape = ", ".join(f"{key.replace('num_res_units', 'residual units')} {config[key]}" for key in entry.shaped_by)
    weights = config.get("encoder_weights", "random")
    source = f"ImageNet weights ({weights.removeprefix('ImageNet: ')})" if weights != "random" else "random weights"
    start = f"; its encoder started from {source}" if entry.encoder else ""
    presence = "; with an image-level presence output" if config.get("presence") else ""
    return f"{entry.summary}; {shape}{start}{presence}"


def build_model(config: dict[str, Any]) -> nn.Module:
    """The network of a model_config dict, with random weights (one without "model", from an older checkpoint,
    is the UNet; one without "presence" has no presence output)."""
    entry = network_of(config)
    if entry.model_class is not None:
        return entry.model_class(**{key: value for key, value in config.items() if key != "model"})
    return PresenceNetwork({"presence": False, **config})


def encoder_start(model: str, weights: str) -> str:
    """Where the ImageNet encoder of a network starts (encoders.describe_start), "" for a network without one."""
    encoder = NETWORKS[model].encoder
    return encoders.describe_start(encoder, weights) if encoder else ""


def start_encoder(model: nn.Module, config: dict[str, Any], weights: str) -> None:
    """Start the ImageNet encoder of a model built by build_model (if it has one) from `weights` (encoder_start)."""
    if encoder := network_of(config).encoder:
        encoders.start_from(model.network.unet.encoder, encoder, weights)


def size_multiple(config: dict[str, Any]) -> int:
    """Each input side must be a multiple of this (for the UNet, the product of the strides: 2^4 = 16 by default)."""
    return network_of(config).size_multiple(config)


def log_odds(p: float) -> float:
    """log(p / (1 - p)), with p kept away from 0 and 1."""
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def set_output_prior(model: nn.Module, foreground_fraction: float, present_fraction: float) -> None:
    """Start the network predicting the training set's share of target pixels everywhere, and its share of
    images with a target for presence.

    The bias of the last convolution (of each output, with deep supervision) is set to log(p / (1 - p)) (the
    prior-probability start of Lin et al., 2017, "Focal loss"). MONAI's UNet ends in a one-channel instance norm,
    so its output is centred near zero (p = 0.5) and, with Adam's steps of about the learning rate, would need
    hundreds of steps just to learn that nerve pixels are rare; with this start it learns the nerve from the first
    steps. With a class-balanced presence loss, pass present_fraction 0.5.
    """
    head = model.presence_linear()
    with torch.no_grad():
        for convolution in model.output_convolutions():
            convolution.bias.fill_(log_odds(min(foreground_fraction, 0.5)))
        if head is not None:
            head.bias.fill_(log_odds(present_fraction))


def presence_probabilities(presence_logits: torch.Tensor | None, count: int) -> list[float]:
    """Each image's presence probability; 1.0 for every image of a model without a presence output."""
    if presence_logits is None:
        return [1.0] * count
    return torch.sigmoid(presence_logits.float()).cpu().tolist()
