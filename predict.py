"""Stage 3: segment new images with the trained model; write masks, a Kaggle submission and pictures.

    python predict.py                                   # the cleaned Kaggle test set
    python predict.py --input my_scans/ --output out/   # any folder of TIFF, PNG or JPEG images
    python predict.py --input data/clean/images --masks data/clean/masks   # also report the Dice

Writes OUTPUT/masks/<name>.png (0/255, each image's own size), OUTPUT/submission.csv (Kaggle format)
and a picture of a few predictions in PICTURES. The post-processing chosen on the validation subjects
at the end of training (threshold, largest component, minimum area) is read from the checkpoint.
"""

# %% Import useful libraries
import os
import time
from pathlib import Path

import monai
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from nerveseg.checkpoint import load_checkpoint
from nerveseg.data import list_images
from nerveseg.distributed import choose_device
from nerveseg.errors import UserError, exit_on_user_error
from nerveseg.evaluation import autocast, collate_keep_sizes
from nerveseg.files import write_csv
from nerveseg.inference import OutputFolder, ReadableDataset, find_truth, pick_examples, raise_read_errors
from nerveseg.memory import keep_freed_memory
from nerveseg.metrics import DiceTally, kaggle_dice
from nerveseg.pictures import plot_predictions
from nerveseg.postprocess import PostProcessing, to_mask, upsample
from nerveseg.rle import rle_encode
from nerveseg.settings import parse_settings
from nerveseg.transforms import load_transforms, network_input

# %% Settings
# -----------------------------------------------------------------------------
# Input and output
CHECKPOINT = "2D_Nerve_Segmentation.pt"  # the model written by train.py
INPUT = "data/clean/test"  # a folder of images to segment
OUTPUT = "predictions"  # masks/ and submission.csv are written here
MASKS = ""  # a folder of truth masks (<name>.tif or <name>_mask.tif): also report the Kaggle Dice
PICTURES = "Images"  # where the picture of example predictions goes
NUM_PICTURES = 4  # how many images the picture shows
# System
BATCH_SIZE = 64  # images per forward pass
DEVICE = "auto"  # auto (GPU if there is one), cpu, cuda, cuda:N
NUM_WORKERS = -1  # processes reading images while the model runs (0: none; -1: one a spare core, up to 4)
AMP = True  # mixed precision on CUDA (ignored on CPU)
QUIET = False  # no progress bar
# -----------------------------------------------------------------------------
exit_on_user_error("predict.py")
globals().update(parse_settings(globals()))
if BATCH_SIZE < 1 or NUM_WORKERS < -1:
    raise UserError(f"--batch-size must be at least 1 and --num-workers -1 or more, not {BATCH_SIZE} and {NUM_WORKERS}")
workers = NUM_WORKERS if NUM_WORKERS >= 0 else min(4, (os.cpu_count() or 1) - 1)  # the model keeps one core
monai.data.set_track_meta(False)
keep_freed_memory()  # big CPU tensors are reused, not handed back and faulted in again (see nerveseg/memory.py)

# %% Load the model and the images
started = time.perf_counter()
device = choose_device(DEVICE, 0)
model, checkpoint = load_checkpoint(CHECKPOINT, device)
post = PostProcessing(**checkpoint["postprocessing"])
image_size = tuple(checkpoint["preprocessing"]["image_size"])
items = list_images(INPUT)
truths = find_truth(items, MASKS) if MASKS else {}
dataset = ReadableDataset(items, load_transforms(image_size, with_label=False), image_size)
loader = torch.utils.data.DataLoader(
    dataset, batch_size=BATCH_SIZE, num_workers=workers, collate_fn=collate_keep_sizes
)
output = OutputFolder(Path(OUTPUT))
print(f"segmenting {len(items)} images from {INPUT} with {CHECKPOINT} (epoch {checkpoint['epoch']}) on {device}")

# %% Segment: network at its own size, then each mask back at its image's size
rows, tally, examples = [], DiceTally(), []
with torch.no_grad():
    for batch in tqdm(loader, desc="predicting", unit="batch", disable=QUIET or None):
        raise_read_errors(batch)
        with autocast(device, AMP):
            logits = model(network_input(batch["image"].to(device)))
        sizes = [tuple(size.tolist()) for size in batch["original_size"]]
        for name, probability in zip(batch["id"], upsample(torch.sigmoid(logits.float()), sizes), strict=True):
            mask = to_mask(probability, post)
            output.write_mask(name, mask)
            rows.append({"img": name, "pixels": rle_encode(mask)})
            if name in truths:
                truth = torch.as_tensor(truths[name]()).bool()[None, None]
                tally.add(kaggle_dice(torch.as_tensor(mask)[None, None], truth), ~truth.flatten(1).any(1))

# %% Submission, pictures and the Dice
write_csv(output.building / "submission.csv", rows, ["img", "pixels"])
output.finish()
predicted = {row["img"]: row["pixels"] for row in rows}
for item in pick_examples(items, predicted, NUM_PICTURES):
    name = item["id"]
    image = np.asarray(Image.open(item["image"]).convert("L"))
    mask = np.asarray(Image.open(Path(OUTPUT, "masks", f"{name}.png"))) > 0
    truth = truths[name]() if name in truths else None
    dice = (
        float(kaggle_dice(torch.as_tensor(mask)[None, None], torch.as_tensor(truth)[None, None]))
        if truth is not None
        else None
    )
    examples.append({"id": name, "image": image, "prediction": mask, "truth": truth, "dice": dice})
picture = Path(PICTURES, "predictions.png")
if examples:
    plot_predictions(examples, picture, f"Predicted nerve outlines ({Path(CHECKPOINT).name}, {INPUT})")
seconds = time.perf_counter() - started
print(
    f"wrote {len(rows)} masks to {OUTPUT}/masks, {OUTPUT}/submission.csv and {picture} in {seconds:.1f} s "
    f"({len(rows) / seconds:.1f} images/s)"
)
if tally.count_empty + tally.count_nonempty:
    scores = tally.summary()
    print(
        f"Kaggle Dice on {scores['images']} images with truth masks: {scores['dice']:.4f} "
        f"(no nerve: {scores['dice_empty']:.4f} on {tally.count_empty}, nerve: {scores['dice_nonempty']:.4f} "
        f"on {tally.count_nonempty})"
    )
