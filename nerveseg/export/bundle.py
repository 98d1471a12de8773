"""The model as a MONAI Bundle: a folder that stock MONAI runs, with no part of this project.

    <bundle>/configs/metadata.json   the bundle specification's metadata, and this project's record of the model
    <bundle>/configs/inference.json  reading, preprocessing, the TorchScript model, the presence rule and the
                                     post-processing, writing one mask per image: MONAI components only
    <bundle>/scripts/images.py       the images to segment, found as predict.py finds them (its code, copied), and
                                     the dataset that skips an unreadable one (nerveseg/export/bundle_script.py)
    <bundle>/models/model.ts         the network (the fold ensemble, test-time augmentation) traced to TorchScript
    <bundle>/models/model.pt         its state dict
    <bundle>/docs/README.md          what it segments, how it was trained and validated, how to run it, its limits
    <bundle>/LICENSE                 the licence the user chose (--license)

    python -m monai.bundle run --config_file <bundle>/configs/inference.json --dataset_dir <images> --output_dir <out>

writes the masks predict.py writes for the same checkpoint, pixel for pixel (on the CPU): inference.json repeats
predict.py's steps in its order (nerveseg/transforms.py, nerveseg/postprocess.py) with MONAI's transforms and a
few torch/numpy expressions. The TorchScript model maps images (N, 1, h, w) in [0, 1] to (N, 2, h, w): the mask's
probabilities and, at every pixel, the image's presence probability (1 for a model without a presence output).
"""

import datetime
import io
import json
import warnings
from pathlib import Path

import monai
import numpy as np
import torch
from monai.data import save_net_with_metadata
from torch import nn

from nerveseg.checkpoint import FORMAT as CHECKPOINT_FORMAT
from nerveseg.ensemble import TestTimeAugmentation
from nerveseg.errors import UserError
from nerveseg.export.bundle_docs import bundle_readme, license_text
from nerveseg.export.bundle_script import bundle_script
from nerveseg.files import building_folder, check_not_current_folder, discard_building, swap_into_place
from nerveseg.images import WIDE_MODES
from nerveseg.model import describe_network
from nerveseg.onnx_model import CHECKPOINT_FIELDS, Probabilities
from nerveseg.postprocess import PostProcessing

BUNDLE_FORMAT = "nerveseg-bundle"  # metadata["nerveseg"]["format"]: a bundle export.py wrote
BUNDLE_FILES = ("configs/metadata.json", "configs/inference.json", "scripts/images.py", "models/model.ts",
                "models/model.pt",
                "docs/README.md", "LICENSE")
# The bundle specification's metadata schema, as the model zoo's bundles name it (a copy: tests/data/).
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"


