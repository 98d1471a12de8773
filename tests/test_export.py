"""export.py and ONNX Runtime in predict.py."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from nerveseg.checkpoint import FORMAT, VERSION, ensemble_checkpoint, load_checkpoint, make_checkpoint, save_torch
from nerveseg.errors import UserError
from nerveseg.files import FolderLock
from nerveseg.model import build_model, model_config, set_output_prior
from nerveseg.onnx_model import METADATA_KEY, add_metadata, onnx_graph
from nerveseg.postprocess import PostProcessing
from nerveseg.predictors import (
    ONNX_TOLERANCE,
    OnnxPredictor,
    TorchPredictor,
    check_onnx_matches_torch,
    choose_engine,
    import_onnxruntime,
    load_onnx,
)
from nerveseg.settings import script_defaults
from tests.helpers import (
    KAGGLE_SAMPLE,
    ROOT,
    assert_user_error,
    needs_kaggle_sample,
    run_script,
    write_small_checkpoint,
)


@pytest.fixture(scope="module")
def exported(trained_run, train_clean, tmp_path_factory) -> tuple:
    """trained_run's model exported to ONNX (checked on the clean test images)."""
    work = tmp_path_factory.mktemp("export")
    result = run_script("export.py", "--checkpoint", str(trained_run / "2D_Nerve_Segmentation.pt"), "--output",
                        "model.onnx", "--check-input", str(train_clean / "test"), cwd=work)
    assert result.returncode == 0, result.stderr
    return work / "model.onnx", result


@pytest.mark.slow
def test_export_writes_a_graph_with_its_metadata_that_matches_pytorch(exported, trained_run):
    path, result = exported
    assert "ONNX Runtime matches PyTorch within" in result.stdout and "on 6 images of" in result.stdout
    onnx_predictor, metadata = load_onnx(path)
    model, checkpoint = load_checkpoint(trained_run / "2D_Nerve_Segmentation.pt")
    for field in ("preprocessing", "postprocessing", "model_config", "epoch"):
        assert metadata[field] == json.loads(json.dumps(checkpoint[field])), field
    assert metadata["preprocessing"]["image_size"] == [64, 96]
    torch_predictor = TorchPredictor(model, torch.device("cpu"), amp=False)
    assert onnx_predictor.has_presence
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 3):  # the batch size is free
        images = torch.randint(0, 256, (batch, 1, 64, 96), dtype=torch.uint8, generator=generator)
        (onnx_masks, onnx_presence), (torch_masks, torch_presence) = onnx_predictor(images), torch_predictor(images)
        assert onnx_masks.shape == (batch, 1, 64, 96) and len(onnx_presence) == batch
        assert torch.allclose(onnx_masks, torch_masks, atol=1e-4)
        assert np.allclose(onnx_presence, torch_presence, atol=1e-4)


