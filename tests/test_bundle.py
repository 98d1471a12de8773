"""export.py --format bundle: a MONAI Bundle that stock MONAI runs (python -m monai.bundle run) to the masks predict.py
writes, pixel for pixel, with no part of this project importable; its metadata passes MONAI's schema check."""

import hashlib
import importlib.util
import json
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out
from PIL import Image
from torch import nn

from nerveseg.checkpoint import ensemble_checkpoint, make_checkpoint, save_torch
from nerveseg.errors import UserError
from nerveseg.export.bundle import BundleNetwork, check_target, trace_network
from nerveseg.export.bundle_docs import license_text
from nerveseg.export.bundle_script import bundle_script
from nerveseg.inputs import images_to_segment
from nerveseg.model import build_model, model_config, set_output_prior
from nerveseg.postprocess import PostProcessing
from nerveseg.predictors import TorchPredictor, prediction_model
from nerveseg.transforms import load_transforms
from tests.helpers import KAGGLE_SAMPLE, assert_user_error, needs_kaggle_sample, run_script, tree_hashes

SCHEMA = Path(__file__).parent / "data" / "meta_schema_20240725.json"  # MONAI's, as the model zoo's bundles name it
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"
# What `pip install torch monai pillow fire scikit-image` puts into a fresh environment (import names), and nothing else
FRESH_ENVIRONMENT = ("torch", "torchgen", "typing_extensions", "filelock", "fsspec", "sympy", "mpmath", "networkx",
                     "jinja2", "markupsafe", "numpy", "monai", "PIL", "fire", "termcolor", "skimage", "scipy",
                     "lazy_loader", "packaging", "imageio", "tifffile")
IMAGE_SIZE = [32, 48]


# %% Images of every kind predict.py reads, and tiny checkpoints


