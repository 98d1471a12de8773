"""Checkpoint readers (predict.py, train.py --resume): old formats still load, a checkpoint of another
architecture or image size is refused, one that would run code is refused and runs nothing."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nerveseg import checkpoint as checkpoint_module
from nerveseg.checkpoint import (
    ADDED_SETTINGS,
    ensemble_checkpoint,
    load_checkpoint,
    make_checkpoint,
    read_torch_file,
    save_torch,
    upgrade,
)
from nerveseg.errors import UserError
from nerveseg.model import build_model, model_config
from nerveseg.onnx_model import onnx_graph
from nerveseg.postprocess import PostProcessing
from tests.helpers import assert_user_error, run_script, tree_hashes, write_small_checkpoint
from tests.test_model import NETWORKS_TESTED

# %% Checkpoint readers (predict.py, train.py --resume)


@pytest.fixture
def small_checkpoint(tmp_path) -> Path:
    """A valid (untrained) checkpoint of a small network: enough for what is tested here."""
    path = write_small_checkpoint(tmp_path / "model.pt", metrics={"dice": 0.5},
                                  postprocessing=PostProcessing(presence_threshold=0.5).as_dict())
    load_checkpoint(path)
    return path


def test_a_checkpoint_from_before_the_presence_output_still_predicts(tmp_path):
    """Version 1 (a plain MONAI UNet, no presence rule) loads as a model without presence: nothing is emptied
    by presence, and the masks are those of its own rule."""
    from monai.networks.nets import UNet

    old_keys = ("presence", "model")  # neither existed then
    config = {key: value for key, value in model_config((4, 8), (2,), 0, 0.0).items() if key not in old_keys}
    old_model = UNet(**config)
    old = {
        "format": "nerveseg-unet",
        "version": 1,
        "model_config": config,
        "state_dict": old_model.state_dict(),
        "preprocessing": {"image_size": [32, 48]},
        "postprocessing": {"threshold": 0.5, "keep_largest": False, "min_area_fraction": 0.0},
        "settings": {},
        "epoch": 3,
        "metrics": {"dice": 0.5},
    }
    save_torch(tmp_path / "v1.pt", old)
    model, checkpoint = load_checkpoint(tmp_path / "v1.pt")
    images = torch.rand(2, 1, 32, 48)
    mask_logits, presence_logits = model(images)
    assert presence_logits is None and model.presence_head is None
    torch.testing.assert_close(mask_logits, old_model.eval()(images))
    assert PostProcessing(**checkpoint["postprocessing"]).presence_threshold == 0.0


def test_a_checkpoint_from_before_the_model_setting_loads_as_the_unet(tmp_path):
    """Version 3 before MODEL existed: a model_config without "model" is the UNet, its weights' names unchanged."""
    config = {key: value for key, value in model_config((4, 8), (2,), 0, 0.0).items() if key != "model"}
    old_model = build_model(config)
    checkpoint = make_checkpoint(old_model, model_config=config, preprocessing={"image_size": [32, 48]},
                                 postprocessing=PostProcessing(presence_threshold=0.5).as_dict(), settings={},
                                 epoch=2, metrics={"dice": 0.5})
    assert "presence_head.weight" in checkpoint["state_dict"] and "model" not in checkpoint["model_config"]
    save_torch(tmp_path / "v3.pt", checkpoint)
    model, _ = load_checkpoint(tmp_path / "v3.pt")
    assert type(model).__name__ == "PresenceUNet"
    images = torch.rand(2, 1, 32, 48)
    for mine, theirs in zip(model(images), old_model.eval()(images), strict=True):
        torch.testing.assert_close(mine, theirs)