class BundleNetwork(nn.Module):
    """A model (the fold ensemble, test-time augmentation) as the bundle runs it: one tensor out, as MONAI's bundle
    tools expect, (N, 2, h, w): channel 0 the mask's probabilities, channel 1 the image's presence probability at
    every pixel (1 for a model without a presence output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.probabilities = Probabilities(model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self.probabilities(images)
        masks = outputs[0].float()
        if len(outputs) == 1:  # no presence output
            return torch.cat([masks, torch.ones_like(masks)], dim=1)
        presences = outputs[1].float().view(-1, 1, 1, 1).expand_as(masks)
        return torch.cat([masks, presences], dim=1)


def trace_network(model: nn.Module, images: torch.Tensor, *, tolerance: float,
                  where: str) -> tuple[torch.jit.ScriptModule, float]:
    """BundleNetwork(model) traced to TorchScript on `images` (N, 1, h, w floats in [0, 1]) and checked against the
    eager model on them, one image and all at once; with the largest difference. A UserError says why a model
    cannot be traced or differs."""
    network = BundleNetwork(model).cpu().eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():  # the tracer warns of loops over buffers: fixed, checked below
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(network, images[:1], check_trace=False)
            difference = max(float((traced(batch) - network(batch)).abs().max()) for batch in (images[:1], images))
    except Exception as error:  # the tracer raises RuntimeError, TypeError, ... for what it cannot follow
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise UserError(f"{where}: its model cannot be traced to TorchScript ({reason}); export it as ONNX "
                        "(--format onnx) or predict with predict.py, and report this line") from None
    if not difference <= tolerance:
        raise UserError(f"{where}: the TorchScript model's probabilities differ from PyTorch's by {difference:.2g} "
                        f"(more than --tolerance {tolerance}); the bundle was not written")
    return traced, difference


def inference_config(image_size: tuple[int, int], post: PostProcessing, *, mask_suffix: str = "_mask") -> dict:
    """configs/inference.json: predict.py's steps, in its order, with MONAI's components.

    Reading (nerveseg/transforms.py load_transforms): PIL, any image as 8-bit grayscale (nerveseg/images.py
    to_grayscale, repeated as an expression), not transposed; the image's size recorded; resized (area) to the
    network's size; rounded to 8 bits; divided by 255. Then the TorchScript model, and per image
    (nerveseg/postprocess.py to_mask): empty below the presence threshold, else resized back (bilinear) to the
    image's size, thresholded, its largest component kept where the rule says so, and emptied below the minimum
    area; written as a PNG of 0 and 255 at <output_dir>/<its path below dataset_dir>.png. The images are taken in
    predict.py's order and batches (the CPU's convolutions may round differently for another batch size), from
    scripts/images.py: predict.py's finder, and a dataset that skips an unreadable image with a one-line message.
    """
    stretch = ("$lambda pixels: numpy.round((pixels - pixels.min()) * (255.0 / (pixels.max() - pixels.min())) "
               "if pixels.max() > pixels.min() else numpy.zeros_like(pixels)).astype(numpy.uint8)")
    grayscale = ("$lambda image: image if image.mode == 'L' else image.convert('L') if image.mode not in "
                 "@wide_modes else Image.fromarray(@stretch(numpy.asarray(image, dtype=numpy.float64)))")
    bundle_root = ("$next((os.path.dirname(os.path.abspath(str(frame.frame.f_locals['self'].config_root_path))) "
                   "for frame in inspect.stack(0) if isinstance(frame.frame.f_locals.get('self'), "
                   "monai.bundle.ConfigWorkflow)), '.')")
    preprocessing = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True,
         "reader": {"_target_": "PILReader", "converter": "@grayscale", "reverse_indexing": False}},
        {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": "no_channel"},
        {"_target_": "Lambdad", "keys": "image", "func": "$lambda image: torch.tensor(image.shape[1:])",
         "overwrite": "original_size", "_desc_": "the image's (height, width), to bring its mask back to it"},
        {"_target_": "Resized", "keys": "image", "spatial_size": "@image_size", "mode": "area"},
        {"_target_": "Lambdad", "keys": "image", "func": "$lambda image: image.round().clamp(0, 255)",
         "_desc_": "8-bit values, as the network was trained on"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0, "a_max": 255, "b_min": 0, "b_max": 1},
    ]
    postprocessing = [
        {"_target_": "Lambdad", "keys": "pred", "_desc_": "the presence rule: an empty mask below presence_threshold",
         "func": "$lambda pred: pred[0:1] if float(pred[1, 0, 0]) >= @presence_threshold "
                 "else torch.zeros_like(pred[0:1])"},
        {"_target_": "Lambda", "_desc_": "the probabilities back at the image's size (bilinear), with its metadata",
         "func": "$lambda item: {**item, 'pred': monai.transforms.Resize(spatial_size=item['original_size'].tolist(), "
                 "mode='bilinear', align_corners=False)(monai.data.MetaTensor(item['pred'], "
                 "meta=item['image'].meta))}"},
        {"_target_": "Lambdad", "keys": "pred", "func": "$lambda pred: (pred > @threshold).float()"},
    ]
    if post.keep_largest:
        postprocessing.append({"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": [1]})
    postprocessing += [
        {"_target_": "Lambdad", "keys": "pred", "_desc_": "an empty mask where less than min_area_fraction is left",
         "func": "$lambda mask: mask if int(mask.count_nonzero()) >= @min_area_fraction * mask[0].numel() "
                 "else torch.zeros_like(mask)"},
        {"_target_": "Transposed", "keys": "pred", "indices": [0, 2, 1],
         "_desc_": "PILWriter transposes (it expects MONAI's (width, height)); the mask is (height, width)"},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "",
         "output_ext": ".png", "output_dtype": "$numpy.uint8", "scale": 255, "resample": False,
         "separate_folder": False, "data_root_dir": "@dataset_dir", "print_log": False},
    ]
    return {
        "imports": ["$import inspect", "$import os", "$import runpy", "$from PIL import Image"],
        "bundle_root": bundle_root,
        "dataset_dir": "images",
        "output_dir": "masks",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "image_size": list(image_size),
        "presence_threshold": post.presence_threshold,
        "threshold": post.threshold,
        "keep_largest": post.keep_largest,
        "min_area_fraction": post.min_area_fraction,
        "batch_size": 64,
        "mask_suffix": mask_suffix,
        "wide_modes": list(WIDE_MODES),
        "stretch": stretch,
        "grayscale": grayscale,
        "images": "$runpy.run_path(os.path.join(@bundle_root, 'scripts', 'images.py'))",
        "datalist": "$@images['datalist'](@dataset_dir, @mask_suffix)",
        "network_def": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location='cpu')",
        "network": "$@network_def.to(@device).eval()",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "dataset": "$@images['SkippingDataset']([{'image': path} for path in @datalist], @preprocessing, "
                   "@image_size)",
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": "@batch_size",
                       "shuffle": False, "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "predict": "$torch.no_grad()(lambda images: @inferer(images.as_tensor().to(@device), @network).cpu())",
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
        "run": [
            "$print('segmenting', len(@datalist), 'images of', @dataset_dir, 'into', @output_dir)",
            "$[print(item['error']) if item['error'] else @postprocessing({**item, 'pred': pred}) for batch in "
            "@dataloader for item, pred in zip(monai.data.decollate_batch(batch), @predict(batch['image']))]",
        ],
    }


def validation_figures(metrics: dict) -> dict:
    """The checkpoint's validation figures for metadata.json's eval_metrics: the cross-validated Kaggle Dice (mean
    and sd over the folds) of an ensemble, or the one split's validation Dice; with the all-empty baseline."""
    cross_validation = metrics.get("cross_validation")
    if cross_validation:
        pooled = cross_validation["pooled"]["postprocessed"]
        figures = {
            "cross_validated_kaggle_dice_mean": cross_validation["mean"]["postprocessed"]["dice"],
            "cross_validated_kaggle_dice_sd": cross_validation["sd"]["postprocessed"]["dice"],
            "folds": len(cross_validation["folds"]),
            "pooled_validation_kaggle_dice": pooled["dice"],
        }
    else:
        pooled = metrics.get("postprocessed") or metrics
        figures = {"validation_kaggle_dice": pooled.get("dice")}
    figures |= {
        "validation_kaggle_dice_empty_truths": pooled.get("dice_empty"),
        "validation_kaggle_dice_with_target": pooled.get("dice_nonempty"),
        "validation_images": pooled.get("images"),
        "validation_images_empty": pooled.get("images_empty"),
        "all_empty_baseline": pooled.get("all_empty_baseline"),
    }
    return {key: value for key, value in figures.items() if value is not None}


