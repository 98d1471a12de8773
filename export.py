"""Stage 4 (optional): export the trained model to ONNX, for deployment without PyTorch, or as a MONAI Bundle.

    python export.py                                  # 2D_Nerve_Segmentation.pt -> 2D_Nerve_Segmentation.onnx
    python export.py --checkpoint runs/NAME/best.pt --output model.onnx
    python predict.py --checkpoint 2D_Nerve_Segmentation.onnx   # predicts with ONNX Runtime, same masks
    python export.py --format bundle --license MIT    # -> the MONAI Bundle folder 2D_Nerve_Segmentation/
    python -m monai.bundle run --config_file 2D_Nerve_Segmentation/configs/inference.json --dataset_dir IMAGES \
        --output_dir MASKS                            # stock MONAI: predict.py's masks (see nerveseg/export/bundle.py)

The graph takes images (N, 1, height, width) as floats in [0, 1] (the 8-bit pixels divided by 255), any
batch size, and gives the mask's probabilities and, for a model with a presence output, each image's
presence probability. Its metadata ("nerveseg", JSON) holds the image size, the intensity scaling, the
post-processing and presence rule, and the model's record, so the file is all that prediction needs. A
cross-validated checkpoint exports its ensemble as one graph (--fold k: one fold's model), with test-time
augmentation inside where validation chose it (--tta).

Before writing, ONNX Runtime's probabilities are compared with PyTorch's on CHECK_IMAGES images of
CHECK_INPUT (random images where that folder is absent); a model that differs by more than TOLERANCE is
not written. TOLERANCE's default is nerveseg.predictors.ONNX_TOLERANCE, the limit of predict.py --engine
onnxruntime too (the settings block holds literals only; tests/test_export.py keeps the two equal).
"""

# %% Imports
import sys
from pathlib import Path

import monai
import torch

from nerveseg.checkpoint import FORMAT as CHECKPOINT_FORMAT
from nerveseg.checkpoint import VERSION as CHECKPOINT_VERSION
from nerveseg.errors import UserError, exit_on_user_error
from nerveseg.export.bundle import write_bundle
from nerveseg.export.bundle_docs import LICENSES
from nerveseg.files import FolderLock, atomic_write
from nerveseg.inputs import ReadableDataset, images_to_segment, read_some
from nerveseg.model import describe_network
from nerveseg.onnx_model import CHECKPOINT_FIELDS, add_metadata, is_our_onnx, onnx_graph
from nerveseg.predictors import OnnxPredictor, TorchPredictor, check_onnx_matches_torch, prediction_model
from nerveseg.settings import AUTO_TRUE_FALSE, Bounds, OneOf, parse_settings
from nerveseg.transforms import load_transforms, network_input

# %% Settings
# -----------------------------------------------------------------------------
CHECKPOINT = "2D_Nerve_Segmentation.pt"  # the model written by train.py
FORMAT: OneOf(("onnx", "bundle")) = "onnx"  # onnx: one .onnx file, for predict.py; bundle: a MONAI Bundle folder
OUTPUT = ""  # the .onnx file or bundle folder to write ("": the checkpoint's name, with .onnx for ONNX)
CHECK_INPUT = "data/clean/test"  # images to compare ONNX Runtime with PyTorch on (random images if absent)
CHECK_IMAGES: Bounds(at_least=1) = 8  # how many of them
MAX_IMAGE_PIXELS: Bounds(at_least=1) = 25_000_000  # a check image of more pixels (width x height) is skipped
TOLERANCE: Bounds(above=0, below=1) = 0.0001  # the largest difference of probabilities between ONNX Runtime and PyTorch
FOLD: Bounds(at_least=0) = 0  # with a cross-validated checkpoint: 0 exports all folds' ensemble, k fold k's model
TTA: OneOf(AUTO_TRUE_FALSE) = "auto"  # include test-time augmentation: auto (where validation chose it), true or false
# MONAI Bundle (--format bundle)
TARGET = "nerve"  # what the model segments, in words, for the bundle's metadata and README
AUTHORS = ""  # the bundle's authors (its metadata and copyright line)
LICENSE: OneOf(LICENSES, or_file=True) = ""  # the bundle's LICENSE: an SPDX identifier, a file to copy, or "" (later)
OVERWRITE = False  # replace an existing bundle folder (only one that export.py wrote)
# -----------------------------------------------------------------------------
exit_on_user_error("export.py")
globals().update(parse_settings(globals()))
named = Path(CHECKPOINT).with_suffix(".onnx" if FORMAT == "onnx" else "")  # the default: the checkpoint's name
output = Path(OUTPUT or (named if named != Path(CHECKPOINT) else f"{CHECKPOINT}-bundle"))
written = "a .onnx file" if FORMAT == "onnx" else "the bundle's folder"
if output.resolve() == Path(CHECKPOINT).resolve():
    raise UserError(f"--output {output} is the checkpoint itself; pass --output with {written}")