def test_what_an_old_checkpoint_lacks_is_filled_in_once_at_load(tmp_path):
    """upgrade: a checkpoint of version 2 (no "tta", settings from before presence_weight, folds, model, ...) reads
    as today's, with the values that version worked with; today's fields are kept as they are."""
    config = {key: value for key, value in model_config((4, 8), (2,), 0, 0.0).items() if key != "model"}
    checkpoint = make_checkpoint(build_model(config), model_config=config, preprocessing={"image_size": [32, 48]},
                                 postprocessing=PostProcessing().as_dict(), settings={"scale": 0.2, "max_epochs": 9},
                                 epoch=2, metrics={"dice": 0.5}) | {"version": 2}
    save_torch(tmp_path / "v2.pt", checkpoint)
    _, loaded = load_checkpoint(tmp_path / "v2.pt")
    assert loaded["tta"] == {"use": False, "zoom": 0.1, "shift": 0.025, "flip": False}
    assert loaded["settings"] == {**ADDED_SETTINGS, "scale": 0.2, "max_epochs": 9}
    assert loaded["model_config"] == {**config, "model": "unet"}
    assert upgrade(upgrade(checkpoint)) == upgrade(checkpoint)
    assert upgrade({"model_config": {"presence": True}, "preprocessing": {}}) == {
        "model_config": {"model": "unet", "presence": True}, "preprocessing": {}}  # an export's metadata

@pytest.mark.parametrize("name", NETWORKS_TESTED)
def test_a_checkpoint_says_its_network_and_loads_it_alone_and_as_an_ensemble(name, tmp_path):
    config = model_config((8, 16, 32, 64, 128), (2, 2, 2, 2), 1, 0.0, model=name)
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(make_checkpoint(build_model(config), model_config=config,
                                       preprocessing={"image_size": [32, 48]},
                                       postprocessing=PostProcessing(presence_threshold=0.5).as_dict(), settings={},
                                       epoch=1, metrics={"dice": 0.5}))
    save_torch(tmp_path / "one.pt", members[0])
    save_torch(tmp_path / "two.pt", ensemble_checkpoint(members, postprocessing=PostProcessing().as_dict(),
                                                        tta={"use": False}, metrics={}))
    assert read_torch_file(tmp_path / "one.pt")["model_config"]["model"] == name
    images = torch.rand(2, 1, 32, 48)
    one, _ = load_checkpoint(tmp_path / "one.pt")
    ensemble, _ = load_checkpoint(tmp_path / "two.pt")
    with torch.no_grad():
        first = [build_model(config).eval() for _ in members]
        for model, member in zip(first, members, strict=True):
            model.load_state_dict(member["state_dict"])
        expected = [model(images) for model in first]
        torch.testing.assert_close(one(images)[0], expected[0][0])
        mean = (torch.sigmoid(expected[0][1]) + torch.sigmoid(expected[1][1])) / 2
        torch.testing.assert_close(torch.sigmoid(ensemble(images)[1]), mean)


def edit_checkpoint(path: Path, edit) -> Path:
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    edited = path.with_name("edited.pt")
    torch.save(checkpoint, edited)
    return edited


CHECKPOINT_EDITS = {
    "other channels": (
        lambda c: c["model_config"].update(channels=[8, 16]),
        "does not match the model it describes (Error(s) in loading state_dict for PresenceUNet:; size mismatch for "
        "model.0.conv.weight",
    ),
    "other depth": (lambda c: c["model_config"].update(channels=[4, 8, 16]), "the length of `strides` should equal"),
    "other outputs": (lambda c: c["model_config"].update(out_channels=2), "size mismatch"),
    "image size not a multiple": (
        lambda c: c["preprocessing"].update(image_size=[33, 48]),
        "its image size [33, 48] does not suit its network (height and width must be multiples of 2)",
    ),
    "image size zero": (lambda c: c["preprocessing"].update(image_size=[0, 48]), "must be multiples of 2"),
    "no preprocessing": (lambda c: c.pop("preprocessing"), "lacks preprocessing"),
    "a NaN threshold": (lambda c: c["postprocessing"].update(threshold=float("nan")),
                        "has an unusable post-processing rule (threshold must be a number from 0 to 1, not nan)"),
    "a text threshold": (lambda c: c["postprocessing"].update(presence_threshold="0.5"),
                         "(presence_threshold must be a number from 0 to 1, not '0.5')"),
    "a minimum area above 1": (lambda c: c["postprocessing"].update(min_area_fraction=2.0), "not 2.0"),
    "keep largest not a boolean": (lambda c: c["postprocessing"].update(keep_largest="no"),
                                   "keep_largest must be true or false, not 'no'"),
    "an unknown rule": (lambda c: c["postprocessing"].update(dilate=3), "expected the fields threshold, keep_largest"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_EDITS))