def training_data(settings: dict) -> str:
    """Where the training data came from: data_cleaning.py's record of the clean folder, where it is still there."""
    data_dir = Path(settings.get("data_dir") or "data/clean")
    try:
        record = json.loads((data_dir / "cleaning.json").read_text())
        summary = record.get("summary", {})
        counts = f"{summary.get('pairs_kept')} image/mask pairs of {summary.get('subjects')} subjects"
        return f"{record.get('source')}, cleaned by data_cleaning.py into {data_dir} ({counts})"
    except (OSError, ValueError, AttributeError):
        return f"the clean folder {data_dir} written by data_cleaning.py (its cleaning.json was not found at export)"


def bundle_metadata(checkpoint: dict, *, target: str, authors: str, checked: str) -> dict:
    """configs/metadata.json: the bundle specification's fields, and this project's record of the model."""
    post = PostProcessing(**checkpoint["postprocessing"])
    height, width = checkpoint["preprocessing"]["image_size"]
    config = checkpoint["model_config"]
    has_presence = bool(config.get("presence"))
    settings = checkpoint.get("settings") or {}
    today = datetime.date.today()
    presence_rule = (f"an image whose presence probability is below {post.presence_threshold} gets an empty mask"
                     if has_presence and post.presence_threshold > 0 else "none (every image may hold the target)")
    largest = ", only its largest connected component (8-connected) kept" if post.keep_largest else ""
    smallest = (f", emptied where it covers less than {post.min_area_fraction} of the image"
                if post.min_area_fraction > 0 else "")
    postprocessing = (f"the probabilities resized back to the image's size (bilinear), the target where they are "
                      f"above {post.threshold}{largest}{smallest}")
    network = describe_network(config)
    return {
        "schema": SCHEMA_URL,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by export.py on {today.isoformat()}: {checkpoint['predicting_with']}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"pillow": _version("PIL"), "fire": _version("fire", "0.7.1"),
                                      **({"scikit-image": _version("skimage")} if post.keep_largest else {})},
        "task": f"Segmentation of the {target} in 2-D ultrasound images",
        "description": (f"{network}, predicting with {checkpoint['predicting_with']}, trained with the nerveseg "
                        f"pipeline's train.py. For each image: the {target}'s mask (0 or 255) at the image's size."),
        "authors": authors or "not given at export (export.py --authors)",
        "copyright": f"Copyright (c) {today.year} {authors or 'the authors'}",
        "data_source": training_data(settings),
        "data_type": "2-D images read by PIL (PNG, JPEG, TIFF, BMP), as 8-bit grayscale",
        "image_classes": f"one channel, 8-bit grayscale / 255 (in [0, 1]), resized (area) to {height}x{width}",
        "pred_classes": (f"2 channels: 0 the {target}'s probability at each pixel, 1 the image's presence "
                         "probability at every pixel" + ("" if has_presence else " (1: this model has no presence "
                                                                                 "output)")),
        "eval_metrics": validation_figures(checkpoint.get("metrics") or {}),
        "intended_use": "Research and demonstration only; not a medical device, not for diagnosis or treatment.",
        "references": ["Kaggle Ultrasound Nerve Segmentation (2016), whose mean Dice (1 for an empty mask on an empty "
                       "truth) the figures use: https://www.kaggle.com/competitions/ultrasound-nerve-segmentation"],
        "postprocessing": postprocessing,
        "presence_rule": presence_rule,
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "US", "num_channels": 1,
                "spatial_shape": [height, width], "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": False, "channel_def": {"0": "ultrasound image, 8-bit grayscale / 255"},
            }},
            "outputs": {"pred": {
                "type": "probabilities", "format": "classes", "num_channels": 2, "spatial_shape": [height, width],
                "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                "channel_def": {"0": f"the {target}'s probability at each pixel",
                                "1": "the image's presence probability (that the target is in the image at all), "
                                     "the same at every pixel" + ("" if has_presence else "; 1: no presence output")},
            }},
            "post_processed_outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": 1, "spatial_shape": ["*", "*"],
                "dtype": "uint8", "value_range": [0, 255], "is_patch_data": False,
                "channel_def": {"0": f"the {target}'s mask at the image's own size: 255 target, 0 background"},
            }},
        },
        "nerveseg": {"format": BUNDLE_FORMAT, "checkpoint_format": CHECKPOINT_FORMAT, "checked": checked,
                     **{field: checkpoint.get(field) for field in (*CHECKPOINT_FIELDS, "tta", "predicting_with")}},
    }