if FORMAT == "onnx" and output.suffix.lower() != ".onnx":
    raise UserError(f"--output must be a .onnx file for --format onnx, not {output} (--format bundle writes a folder)")
if FORMAT == "onnx" and (output.is_dir() or output.exists() and not is_our_onnx(output)):
    raise UserError(f"--output {output} is a {'folder' if output.is_dir() else 'file'} that export.py did not "
                    "write, and the export would replace it; choose another --output (a new file, or an ONNX model "
                    "export.py wrote)")
if FORMAT == "bundle":  # one run at a time writes a bundle folder: a second is refused now, before any work
    try:
        lock = FolderLock(output, script="export.py")
    except OSError as error:
        raise UserError(f"cannot write into {output.parent}: {error.strerror}; choose another --output") from None
monai.data.set_track_meta(False)

# %% Load the model and the images to check it on
model, checkpoint = prediction_model(CHECKPOINT, torch.device("cpu"), fold=FOLD, tta=TTA)
image_size = tuple(checkpoint["preprocessing"]["image_size"])
has_presence = checkpoint["model_config"]["presence"]
if Path(CHECK_INPUT).is_dir():
    items = images_to_segment(Path(CHECK_INPUT), "_mask", option="--check-input")
    transform = load_transforms(image_size, with_label=False, max_pixels=MAX_IMAGE_PIXELS)
    readable, skipped = read_some(ReadableDataset(items, transform, image_size), CHECK_IMAGES)
    for reason in skipped:
        print(f"export.py: skipped {reason}", file=sys.stderr)
    if not readable:
        raise UserError(f"no image of --check-input {CHECK_INPUT} could be read (the first: {skipped[0]}); pass "
                        "--check-input with a folder of readable images")
    images = torch.stack([item["image"] for item in readable])
    checked_on = f"{len(readable)} images of {CHECK_INPUT}"
else:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (CHECK_IMAGES, 1, *image_size), dtype=torch.uint8, generator=generator)
    checked_on = f"{CHECK_IMAGES} random images ({CHECK_INPUT} is absent)"

# %% A MONAI Bundle (--format bundle): traced to TorchScript, checked against PyTorch, written
# (nerveseg/export/bundle.py)
if FORMAT == "bundle":
    print(write_bundle(output, model=model, checkpoint=checkpoint, source=CHECKPOINT, images=network_input(images),
                       checked_on=checked_on, tolerance=TOLERANCE, target_name=TARGET, authors=AUTHORS,
                       license_choice=LICENSE, overwrite=OVERWRITE))
    print(f"Run it with: python -m monai.bundle run --config_file {output}/configs/inference.json --dataset_dir "
          "IMAGES --output_dir MASKS")
    sys.exit()

# %% Export, check against PyTorch, write
fields = (*CHECKPOINT_FIELDS, "tta", "predicting_with")
metadata = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "network": describe_network(checkpoint["model_config"]),
            **{field: checkpoint.get(field) for field in fields}}
graph = add_metadata(onnx_graph(model, image_size, has_presence=has_presence), metadata)
torch_predictor = TorchPredictor(model, torch.device("cpu"), amp=False)
difference = check_onnx_matches_torch(OnnxPredictor(graph, str(output)), torch_predictor, images, tolerance=TOLERANCE,
                                      what=f"on {checked_on}; {output} was not written (--tolerance sets the limit)")
with atomic_write(output, "wb") as file:
    file.write(graph)
print(f"wrote {output} ({checkpoint['predicting_with']}; {len(graph) / 1e6:.1f} MB;"
      f" input {image_size[0]}x{image_size[1]}, any batch size"
      f"{', with the presence output' if has_presence else ''}); ONNX Runtime matches PyTorch within "
      f"{difference:.1g} on {checked_on}. Predict with: python predict.py --checkpoint {output}")