def test_a_checkpoint_of_another_architecture_or_image_size_is_refused(case, small_checkpoint):
    edit, message = CHECKPOINT_EDITS[case]
    edited = edit_checkpoint(small_checkpoint, edit)
    before = edited.read_bytes()
    with pytest.raises(UserError) as caught:
        load_checkpoint(edited)
    assert message in str(caught.value) and str(edited) in str(caught.value)
    assert "edited" in str(caught.value) and "train.py" in str(caught.value)
    assert edited.read_bytes() == before


class RunsCode:
    """Unpickling this creates the file `marker`: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(small_checkpoint, tmp_path):
    def malicious(marker: Path, name: str) -> Path:
        return edit_checkpoint(small_checkpoint, lambda c: c.update(payload=RunsCode(marker))).rename(tmp_path / name)

    control = malicious(tmp_path / "control-marker", "control.pt")
    torch.load(control, weights_only=False)  # an unsafe load runs the payload: the test file is really malicious
    assert (tmp_path / "control-marker").exists()
    marker = tmp_path / "marker"
    evil = malicious(marker, "evil.pt")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(images / "1.png")
    before = tree_hashes(tmp_path)
    refusal = "holds Python objects that safe loading refuses (weights_only=True, it refers to io.open), so it"
    result = run_script(
        "predict.py",
        *("--checkpoint", str(evil), "--input", str(images), "--output", str(tmp_path / "out"), "--quiet"),
        cwd=tmp_path,
    )
    assert_user_error(result, f"{evil} {refusal}", "nothing in it was run", "Only use checkpoints written by train.py")
    run = tmp_path / "runs" / "evil"  # train.py --resume reads last.pt with the same reader
    run.mkdir(parents=True)
    shutil.copyfile(evil, run / "last.pt")
    with pytest.raises(UserError, match=re.escape(refusal)):
        read_torch_file(run / "last.pt")
    shutil.rmtree(tmp_path / "runs")
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert tree_hashes(tmp_path) == before and not (tmp_path / "out").exists()


def test_a_checkpoint_path_that_is_a_folder_an_onnx_model_or_a_resume_state_says_what_to_pass(small_checkpoint,
                                                                                                tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    with pytest.raises(UserError, match=f"{re.escape(str(run))} is a folder, not a checkpoint; pass the file .a run's"):
        load_checkpoint(run)
    shutil.copyfile(small_checkpoint, run / "best.pt")
    with pytest.raises(UserError, match=f"is a folder, not a checkpoint; pass the file: {re.escape(str(run))}/best.pt"):
        load_checkpoint(run)
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"\x08\x07 an ONNX protobuf")
    with pytest.raises(UserError, match="model.onnx is already an ONNX model .export.py wrote it.: predict with it"):
        load_checkpoint(onnx_file)
    torch.save({"model": {}, "optimizer": {}, "epoch": 2, "history": [], "settings": {"model_path": "published.pt"}},
               run / "last.pt")
    with pytest.raises(UserError) as caught:
        load_checkpoint(run / "last.pt")
    assert str(caught.value) == (f"{run / 'last.pt'} is a training run's state for --resume (last.pt), not a model; "
                                 f"predict with the run's best model {run / 'best.pt'} or the published published.pt")


# %% A checkpoint is data: what it may ask for is bounded, and checked before any network is built

ASKING_TOO_MUCH = {  # an edit of the small checkpoint, and the refusal
    "a huge image size": (lambda c: c["preprocessing"].update(image_size=[16000, 16000]),
                          "asks for a network beyond what it may (an input of 16000x16000 with channels [4, 8] holds "
                          "2,048 million feature values per image, above the bound of 67 million"),
    "a large channel count": (lambda c: c["model_config"].update(channels=[4, 4096]),
                              "does not match the model it describes (Error(s) in loading state_dict for "
                              "PresenceUNet:; size mismatch for "),
    "a channel count past the bound": (lambda c: c["model_config"].update(channels=[4, 12288]),
                                       "channels must be 2 to 10 whole numbers from 1 to 4096, not [4, 12288]"),
    "too many levels": (lambda c: c["model_config"].update(channels=[4] * 1000, strides=[1] * 999),
                        "channels must be 2 to 10 whole numbers"),
    "residual units past the bound": (lambda c: c["model_config"].update(num_res_units=10**6),
                                      "num_res_units from 0 to 16, not 1, 1, 1000000"),
    "a text channel count": (lambda c: c["model_config"].update(channels=[4, "8"]), "not [4, '8']"),
    "settings of another kind": (lambda c: c.update(model_config=[4, 8]),
                                 "its model_config is a list, not a record of names and values"),
}


@pytest.mark.parametrize("case", sorted(ASKING_TOO_MUCH))
def test_a_checkpoint_that_asks_for_too_much_is_refused_before_any_network_is_built(case, small_checkpoint,
                                                                                    monkeypatch):
    edit, message = ASKING_TOO_MUCH[case]
    edited = edit_checkpoint(small_checkpoint, edit)
    built_on = []  # the device of each network built: "meta" holds shapes only, no memory

    def build(config):
        built_on.append(torch.get_default_device().type)
        return build_model(config)

    monkeypatch.setattr(checkpoint_module, "build_model", build)
    with pytest.raises(UserError) as caught:
        load_checkpoint(edited)
    assert message in str(caught.value) and str(edited) in str(caught.value)
    assert "edited" in str(caught.value) and "train.py" in str(caught.value)
    assert set(built_on) <= {"meta"}, "a network was built before the checkpoint was checked"
    load_checkpoint(small_checkpoint)
    assert built_on[-2:] == ["meta", "cpu"]  # a sound checkpoint: compared, then built


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_weights_that_are_not_numbers_is_refused(value, small_checkpoint):
    edited = edit_checkpoint(small_checkpoint, lambda c: c["state_dict"]["model.0.conv.weight"].view(-1)
                             .__setitem__(3, value))
    with pytest.raises(UserError, match=re.escape(
            f"{edited} holds weights that are not numbers (NaN or infinite, in model.0.conv.weight): the training "
            "that wrote it diverged, or the file was damaged. Use another checkpoint")):
        load_checkpoint(edited)



@pytest.mark.parametrize("record", ["settings", "metrics", "postprocessing", "preprocessing", "model_config"])
def test_a_checkpoint_whose_record_is_not_a_dict_is_refused_at_load(record, small_checkpoint):
    checkpoint = torch.load(small_checkpoint, weights_only=True)
    checkpoint[record] = [1, 2]
    save_torch(small_checkpoint, checkpoint)
    with pytest.raises(UserError, match=f"model.pt: its {record} is a list, not a record of names and values; it "
                                        "was damaged or edited: use the file train.py wrote"):
        load_checkpoint(small_checkpoint)


def test_an_onnx_model_renamed_pt_is_said_to_be_one(tmp_path):
    config = model_config((4, 8), (2,), 0, 0.0)
    (tmp_path / "model.pt").write_bytes(onnx_graph(build_model(config).eval(), (32, 48), has_presence=True))
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'model.pt'} is an ONNX model (as export.py writes), "
                                                  "named like a checkpoint: rename it to model.onnx")):
        read_torch_file(tmp_path / "model.pt")
    (tmp_path / "other.pt").write_bytes(b"\x08\x07 not much of anything")
    with pytest.raises(UserError, match="other.pt is not a readable checkpoint|other.pt holds Python objects"):
        read_torch_file(tmp_path / "other.pt")