def _version(module: str, fallback: str = "") -> str:
    """The installed version of a package (by its import name), or `fallback`."""
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return fallback


def is_our_bundle(folder: Path) -> bool:
    """A bundle export.py wrote, holding nothing else: only that may be replaced (--overwrite)."""
    try:
        metadata = json.loads((folder / "configs" / "metadata.json").read_text())
    except (OSError, ValueError):
        return False
    files = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if not path.is_dir()}
    return isinstance(metadata, dict) and (metadata.get("nerveseg") or {}).get("format") == BUNDLE_FORMAT and (
        files <= set(BUNDLE_FILES))


def check_target(target: Path, *, overwrite: bool) -> None:
    """Refuse to write over anything but a bundle of ours, and over that without --overwrite."""
    check_not_current_folder(target, script="export.py")
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink():
        resolved = target.resolve()
        pointed = f"; pass --output {resolved} itself" if resolved.is_dir() else ""
        raise UserError(f"{target} is a symbolic link to {resolved}{pointed}, or choose another --output (a link is "
                        "not replaced by a folder)")
    if not target.is_dir():
        raise UserError(f"{target} exists and is not a folder; choose another --output")
    if not any(target.iterdir()):
        return
    if not is_our_bundle(target):
        raise UserError(f"{target} already holds files that export.py did not write; choose another --output "
                        "(an existing bundle is replaced only when it holds nothing but what export.py wrote)")
    if not overwrite:
        raise UserError(f"{target} already holds a bundle; pass --overwrite true to replace it, or choose another "
                        "--output")