@pytest.mark.slow
def test_predict_with_the_onnx_model_writes_the_same_masks(exported, trained_run, train_clean, tmp_path):
    path, _ = exported
    outputs = {}
    for name, model, engine in (("pt", trained_run / "2D_Nerve_Segmentation.pt", "auto"), ("onnx", path, "auto"),
                                ("pt-onnxruntime", trained_run / "2D_Nerve_Segmentation.pt", "onnxruntime")):
        result = run_script("predict.py", "--checkpoint", str(model), "--input", str(train_clean / "test"), "--output",
                            name, "--engine", engine, "--quiet", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert ("ONNX Runtime" if name != "pt" else "PyTorch") in result.stdout
        outputs[name] = (tmp_path / name / "submission.csv").read_text()
    assert outputs["pt"] == outputs["onnx"] == outputs["pt-onnxruntime"] and outputs["pt"].count("\n") == 7


@pytest.mark.slow
@needs_kaggle_sample
def test_the_onnx_model_gives_the_same_masks_on_the_real_images(exported, trained_run, tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    for image in sorted(KAGGLE_SAMPLE.glob("train/*.tif")):
        if not image.stem.endswith("_mask"):
            shutil.copy(image, folder / image.name)
    submissions = []
    for model in (trained_run / "2D_Nerve_Segmentation.pt", exported[0]):
        result = run_script("predict.py", "--checkpoint", str(model), "--input", str(folder), "--output",
                            model.suffix[1:], "--submission", "true", "--quiet", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        submissions.append((tmp_path / model.suffix[1:] / "submission.csv").read_text())
    assert submissions[0] == submissions[1]


@pytest.mark.slow
def test_another_network_exports_and_predicts_alone_as_an_ensemble_and_with_tta(train_clean, tmp_path):
    """A DynUNet (deep supervision, presence head): its ensemble with test-time augmentation exports to ONNX and
    predicts the same masks as its checkpoint; predict.py runs its single fold too."""
    config = model_config((8, 16, 32, 64), (2, 2, 2), 1, 0.0, model="dynunet")
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(config)
        set_output_prior(model, foreground_fraction=0.3, present_fraction=0.6)  # untrained, but some masks drawn
        members.append(make_checkpoint(model, model_config=config, preprocessing={"image_size": [64, 96]},
                                       postprocessing={}, settings={}, epoch=1, metrics={}))
    tta = {"use": True, "zoom": 0.05, "shift": 0.025, "flip": False}
    rule = PostProcessing(presence_threshold=0.5).as_dict()
    save_torch(tmp_path / "dyn.pt", ensemble_checkpoint(members, postprocessing=rule, tta=tta, metrics={}))
    result = run_script("export.py", "--checkpoint", "dyn.pt", "--output", "dyn.onnx", "--check-input",
                        str(train_clean / "test"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ONNX Runtime matches PyTorch" in result.stdout and "with the presence output" in result.stdout
    submissions = {}
    for name, model, *fold in (("pt", "dyn.pt"), ("onnx", "dyn.onnx"), ("fold", "dyn.pt", "--fold", "2")):
        result = run_script("predict.py", "--checkpoint", model, "--input", str(train_clean / "test"), "--output",
                            name, "--submission", "true", "--quiet", *fold, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        submissions[name] = (tmp_path / name / "submission.csv").read_text()
    assert submissions["pt"] == submissions["onnx"] and submissions["pt"].count("\n") == 7
    assert submissions["fold"].count("\n") == 7


def foreign_model() -> bytes:
    """A valid ONNX graph of another kind (x -> y, the identity)."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph).SerializeToString()


@pytest.mark.slow
def test_a_corrupt_foreign_or_bare_onnx_file_is_refused_with_a_message(exported, train_clean, tmp_path):
    graph = exported[0].read_bytes()
    bare = onnx.load_from_string(graph)
    del bare.metadata_props[:]
    cases = {
        "truncated.onnx": (graph[: len(graph) // 2], "is not an ONNX model that ONNX Runtime can run"),
        "foreign.onnx": (foreign_model(), "is an ONNX model of another kind"),
        "bare.onnx": (bare.SerializeToString(), "was not written by export.py"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        result = run_script("predict.py", "--checkpoint", name, "--input", str(train_clean / "test"), "--quiet",
                            cwd=tmp_path)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, name
    assert not (tmp_path / "predictions").exists()
    assert METADATA_KEY in {entry.key for entry in onnx.load_from_string(graph).metadata_props}


def test_without_onnxruntime_an_onnx_model_gets_a_message_that_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an import of a missing package raises
    with pytest.raises(UserError, match="pip install onnxruntime"):
        import_onnxruntime()


def test_one_check_of_onnx_runtime_against_pytorch_with_one_tolerance():
    """export.py and predict.py --engine onnxruntime share check_onnx_matches_torch and its ONNX_TOLERANCE."""
    assert script_defaults(ROOT / "export.py")["TOLERANCE"] == ONNX_TOLERANCE
    config = model_config((4, 8), (2,), 0, 0.0)
    model, other = build_model(config).eval(), build_model(config).eval()
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.1)
    onnx_predictor = OnnxPredictor(onnx_graph(model, (32, 48), has_presence=True), "model.onnx")
    images = torch.randint(0, 256, (2, 1, 32, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    same = TorchPredictor(model, torch.device("cpu"), amp=False)
    assert 0 <= check_onnx_matches_torch(onnx_predictor, same, images, what="on 2 images") <= ONNX_TOLERANCE
    with pytest.raises(UserError, match=r"differ from PyTorch's by .* \(more than 0.0001\) on 2 images; stop"):
        check_onnx_matches_torch(onnx_predictor, TorchPredictor(other, torch.device("cpu"), amp=False), images,
                                 what="on 2 images; stop")


def test_auto_runs_an_imagenet_encoders_checkpoint_with_onnx_runtime_on_the_cpu_only():
    """--engine auto: ONNX Runtime for a .pt of an ImageNet encoder on the CPU (3 times PyTorch's speed there),
    PyTorch for one trained from scratch and on a GPU; an engine asked for is the one used."""
    lite0 = model_config((8, 16, 32, 64, 128), (2, 2, 2, 2), 2, 0.0, model="efficientnet-lite0")
    unet = model_config((4, 8), (2,), 0, 0.0)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert choose_engine("auto", lite0, cpu) == "onnxruntime"
    assert choose_engine("auto", lite0, gpu) == choose_engine("auto", unet, cpu) == "torch"
    assert choose_engine("torch", lite0, cpu) == "torch" and choose_engine("onnxruntime", unet, cpu) == "onnxruntime"


@pytest.mark.slow
def test_export_refuses_to_write_a_model_that_does_not_match(trained_run, tmp_path):
    result = run_script("export.py", "--checkpoint", str(trained_run / "2D_Nerve_Segmentation.pt"), "--output",
                        "model.onnx", "--tolerance", "1e-12", cwd=tmp_path)
    assert result.returncode == 1 and "differ from PyTorch's by" in result.stderr
    assert "random images" in result.stderr and not (tmp_path / "model.onnx").exists()
    assert not list(tmp_path.iterdir())  # no temporary file left either


@pytest.mark.slow
def test_export_help_and_bad_settings(tmp_path):
    assert "--tolerance" in run_script("export.py", "-h", cwd=tmp_path).stdout
    result = run_script("export.py", "--output", "model.pt", cwd=tmp_path)
    assert result.returncode == 1 and "must be a .onnx file" in result.stderr
    missing = run_script("export.py", cwd=tmp_path)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_an_onnx_model_whose_metadata_was_copied_from_another_is_refused_on_load(tmp_path):
    """Not ONNX Runtime's traceback mid-run: the graph's image size and outputs are checked against the metadata."""
    config = model_config((4, 8), (2,), 0, 0.0)
    graph = onnx_graph(build_model(config).eval(), (32, 48), has_presence=True)
    metadata = {"format": FORMAT, "version": VERSION, "model_config": config, "preprocessing": {"image_size": [32, 48]},
                "postprocessing": PostProcessing().as_dict(), "epoch": 1, "metrics": {}}
    cases = {
        "other size": ({"preprocessing": {"image_size": [64, 96]}}, "its graph takes images 1x32x48, with a presence "
                       "output, but its metadata describes images 1x64x96, with a presence output: the metadata was "
                       "copied from another model. Export the model again with python export.py"),
        "no presence": ({"model_config": config | {"presence": False}}, "describes images 1x32x48, without a presence"),
        "nan threshold": ({"postprocessing": {"threshold": float("nan")}}, "unusable post-processing rule (threshold"),
        "a huge image size": ({"preprocessing": {"image_size": [16000, 16000]}}, "asks for a network beyond what it "
                              "may (an input of 16000x16000 with channels [4, 8] holds 2,048 million feature values"),
    }
    for name, (changed, message) in cases.items():
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(add_metadata(graph, metadata | changed))
        with pytest.raises(UserError) as caught:
            load_onnx(path)
        assert str(caught.value).startswith(str(path)) and message in str(caught.value), name
    (tmp_path / "right.onnx").write_bytes(add_metadata(graph, metadata))
    assert load_onnx(tmp_path / "right.onnx")[1]["preprocessing"] == {"image_size": [32, 48]}


@pytest.mark.slow
def test_export_of_an_onnx_model_says_it_is_one_already(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07 an ONNX protobuf")
    result = run_script("export.py", "--checkpoint", "model.onnx", "--output", "again.onnx", cwd=tmp_path)
    assert_user_error(result, "model.onnx is already an ONNX model (export.py wrote it): predict with it (python "
                      "predict.py --checkpoint model.onnx); to export again, pass the .pt checkpoint")


@pytest.mark.slow
def test_unreadable_check_images_are_skipped_and_an_empty_folder_names_check_input(trained_run, train_clean, tmp_path):
    folder = tmp_path / "check"
    folder.mkdir()
    for path in sorted((train_clean / "test").glob("*.tif"))[:2]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.png").write_text("not an image")
    os.mkfifo(folder / "scan.png")
    model = ["--checkpoint", str(trained_run / "2D_Nerve_Segmentation.pt")]
    result = run_script("export.py", *model, "--output", "model.onnx", "--check-input", str(folder), cwd=tmp_path,
                        timeout=300)
    assert result.returncode == 0 and "on 2 images of" in result.stdout, result.stderr
    assert f"skipped {folder / 'broken.png'}: not an image" in result.stderr and "Traceback" not in result.stderr
    assert f"skipped {folder / 'scan.png'}: a named pipe" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = run_script("export.py", *model, "--output", "other.onnx", "--check-input", str(empty), cwd=tmp_path)
    assert refused.returncode == 1 and "pass --check-input with a folder of images" in refused.stderr
    assert "--input" not in refused.stderr.replace("--check-input", "") and not (tmp_path / "other.onnx").exists()


# %% Never over a user's file, one run at a time, and what a killed export left is tidied


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """An untrained checkpoint of a small network: export.py runs in seconds with it."""
    return write_small_checkpoint(tmp_path_factory.mktemp("small-model") / "model.pt")


def left_by_a_killed_run(path: Path, *, folder: bool) -> Path:
    """What a kill -9 leaves: a work file or folder that no process locks any more, written a while ago."""
    path.mkdir() if folder else path.write_bytes(b"half of it")
    os.utime(path, (0, 0))
    return path


@pytest.mark.slow
def test_an_onnx_export_never_replaces_a_file_it_did_not_write_and_tidies_what_a_kill_left(small_checkpoint,
                                                                                           tmp_path):
    model = ["--checkpoint", str(small_checkpoint)]
    (tmp_path / "mine.onnx").write_bytes(b"my own model")
    config = model_config((4, 8), (2,), 0, 0.0)
    (tmp_path / "foreign.onnx").write_bytes(onnx_graph(build_model(config).eval(), (32, 48), has_presence=True))
    for name in ("mine.onnx", "foreign.onnx"):  # any file, an ONNX model without our metadata too
        before = (tmp_path / name).read_bytes()
        result = run_script("export.py", *model, "--output", name, cwd=tmp_path)
        assert_user_error(result, f"--output {name} is a file that export.py did not write, and the export would "
                          "replace it; choose another --output (a new file, or an ONNX model export.py wrote)")
        assert (tmp_path / name).read_bytes() == before
    left = left_by_a_killed_run(tmp_path / ".model.onnx.abcd1234.tmp", folder=False)
    for _ in range(2):  # a new file, then one export.py wrote
        result = run_script("export.py", *model, "--output", "model.onnx", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert not left.exists() and load_onnx(tmp_path / "model.onnx")[1]["epoch"] == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["foreign.onnx", "mine.onnx", "model.onnx"]


@pytest.mark.slow
def test_a_second_bundle_export_into_one_folder_is_refused_at_once_and_a_kills_leftovers_tidied(small_checkpoint,
                                                                                                 tmp_path):
    bundle = ["export.py", "--checkpoint", str(small_checkpoint), "--format", "bundle", "--output", "bundle"]
    first = FolderLock(tmp_path / "bundle", script="export.py")  # a first export, still at work
    refused = run_script(*bundle, cwd=tmp_path)
    assert_user_error(refused, f"bundle is being written by another export.py run (process {os.getpid()}); wait "
                      "for it to end, or choose another --output")
    assert not (tmp_path / "bundle").exists()
    first.release()
    left = left_by_a_killed_run(tmp_path / ".bundle.building-abcd1234", folder=True)
    result = run_script(*bundle, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not left.exists() and sorted(path.name for path in tmp_path.iterdir()) == ["bundle"]