def smooth_noise(generator: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An 8-bit image of soft blobs, so that an untrained network's masks hold components of many sizes."""
    coarse = (generator.random((height // 8 + 2, width // 8 + 2)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """TIFF (Kaggle's 580x420), PNG, JPEG, BMP; grayscale, RGB, RGBA and 16-bit; in a subfolder too; a truth mask."""
    folder = tmp_path_factory.mktemp("bundle-images") / "images"
    (folder / "scans").mkdir(parents=True)
    generator = np.random.default_rng(7)
    Image.fromarray(smooth_noise(generator, 420, 580)).save(folder / "1.tif", compression="tiff_lzw")
    Image.fromarray(smooth_noise(generator, 100, 150)).save(folder / "scans" / "b.png")
    Image.fromarray(smooth_noise(generator, 100, 150)).save(folder / "scans" / "b_mask.png")  # a truth: not segmented
    Image.fromarray(np.stack([smooth_noise(generator, 90, 70)] * 3, -1)).save(folder / "c.jpg", quality=90)
    Image.fromarray(np.stack([smooth_noise(generator, 64, 64) for _ in range(3)], -1)).save(folder / "scans" / "d.bmp")
    Image.fromarray(np.stack([smooth_noise(generator, 60, 80) for _ in range(4)], -1), "RGBA").save(folder / "e.png")
    Image.fromarray(smooth_noise(generator, 50, 77).astype(np.uint16) * 200).save(folder / "wide.png")  # I;16
    for number in range(6):
        Image.fromarray(smooth_noise(generator, 130 + number, 200 - number)).save(folder / f"n{number}.png")
    return folder


def median_presence(path: Path, folder: Path) -> float:
    """The median presence probability of the images, under predict.py's reading: a presence threshold that empties
    about half of the masks (and keeps the median image's exactly at the threshold)."""
    model, checkpoint = prediction_model(path, torch.device("cpu"), fold=0, tta="auto")
    transform = load_transforms(checkpoint["preprocessing"]["image_size"], with_label=False)
    batch = torch.stack([transform(item)["image"] for item in images_to_segment(folder, "_mask")])
    presences = sorted(TorchPredictor(model, torch.device("cpu"), amp=False)(batch)[1])
    return presences[len(presences) // 2]


@pytest.fixture(scope="module")
def checkpoints(images, tmp_path_factory) -> dict[str, Path]:
    """Untrained tiny checkpoints: one model (largest component, minimum area), a 2-fold ensemble with test-time
    augmentation and a network on an ImageNet encoder (efficientnet-lite0); each with a presence threshold at
    their images' median presence."""
    folder = tmp_path_factory.mktemp("bundle-checkpoints")
    torch.manual_seed(0)
    config = model_config((4, 8), (2,), 0, 0.0)

    def checkpoint(post: PostProcessing) -> dict:
        return make_checkpoint(build_model(config), model_config=config, preprocessing={"image_size": IMAGE_SIZE},
                               postprocessing=post.as_dict(), settings={"max_epochs": 1}, epoch=1,
                               metrics={"postprocessed": {"dice": 0.61, "all_empty_baseline": 0.42, "images": 9,
                                                         "images_empty": 4}})

    single_rule = PostProcessing(threshold=0.5, keep_largest=True, min_area_fraction=0.002)
    members = [checkpoint(single_rule) for _ in range(2)]
    summary = {"folds": [{}, {}], "mean": {"postprocessed": {"dice": 0.7}}, "sd": {"postprocessed": {"dice": 0.05}},
               "pooled": {"postprocessed": {"dice": 0.69, "all_empty_baseline": 0.55, "images": 12, "images_empty": 7}}}
    paths = {"single": folder / "single.pt", "ensemble": folder / "ensemble.pt", "encoder": folder / "encoder.pt"}
    save_torch(paths["single"], members[0])
    encoder_config = model_config((8, 16, 32, 64, 128), (2, 2, 2, 2), 0, 0.0, model="efficientnet-lite0")
    encoder_model = build_model(encoder_config)  # an ImageNet encoder's network (random weights: the same code)
    set_output_prior(encoder_model, foreground_fraction=0.5, present_fraction=0.5)  # untrained, but masks drawn
    save_torch(paths["encoder"], make_checkpoint(
        encoder_model, model_config=encoder_config, preprocessing={"image_size": IMAGE_SIZE},
        postprocessing=single_rule.as_dict(), settings={"max_epochs": 1}, epoch=1, metrics={}))
    save_torch(paths["ensemble"], ensemble_checkpoint(
        members, postprocessing=PostProcessing(threshold=0.45).as_dict(),
        tta={"use": True, "zoom": 0.05, "shift": 0.025, "flip": True}, metrics={"cross_validation": summary}))
    for name, rule in (("single", single_rule), ("ensemble", PostProcessing(threshold=0.45)), ("encoder", single_rule)):
        saved = torch.load(paths[name], weights_only=True)
        saved["postprocessing"] = (rule.as_dict() | {"presence_threshold": median_presence(paths[name], images)})
        save_torch(paths[name], saved)
    return paths


@pytest.fixture(scope="module")
def bundles(checkpoints, images, tmp_path_factory) -> dict[str, Path]:
    """Each checkpoint exported with export.py --format bundle (checked on the images)."""
    work = tmp_path_factory.mktemp("bundles")
    for name, path in checkpoints.items():
        result = run_script("export.py", "--checkpoint", str(path), "--format", "bundle", "--output", name,
                            "--check-input", str(images), "--authors", "Test Lab", "--license", "MIT", cwd=work)
        assert result.returncode == 0, result.stderr
        assert f"wrote the MONAI Bundle {name}" in result.stdout and "monai.bundle run" in result.stdout
    return {name: work / name for name in checkpoints}


# %% Stock MONAI, in an environment that holds nothing but MONAI, torch, Pillow, fire and scikit-image


@pytest.fixture(scope="module")
def fresh_environment(tmp_path_factory) -> Path:
    """A folder of links to FRESH_ENVIRONMENT's packages (those installed here), and to nothing of this project."""
    folder = tmp_path_factory.mktemp("fresh-environment")
    for name in FRESH_ENVIRONMENT:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue  # an optional dependency that is not installed here
        origin = Path(spec.origin)
        package = origin.parent if origin.name == "__init__.py" else origin
        (folder / package.name).symlink_to(package)
        for libraries in package.parent.glob(f"{package.name.lower()}*.libs"):  # wheels' shared libraries
            if not (folder / libraries.name).exists():
                (folder / libraries.name).symlink_to(libraries)
    return folder


def run_bundle(bundle: Path, images: Path, output: Path, environment: Path, *arguments: str) -> str:
    """`python -m monai.bundle run --config_file <bundle>/configs/inference.json --dataset_dir <images> --output_dir
    <output>` in an isolated Python (-I -S: no site-packages, no PYTHONPATH) that sees only `environment`, started
    from another folder; it first checks that this project's package cannot be imported. Returns its output."""
    code = ("import importlib.util, runpy, sys; sys.path.append(sys.argv.pop(1)); "
            "assert importlib.util.find_spec('nerveseg') is None, 'nerveseg is importable'; "
            "sys.argv[0] = 'monai.bundle'; runpy.run_module('monai.bundle', run_name='__main__', alter_sys=True)")
    command = [sys.executable, "-I", "-S", "-c", code, str(environment), "run", "--config_file",
               str(bundle / "configs" / "inference.json"), "--dataset_dir", str(images), "--output_dir", str(output),
               *arguments]
    result = subprocess.run(command, cwd=output.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def masks_of(folder: Path) -> dict[str, np.ndarray]:
    """Every PNG below a folder, by its path below it."""
    return {path.relative_to(folder).as_posix(): np.asarray(Image.open(path)) for path in sorted(folder.rglob("*.png"))}


def assert_same_masks(predicted: Path, bundled: Path) -> dict[str, np.ndarray]:
    """The same mask files, pixel for pixel; returns them."""
    expected, found = masks_of(predicted), masks_of(bundled)
    assert sorted(found) == sorted(expected)
    for name, mask in expected.items():
        assert found[name].shape == mask.shape and found[name].dtype == np.uint8, name
        assert np.array_equal(found[name], mask), f"{name}: {np.count_nonzero(found[name] != mask)} pixels differ"
    return expected


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["single", "ensemble", "encoder"])
def test_stock_monai_runs_the_bundle_to_predict_pys_masks_pixel_for_pixel(kind, bundles, checkpoints, images,
                                                                           fresh_environment, tmp_path):
    stdout = run_bundle(bundles[kind], images, tmp_path / "bundled", fresh_environment)
    assert "segmenting 12 images" in stdout
    result = run_script("predict.py", "--checkpoint", str(checkpoints[kind]), "--input", str(images), "--output",
                        "predicted", "--pictures", "pictures", "--quiet", "--engine", "torch", cwd=tmp_path)
    assert result.returncode == 0, result.stderr  # PyTorch, as the bundle (auto: ONNX Runtime for an encoder's)
    masks = assert_same_masks(tmp_path / "predicted" / "masks", tmp_path / "bundled")
    assert len(masks) == 12 and "scans/b.png" in masks and "scans/b_mask.png" not in masks
    assert masks["1.png"].shape == (420, 580) and masks["wide.png"].shape == (50, 77)
    empty = [name for name, mask in masks.items() if not mask.any()]
    if kind != "encoder":  # an untrained encoder network's presence is about the same for every image
        assert 2 <= len(empty) <= 9, empty  # the presence rule emptied some, and not all
    assert all(set(np.unique(mask)) <= {0, 255} for mask in masks.values())


@pytest.mark.slow
def test_a_smaller_batch_and_a_changed_rule_on_the_command_line(bundles, checkpoints, images, fresh_environment,
                                                                 tmp_path):
    run_bundle(bundles["single"], images, tmp_path / "bundled", fresh_environment, "--batch_size", "5",
               "--presence_threshold", "0", "--threshold", "0.55")
    result = run_script("predict.py", "--checkpoint", str(checkpoints["single"]), "--input", str(images), "--output",
                        "default", "--pictures", "pictures", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    changed, default = masks_of(tmp_path / "bundled"), masks_of(tmp_path / "default" / "masks")
    assert sum(mask.any() for mask in changed.values()) > sum(mask.any() for mask in default.values())


@pytest.mark.slow
@needs_kaggle_sample
def test_stock_monai_gives_predict_pys_masks_on_the_real_images(bundles, checkpoints, fresh_environment, tmp_path):
    folder = KAGGLE_SAMPLE / "train"  # 55 images and their truth masks, read in place
    assert "segmenting 55 images" in run_bundle(bundles["single"], folder, tmp_path / "bundled", fresh_environment)
    result = run_script("predict.py", "--checkpoint", str(checkpoints["single"]), "--input", str(folder), "--output",
                        "predicted", "--pictures", "pictures", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    masks = assert_same_masks(tmp_path / "predicted" / "masks", tmp_path / "bundled")
    assert len(masks) == 55 and any(mask.any() for mask in masks.values())


@pytest.mark.slow
def test_the_bundle_reads_the_images_predict_py_reads_in_its_order(bundles, images, tmp_path):
    folder = tmp_path / "order"
    shutil.copytree(images, folder)
    for name in ("2_10.png", "2_9.tif", "10.png", "sub/1_2.jpg", "sub/1_2_mask.png", ".hidden.png"):
        (folder / name).parent.mkdir(exist_ok=True)
        shutil.copy(images / "n0.png", folder / name)
    expected = [item["image"] for item in images_to_segment(folder, "_mask")]
    assert bundle_datalist(bundles["single"], folder) == expected and len(expected) == 16


def bundle_datalist(bundle: Path, folder: Path) -> list[str]:
    """The images the bundle would segment in `folder`, in its order."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["dataset_dir"], parser["bundle_root"] = str(folder), str(bundle)  # as `monai.bundle run` finds it
    return parser.get_parsed_content("datalist")


@pytest.mark.slow
def test_the_bundle_reads_each_image_once_through_a_link_loop_and_not_the_masks_beside_images(bundles, images,
                                                                                              tmp_path):
    folder = tmp_path / "own"
    for name in ("images/1.png", "images/10.png", "images/2.png", "images/².png", "masks/1.png", "masks/2.png",
                 "scans/a.png", "scans/a_mask.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(images / "n0.png", folder / name)
    (folder / "loop").symlink_to(".")
    (folder / "scans" / "up").symlink_to("..")
    expected = [item["image"] for item in images_to_segment(folder, "_mask")]
    assert bundle_datalist(bundles["single"], folder) == expected
    assert [Path(path).relative_to(folder).as_posix() for path in expected] == [
        "images/1.png", "images/2.png", "images/10.png", "images/².png", "scans/a.png"]


@pytest.mark.slow
def test_an_unreadable_image_is_skipped_with_one_line_and_the_others_get_predict_pys_masks(
        bundles, checkpoints, images, fresh_environment, tmp_path):
    folder = tmp_path / "some broken"
    shutil.copytree(images, folder)
    (folder / "n2.png").write_bytes((images / "n2.png").read_bytes()[:100])  # truncated
    (folder / "scans" / "note.png").write_text("not an image")
    stdout = run_bundle(bundles["single"], folder, tmp_path / "bundled", fresh_environment)
    skipped = [line for line in stdout.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 2 and all(line.endswith("; no mask written") for line in skipped), stdout[-3000:]
    assert f"skipped {folder / 'n2.png'}: it cannot be read (" in stdout
    result = run_script("predict.py", "--checkpoint", str(checkpoints["single"]), "--input", str(folder), "--output",
                        "predicted", "--pictures", "pictures", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    masks = assert_same_masks(tmp_path / "predicted" / "masks", tmp_path / "bundled")
    assert len(masks) == 11 and "n2.png" not in masks and "scans/note.png" not in masks


def test_the_bundles_finder_is_predict_pys_and_runs_alone(tmp_path):
    script = tmp_path / "images.py"
    script.write_text(bundle_script())
    assert "from nerveseg" not in script.read_text() and "import nerveseg" not in script.read_text()
    folder = tmp_path / "data"
    for name in ("images/2.png", "images/10.png", "images/².png", "masks/2.png", "a.png", "a_mask.png", ".h/b.png",
                 "scan.dcm"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    (folder / "images" / "loop").symlink_to("..")
    bundled = runpy.run_path(str(script))["datalist"](str(folder), "_mask")
    found = [item["image"] for item in images_to_segment(folder, "_mask")]
    assert bundled == [path for path in found if not path.endswith(".dcm")]  # DICOM and videos: predict.py's
    assert [Path(path).relative_to(folder).as_posix() for path in bundled] == [
        "a.png", "images/2.png", "images/10.png", "images/².png"]


# %% What the bundle holds


@pytest.mark.slow
def test_the_metadata_passes_monais_schema_check_and_the_network_its_shapes(bundles, tmp_path):
    assert hashlib.md5(SCHEMA.read_bytes()).hexdigest() == SCHEMA_MD5
    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, schema)  # present and of the right hash: verify_metadata downloads nothing
    for bundle in bundles.values():
        meta_file, config_file = bundle / "configs" / "metadata.json", bundle / "configs" / "inference.json"
        verify_metadata(meta_file=str(meta_file), filepath=str(schema), hash_val=SCHEMA_MD5)
        verify_net_in_out(net_id="network_def", meta_file=str(meta_file), config_file=str(config_file),
                          bundle_root=str(bundle), device="cpu")
    broken = json.loads((bundles["single"] / "configs" / "metadata.json").read_text())
    del broken["network_data_format"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "broken.json"), filepath=str(schema), hash_val=SCHEMA_MD5)


@pytest.mark.slow
def test_the_metadata_records_the_data_the_figures_and_the_rule(bundles):
    single = json.loads((bundles["single"] / "configs" / "metadata.json").read_text())
    ensemble = json.loads((bundles["ensemble"] / "configs" / "metadata.json").read_text())
    image = single["network_data_format"]["inputs"]["image"]
    assert (image["modality"], image["num_channels"], image["value_range"], image["spatial_shape"]) == (
        "US", 1, [0, 1], IMAGE_SIZE)
    assert single["network_data_format"]["outputs"]["pred"]["num_channels"] == 2  # the mask and the presence
    assert single["authors"] == "Test Lab" and "Test Lab" in single["copyright"]
    assert single["version"] in single["changelog"] and single["monai_version"] and single["numpy_version"]
    assert single["eval_metrics"] == {"validation_kaggle_dice": 0.61, "validation_images": 9,
                                      "validation_images_empty": 4, "all_empty_baseline": 0.42}
    assert ensemble["eval_metrics"]["cross_validated_kaggle_dice_mean"] == 0.7
    assert ensemble["eval_metrics"]["cross_validated_kaggle_dice_sd"] == 0.05
    assert ensemble["eval_metrics"]["all_empty_baseline"] == 0.55
    assert "largest connected component" in single["postprocessing"] and "below" in single["presence_rule"]
    assert "scikit-image" in single["required_packages_version"]  # KeepLargestConnectedComponent needs it
    assert "scikit-image" not in ensemble["required_packages_version"]
    assert ensemble["nerveseg"]["tta"]["use"] and "ensemble of 2 fold models" in ensemble["description"]
    assert single["data_source"]  # where train.py's data came from (its clean folder is absent here)
    readme = (bundles["ensemble"] / "docs" / "README.md").read_text()
    for section in ("## What it segments", "## How it was trained", "## How it was validated", "## How to run it",
                    "## Limits", "python -m monai.bundle run --config_file"):
        assert section in readme
    assert "SPDX-License-Identifier: MIT" in (bundles["single"] / "LICENSE").read_text()
    config = (bundles["single"] / "configs" / "inference.json").read_text()
    assert "nerveseg" not in config and "KeepLargestConnectedComponentd" in config
    weights = torch.load(bundles["ensemble"] / "models" / "model.pt", weights_only=True)
    assert any(name.startswith("members.1.") for name in weights)
    assert single["description"].startswith("MONAI UNet with residual units; channels [4, 8], strides [2]")
    encoder = json.loads((bundles["encoder"] / "configs" / "metadata.json").read_text())
    assert "FlexibleUNet" in encoder["description"] and "efficientnet-lite0 encoder" in encoder["description"]
    assert "random weights" in encoder["description"]  # where its encoder started: the network's entry says it
    assert "`network.unet.encoder.*`" in (bundles["encoder"] / "docs" / "README.md").read_text()
    assert "MONAI UNet's `model.*`" in readme


def test_the_traced_network_has_a_free_batch_size_and_a_presence_of_one_without_a_presence_output():
    torch.manual_seed(0)
    without = build_model(model_config((4, 8), (2,), 0, 0.0, presence=False)).eval()
    images = torch.rand(3, 1, *IMAGE_SIZE)
    traced, difference = trace_network(without, images, tolerance=1e-6, where="model.pt")
    assert difference == 0
    outputs = traced(images)
    assert outputs.shape == (3, 2, *IMAGE_SIZE) and torch.equal(outputs[:, 1], torch.ones(3, *IMAGE_SIZE))
    torch.testing.assert_close(outputs[:, :1], torch.sigmoid(without(images)[0]), rtol=0, atol=1e-6)
    assert torch.equal(BundleNetwork(without)(images), outputs)


class Untraceable(nn.Module):
    """Returns a string: nothing the tracer can record."""

    def forward(self, images: torch.Tensor) -> tuple:
        return "mask", None


class DataDependent(nn.Module):
    """Python control flow on the values: the trace keeps the branch of the image it was traced on."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (images if float(images.mean()) > 0.5 else -images), None


def test_a_model_that_cannot_be_traced_or_traces_wrongly_gets_a_clear_message():
    images = torch.cat([torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)])
    with pytest.raises(UserError, match="cannot be traced to TorchScript"):
        trace_network(Untraceable(), images, tolerance=1e-4, where="model.pt")
    with pytest.raises(UserError, match="differ from PyTorch's by"):
        trace_network(DataDependent(), images, tolerance=1e-4, where="model.pt")


# %% Bad input: an existing folder, the licence


@pytest.mark.slow
def test_an_existing_bundle_is_replaced_only_with_overwrite_and_a_foreign_folder_never(bundles, checkpoints, tmp_path):
    shutil.copytree(bundles["single"], tmp_path / "bundle")
    before = tree_hashes(tmp_path / "bundle")
    arguments = ("--checkpoint", str(checkpoints["single"]), "--format", "bundle", "--output", "bundle")
    assert_user_error(run_script("export.py", *arguments, cwd=tmp_path), "already holds a bundle", "--overwrite")
    assert tree_hashes(tmp_path / "bundle") == before
    result = run_script("export.py", *arguments, "--overwrite", "true", "--license", "", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "No licence has been chosen" in (tmp_path / "bundle" / "LICENSE").read_text()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bundle"]  # nothing left beside it
    (tmp_path / "bundle" / "eval").mkdir()
    (tmp_path / "bundle" / "eval" / "mask.png").write_bytes(b"a user's result")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for folder in (tmp_path / "bundle", tmp_path / "mine"):
        with pytest.raises(UserError, match="did not write"):
            check_target(folder, overwrite=True)
    with pytest.raises(UserError, match="not a folder"):
        check_target(tmp_path / "bundle" / "LICENSE", overwrite=True)
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    with pytest.raises(UserError, match=f"link is a symbolic link to {re.escape(str(tmp_path / 'mine'))}; pass "
                                        f"--output {re.escape(str(tmp_path / 'mine'))} itself, or choose another"):
        check_target(tmp_path / "link", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    check_target(tmp_path / "new", overwrite=False)  # a new folder is fine


def test_the_licence_is_an_spdx_identifier_a_file_or_a_request_to_fill_it_in(tmp_path):
    assert "SPDX-License-Identifier: Apache-2.0" in license_text("Apache-2.0", authors="Lab")[0]
    assert "Copyright (c)" in license_text("MIT", authors="Lab")[0]
    (tmp_path / "TERMS").write_text("Our own terms.\n")
    assert license_text(str(tmp_path / "TERMS"), authors="")[0] == "Our own terms.\n"
    assert "not openly licensed" in license_text("", authors="")[0]  # a typo (MTI): tests/test_settings.py


@pytest.mark.slow
def test_a_checkpoint_without_pt_is_exported_to_a_bundle_beside_it(checkpoints, tmp_path):
    shutil.copy(checkpoints["single"], tmp_path / "model")
    result = run_script("export.py", "--checkpoint", "model", "--format", "bundle", "--license", "MIT", cwd=tmp_path)
    assert result.returncode == 0 and "wrote the MONAI Bundle model-bundle" in result.stdout, result.stderr
    itself = run_script("export.py", "--checkpoint", "model", "--format", "bundle", "--output", "model", cwd=tmp_path)
    assert_user_error(itself, "--output model is the checkpoint itself; pass --output with the bundle's folder")


@pytest.mark.slow
def test_export_help_and_a_bad_format(tmp_path):
    help_text = run_script("export.py", "-h", cwd=tmp_path).stdout
    assert all(option in help_text for option in ("--format", "--license", "--authors", "--overwrite", "--target"))
    assert_user_error(run_script("export.py", "--format", "zip", cwd=tmp_path), "--format takes one of onnx, bundle")
