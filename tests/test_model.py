"""nerveseg/model.py: every network of MODEL gives masks and presence alike, traces, and starts at the prior."""

import pytest
import torch

from nerveseg.errors import UserError
from nerveseg.model import MODELS, NETWORKS, build_model, describe_network, log_odds, model_config, set_output_prior

SMALL = ((8, 16, 32, 64, 128), (2, 2, 2, 2))  # 5 levels (unetplusplus), channels that group norm divides (segresnet)
DEEP_OUTPUTS = {"unetplusplus": 3, "dynunet": 2}  # the coarser outputs trained with deep supervision
LARGER_EFFICIENTNETS = [f"efficientnet-b{size}" for size in range(1, 8)]  # B0 stands for them (slow test below)
NETWORKS_TESTED = [name for name in MODELS if name not in LARGER_EFFICIENTNETS]


@pytest.mark.parametrize("name", NETWORKS_TESTED)
def test_every_network_gives_a_mask_and_a_presence_and_traces(name):
    torch.manual_seed(0)
    model = build_model(model_config(*SMALL, 1, 0.0, model=name))
    images = torch.rand(3, 1, 32, 48)
    model.train()
    outputs = model(images)
    assert outputs[0].shape == (3, 1, 32, 48) and outputs[1].shape == (3,)
    deep = outputs[2] if len(outputs) > 2 else []
    assert len(deep) == DEEP_OUTPUTS.get(name, 0) and all(mask.shape == (3, 1, 32, 48) for mask in deep)
    model.eval()
    with torch.no_grad():
        mask_logits, presence_logits = model(images)  # eval: the two outputs of every consumer
        traced = torch.jit.trace(model, images[:1], strict=False)  # the TorchScript bundle traces it
        traced_masks, traced_presence = traced(images)
    torch.testing.assert_close(traced_masks, mask_logits)
    torch.testing.assert_close(traced_presence, presence_logits)


@pytest.mark.parametrize("name", NETWORKS_TESTED)
def test_each_output_and_the_presence_start_at_the_training_sets_shares(name):
    model = build_model(model_config(*SMALL, 1, 0.0, model=name))
    set_output_prior(model, foreground_fraction=0.01, present_fraction=0.2)
    outputs, head = model.output_convolutions(), model.presence_linear()
    assert len(outputs) == 1 + DEEP_OUTPUTS.get(name, 0)
    assert all(convolution.out_channels == 1 for convolution in outputs)
    for convolution in outputs:
        torch.testing.assert_close(convolution.bias, torch.full((1,), log_odds(0.01)))
    torch.testing.assert_close(head.bias, torch.full((1,), log_odds(0.2)))
    with torch.no_grad():
        mask_logits, _ = model.eval()(torch.rand(2, 1, 32, 48))
    assert torch.sigmoid(mask_logits).mean() < 0.1  # not 0.5: nerve pixels are rare from the first step


@pytest.mark.parametrize("name", ["unet", "dynunet"])
def test_presence_of_two_signals_averages_the_head_and_the_largest_mask_probability(name):
    torch.manual_seed(1)
    head_only = build_model(model_config(*SMALL, 1, 0.0, model=name)).eval()
    both = build_model(model_config(*SMALL, 1, 0.0, model=name, presence_signal="head+mask")).eval()
    both.load_state_dict(head_only.state_dict())
    images = torch.rand(4, 1, 32, 48)
    with torch.no_grad():
        mask_logits, head_logits = head_only(images)
        same_masks, two_signal_logits = both(images)
        expected = (torch.sigmoid(head_logits) + torch.sigmoid(mask_logits).flatten(1).amax(1)) / 2
        torch.testing.assert_close(same_masks, mask_logits)
        torch.testing.assert_close(torch.sigmoid(two_signal_logits), expected)
        _, trained_logits = both.train()(images)[:2]  # training fits the head alone
    torch.testing.assert_close(trained_logits, head_logits)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"model": "resnet"}, "MODEL 'resnet' is not one of unet, unetplusplus"),
        ({"model": "efficientnet-lite0", "channels": (8, 16, 32, 64), "strides": (2, 2, 2)}, "exactly 5 levels"),
        ({"model": "unetplusplus", "channels": (8, 16, 32, 64), "strides": (2, 2, 2)}, "exactly 5 levels"),
        ({"model": "segresnet", "strides": (2, 2, 1, 2)}, "--strides must be all 2"),
        ({"strides": (2, 2)}, "--strides needs one value fewer than --channels"),
        ({"presence_signal": "mask"}, "PRESENCE_SIGNAL 'mask' is not one of head, head+mask"),
    ],
)
def test_a_network_that_cannot_be_built_is_refused_with_the_fix(arguments, message):
    channels, strides = arguments.pop("channels", SMALL[0]), arguments.pop("strides", SMALL[1])
    with pytest.raises(UserError, match=message.replace("+", r"\+")):
        model_config(channels, strides, 1, 0.0, **arguments)


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGER_EFFICIENTNETS)
def test_every_efficientnet_gives_masks_of_the_images_size(name):
    """MONAI pads each EfficientNet for its own image size (240 to 600, odd at some level); ours are padded for
    sides that stay even, and a side of 16 times an odd number comes back to its size through the decoder."""
    model = build_model(model_config(*SMALL, 1, 0.0, model=name)).eval()
    with torch.no_grad():
        for size in ((32, 48), (128, 176)):
            mask_logits, presence_logits = model(torch.rand(1, 1, *size))
            assert mask_logits.shape == (1, 1, *size) and presence_logits.shape == (1,)


def test_each_network_is_described_by_its_entry():
    assert describe_network(model_config(*SMALL, 2, 0.0)) == (
        "MONAI UNet with residual units; channels [8, 16, 32, 64, 128], strides [2, 2, 2, 2], residual units 2; "
        "with an image-level presence output")
    lite0 = model_config(*SMALL, 2, 0.0, model="efficientnet-lite0", encoder_weights="ImageNet: lite0.pth")
    assert describe_network(lite0) == (
        "MONAI FlexibleUNet, a U-Net decoder (CHANNELS, coarsest last) on the efficientnet-lite0 encoder; channels "
        "[8, 16, 32, 64, 128]; its encoder started from ImageNet weights (lite0.pth); with an image-level presence "
        "output")
    assert "random weights" in describe_network(model_config(*SMALL, 2, 0.0, model="efficientnet-b0"))
    assert all(entry.summary and entry.weights for entry in NETWORKS.values())