def write_bundle(target: Path, *, model: nn.Module, checkpoint: dict, source: str, images: torch.Tensor,
                 checked_on: str, tolerance: float, target_name: str, authors: str, license_choice: str,
                 overwrite: bool) -> str:
    """Trace the model of the checkpoint file `source`, write the bundle beside `target` and swap it in; what was
    written, in words."""
    check_target(target, overwrite=overwrite)
    traced, difference = trace_network(model, images, tolerance=tolerance, where=source)
    post = PostProcessing(**checkpoint["postprocessing"])
    image_size = tuple(checkpoint["preprocessing"]["image_size"])
    metadata = bundle_metadata(checkpoint, target=target_name, authors=authors,
                               checked=f"TorchScript matches PyTorch within {difference:.1g} on {checked_on}")
    config = inference_config(image_size, post)
    license_file, license_note = license_text(license_choice, authors=authors)
    weights = model.model if isinstance(model, TestTimeAugmentation) else model
    try:
        building = building_folder(target)
    except OSError as error:
        raise UserError(f"cannot write into {target.parent}: {error.strerror}; choose another --output") from None
    try:
        for folder in ("configs", "scripts", "models", "docs"):
            (building / folder).mkdir()
        (building / "scripts" / "images.py").write_text(bundle_script())
        (building / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        (building / "configs" / "inference.json").write_text(json.dumps(config, indent=2) + "\n")
        stream = io.BytesIO()
        save_net_with_metadata(traced, stream, meta_values=metadata,
                               more_extra_files={"inference.json": json.dumps(config).encode()})
        (building / "models" / "model.ts").write_bytes(stream.getvalue())
        torch.save({name: value.detach().cpu() for name, value in weights.state_dict().items()},
                   building / "models" / "model.pt")
        (building / "docs" / "README.md").write_text(bundle_readme(metadata, target=target_name,
                                                                   license_note=license_note))
        (building / "LICENSE").write_text(license_file)
        swap_into_place(building, target)
    except OSError as error:
        discard_building(building)
        raise UserError(f"cannot write the bundle {target}: {error.strerror}; nothing was changed there") from None
    except BaseException:
        discard_building(building)
        raise
    size = sum(path.stat().st_size for path in target.rglob("*") if path.is_file())
    return (f"wrote the MONAI Bundle {target} ({checkpoint['predicting_with']}; {size / 1e6:.1f} MB); TorchScript "
            f"matches PyTorch within {difference:.1g} on {checked_on}")
