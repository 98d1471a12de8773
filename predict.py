"""Stage 3: segment new images with the trained model; write masks, a Kaggle submission and pictures.

    python predict.py                                   # the cleaned Kaggle test set
    python predict.py --input my_scans/ --output out/   # any folder (and its subfolders) of TIFF, PNG, JPEG, BMP
    python predict.py --input data/clean/held-out/images --masks data/clean/held-out/masks   # also the Dice

Writes OUTPUT/masks/<name>.png (0/255, each image's own size and name, in its subfolder), OUTPUT/submission.csv
(Kaggle format, for a Kaggle test set or with --submission true), OUTPUT/images.csv (per image: the presence
probability, the mask's area, the Dice where a truth is given, an uncertainty from 0 to 1, or why the file was
skipped), OUTPUT/report.html (every image with its outlines, to sort and filter in a browser; see
docs/pipeline.md) and a picture of a few predictions in PICTURES. The rule chosen on the validation subjects at
the end of training (presence threshold, threshold, largest component, minimum area) is read from the checkpoint.
A cross-validated checkpoint (train.py --folds) predicts with the mean of its fold models (--fold k: fold k alone), and
test-time augmentation is used where validation chose it (--tta).
An unreadable file is skipped and named, unless --strict.

The work is kept in chunks in OUTPUT.parts/ until all are done: the same command run again after a crash or a
kill does only what is missing, and `torchrun --nproc_per_node N predict.py ...` shares the chunks among N
processes, on one machine or several (docs/distributed.md).
"""

# %% Import useful libraries
import functools
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import monai
import numpy as np
import torch
from PIL import Image

from nerveseg import distributed
from nerveseg.data import partition
from nerveseg.errors import UserError, die_with_parent, exit_on_user_error
from nerveseg.files import check_can_be_folder, write_csv
from nerveseg.frames import read_image
from nerveseg.images import parse_mask_values
from nerveseg.inference import chunks
from nerveseg.inference.chunks import Chunk, ChunkPlan
from nerveseg.inference.dicom_seg import require_highdicom
from nerveseg.inference.media_outputs import Videos, area_mm2, write_media_outputs
from nerveseg.inference.outputs import OutputFolder, find_truth, pick_examples, truth_of, write_mask
from nerveseg.inference.presence_over_time import PresenceOverTime
from nerveseg.inference.records import IMAGE_COLUMNS, ImageResult, Summary
from nerveseg.inference.report import PAGE_LIMIT, Report, describe_prediction
from nerveseg.inference.uncertainty import MemberOutputs, describe_check
from nerveseg.inputs import ReadableDataset, images_to_segment
from nerveseg.memory import keep_freed_memory
from nerveseg.metrics import describe_scores, kaggle_dice
from nerveseg.pictures import plot_predictions
from nerveseg.postprocess import PostProcessing, full_size_masks
from nerveseg.predictors import ENGINES, load_predictor
from nerveseg.progress import progress
from nerveseg.rle import rle_encode
from nerveseg.settings import AUTO_TRUE_FALSE, Bounds, OneOf, parse_settings
from nerveseg.transforms import collate_keep_sizes, load_transforms

# %% Settings
# -----------------------------------------------------------------------------
# Input and output
CHECKPOINT = "2D_Nerve_Segmentation.pt"  # the model written by train.py (or its .onnx export, by export.py)
INPUT = "data/clean/test"  # a folder of images to segment (subfolders too)
OUTPUT = "predictions"  # masks/, images.csv and submission.csv are written here
SUBMISSION: OneOf(AUTO_TRUE_FALSE) = "auto"  # write submission.csv (auto: for a Kaggle test set, images named <n>.tif)
PICTURES = "Images"  # where the picture of example predictions goes
NUM_PICTURES: Bounds(at_least=0) = 4  # how many images the picture shows
MAX_IMAGE_PIXELS: Bounds(at_least=1) = 25_000_000  # an image of more pixels (width x height) is skipped before decoding
REPORT = True  # write OUTPUT/report.html: every image with its outlines and figures, to sort and filter in a browser
# DICOM and video inputs (every frame is an image, <file>#<frame>; pip install "nerveseg[dicom,video]")
MAX_VIDEO_FRAMES: Bounds(at_least=1) = 54_000  # a video of more frames is skipped before decoding (30 min at 30 fps)
OVERLAY_VIDEOS = True  # write OUTPUT/videos/<name>.mp4 for each input video: the outline, presence and area drawn on it
PRESENCE_WINDOW: Bounds(at_least=1) = 1  # a video frame's presence: the median of this many frames around it (1: off)
DICOM_SEG = False  # write OUTPUT/dicom-seg/<name>.dcm for each DICOM input: a DICOM Segmentation that references it
# Truth masks
MASKS = ""  # a folder of truth masks (<name>.png, <name>_mask.png, ...; may be INPUT itself): also report the Dice
MASK_SUFFIX = "_mask"  # how a truth mask's name ends (<name>_mask.png); files so named in INPUT are not segmented
MASK_VALUES = ""  # the target's values in truth masks that hold several (as data_cleaning.py --mask-values)
# Model
FOLD: Bounds(at_least=0) = 0  # with a cross-validated checkpoint (train.py --folds): 0 all folds' ensemble, k fold k
TTA: OneOf(AUTO_TRUE_FALSE) = "auto"  # test-time augmentation (auto: where validation chose it, see train.py's summary)
# System
BATCH_SIZE: Bounds(at_least=1) = 64  # images per forward pass
DEVICE = "auto"  # auto (GPU if there is one), cpu, cuda, cuda:N
ENGINE: OneOf(ENGINES) = "auto"  # auto: ONNX Runtime for a .onnx and an ImageNet encoder's .pt on the CPU, else PyTorch
NUM_WORKERS: Bounds(at_least=-1) = -1  # processes reading images while the model runs (0: none; -1: spare cores, <= 4)
AMP = True  # mixed precision on CUDA (ignored on CPU)
CHUNK_BATCHES: Bounds(at_least=1) = 16  # batches a chunk (whole files): the work kept at once; a rerun redoes none kept
STRICT = False  # stop at the first unreadable image instead of skipping it and naming it in the summary
QUIET = False  # no progress bar
# -----------------------------------------------------------------------------
exit_on_user_error("predict.py")
globals().update(parse_settings(globals()))
if DICOM_SEG:
    require_highdicom()  # now, not after the masks are written
check_can_be_folder(Path(PICTURES), "--pictures")  # now, not after all the masks are written
mask_values = parse_mask_values(MASK_VALUES)
monai.data.set_track_meta(False)
keep_freed_memory()  # big CPU tensors are reused, not handed back and faulted in again (see nerveseg/memory.py)

# %% Load the model and the images; find the chunks still to do, and this process's share of them
started = time.perf_counter()
process = distributed.start(DEVICE, gpus_shared=True)  # torchrun: a process per GPU or more; else one process
cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # this process's share of the machine
workers = NUM_WORKERS if NUM_WORKERS >= 0 else max(0, min(4, cores - 1))  # the model keeps one core
predictor, checkpoint, engine = load_predictor(CHECKPOINT, process.device, engine=ENGINE, amp=AMP, fold=FOLD,
                                               tta=TTA)
post = PostProcessing(**checkpoint["postprocessing"])
image_size = tuple(checkpoint["preprocessing"]["image_size"])
items = images_to_segment(Path(INPUT), MASK_SUFFIX, max_pixels=MAX_IMAGE_PIXELS, max_video_frames=MAX_VIDEO_FRAMES)
truths = find_truth(items, MASKS, MASK_SUFFIX, mask_values, max_pixels=MAX_IMAGE_PIXELS) if MASKS else {}
kaggle_test_set = all(item["id"].isdigit() and item["image"].lower().endswith((".tif", ".tiff")) for item in items)
write_submission = SUBMISSION == "true" or (SUBMISSION == "auto" and kaggle_test_set)
plans = chunks.plan_chunks(items, BATCH_SIZE * CHUNK_BATCHES)  # whole files, at least this many images each
parts = chunks.parts_folder(Path(OUTPUT))
output, to_do = None, None
if process.is_main:  # the output folder is locked and checked now, not after the work
    output = OutputFolder(Path(OUTPUT), reads=[INPUT, *filter(None, [MASKS]), *{item["image_path"] for item in items}])
    made_with = {  # what a chunk holds depends on these: a rerun with others is refused
        "model file (sha256)": chunks.file_digest(CHECKPOINT), "images (sha256 of the list)": chunks.list_digest(items),
        "--masks": str(Path(MASKS).resolve()) if MASKS else "", "--mask-suffix": MASK_SUFFIX,
        "--mask-values": MASK_VALUES, "--max-image-pixels": MAX_IMAGE_PIXELS, "--max-video-frames": MAX_VIDEO_FRAMES,
        "--fold": FOLD, "--tta": TTA, "--engine": engine, "--amp": AMP, "device": process.device.type,
        "--batch-size": BATCH_SIZE, "--chunk-batches": CHUNK_BATCHES, "--presence-window": PRESENCE_WINDOW,
        "--report": REPORT, "--overlay-videos": OVERLAY_VIDEOS, "--dicom-seg": DICOM_SEG,
    }
    to_do = chunks.open_parts(parts, made_with, len(plans))
to_do = distributed.from_main(to_do, process)
share = [plans[index] for index in partition(to_do, process.rank, process.world_size, pad=False)]
reading = load_transforms(image_size, with_label=False, max_pixels=MAX_IMAGE_PIXELS, max_video_frames=MAX_VIDEO_FRAMES)
dataset = ReadableDataset([item for plan in share for item in items[plan.start:plan.stop]], reading, image_size)
loader = torch.utils.data.DataLoader(  # one for the whole share; its reader processes end with this one
    dataset, batch_sampler=chunks.batches_of(share, BATCH_SIZE), num_workers=workers, collate_fn=collate_keep_sizes,
    worker_init_fn=functools.partial(die_with_parent, os.getpid()),
)
over_time = PresenceOverTime(PRESENCE_WINDOW, dataset, predictor)  # video frames decided on their neighbours
members = MemberOutputs(predictor, post)  # the ensemble's members and test-time augmentation's views, for uncertainty
predicting_with = checkpoint.get("predicting_with") or f"epoch {checkpoint['epoch']}"  # an older export: one model
on = f"{process.world_size} processes on {process.device.type}" if process.world_size > 1 else str(process.device)
done_before = f", {len(plans) - len(to_do)} done by an earlier run" if len(to_do) < len(plans) else ""
process.print0(f"segmenting {len(items)} images from {INPUT} with {CHECKPOINT} ({predicting_with}) on {on} "
               f"({'ONNX Runtime' if engine == 'onnxruntime' else 'PyTorch'})"
               + (f": {len(plans)} chunks{done_before}" if len(plans) > 1 or done_before else ""))


# %% Segment, a chunk at a time: network at its own size, then each mask back at its image's size
@dataclass
class Kept:
    """Where a chunk's work goes: its folder (masks, pictures), its report entries, its videos' frames."""

    folder: Path
    report: Report | None
    videos: Videos


@torch.no_grad()
def segment(batch: dict, kept: Kept) -> list[ImageResult]:
    """The records of one batch: its unreadable files first (or stop, with --strict), then each image with its
    mask written and its pictures drawn."""
    results = [skipped(batch, index, kept) for index, error in enumerate(batch["error"]) if error]
    readable = [index for index, error in enumerate(batch["error"]) if not error]
    if not readable:
        return results
    probabilities, presences = predictor(batch["image"][readable])
    uncertainties = members.uncertainty(probabilities, presences)
    presences = over_time(batch, readable, presences)
    sizes = [tuple(batch["original_size"][index].tolist()) for index in readable]
    masks = full_size_masks(probabilities, presences, sizes, post)
    for index, (_, mask), presence, uncertainty in zip(readable, masks, presences, uncertainties, strict=True):
        results.append(predicted(batch, index, mask, presence, uncertainty, kept))
    return results


def skipped(batch: dict, index: int, kept: Kept) -> ImageResult:
    """The record of a file that could not be read (a video's frame goes to its video's report entry)."""
    if STRICT:
        raise UserError(f"{batch['image_path'][index]}: {batch['error'][index]} (--strict); remove or replace it")
    result = ImageResult(id=batch["id"][index], file=batch["image_path"][index], skipped_because=batch["error"][index])
    if kept.videos.holds(result.file):
        kept.videos.add_skipped(name=result.id, file=result.file, reason=result.skipped_because)
    elif kept.report:
        kept.report.add_skipped(name=result.id, file=result.file, reason=result.skipped_because)
    return result


def predicted(batch: dict, index: int, mask: np.ndarray, presence: float, uncertainty: float,
              kept: Kept) -> ImageResult:
    """Write one image's mask and pictures; its record, with the Dice where it has a readable truth."""
    name, file = batch["id"][index], batch["image_path"][index]
    write_mask(kept.folder, name, mask, then="the chunks done so far are kept: free some space and run again")
    area = int(np.count_nonzero(mask))
    truth, truth_problem = truth_of(truths, name)
    result = ImageResult(id=name, file=file, presence=presence, area=area, pixels=rle_encode(mask),
                         uncertainty=uncertainty, note="; ".join(filter(None, [batch["notes"][index], truth_problem])),
                         seconds=batch["seconds"][index], area_mm2=area_mm2(batch["pixel_area_mm2"][index], area))
    if truth is not None:
        truth = torch.as_tensor(truth).bool()[None, None]
        if truth.shape[-2:] != mask.shape:
            raise UserError(f"the truth mask of {file} is {truth.shape[-1]}x{truth.shape[-2]}, the image "
                            f"{mask.shape[1]}x{mask.shape[0]}; check --masks")
        result.dice = float(kaggle_dice(torch.as_tensor(mask)[None, None], truth)[0])
        truth = truth[0, 0].numpy()
        result.truth_empty = not truth.any()
    if kept.videos.holds(file):
        kept.videos.add(name=name, file=file, seconds=result.seconds, presence=presence, area=area,
                        uncertainty=uncertainty)
    elif kept.report:
        kept.report.add(result, network_image=batch["image"][index, 0].numpy(), mask=mask, truth=truth,
                   frame=batch["frame"][index])
    return result


def segment_share(share: list[ChunkPlan]) -> None:
    """This process's chunks, read by one loader (a batch never spans two chunks), each kept as soon as all its
    images, videos and DICOM SEGs are written."""
    quiet = QUIET or not process.is_main
    batches = iter(progress(loader, desc="predicting", quiet=quiet))  # a bar, or a line every 30 s in a log
    for plan in share:
        chunk = Chunk(parts, plan)
        report = Report(chunk.folder, images=len(items), max_pixels=MAX_IMAGE_PIXELS, first=plan.first_row) if REPORT \
            else None
        kept = Kept(chunk.folder, report, Videos())  # each video of the chunk as one report entry
        while len(chunk.results) < plan.stop - plan.start:
            chunk.results += segment(next(batches), kept)
        media = write_media_outputs(chunk.folder, items[plan.start:plan.stop], kept.videos, report, post,
                                    dicom_seg=DICOM_SEG, overlay_videos=OVERLAY_VIDEOS, max_pixels=MAX_IMAGE_PIXELS)
        chunk.commit(report.rows if report else [], media)


segment_share(share)
if not process.is_main:
    distributed.stop()
    sys.exit(0)


# %% Merge the chunks, in input order: images.csv, submission.csv, the report, masks, videos, DICOM SEGs
def merge() -> tuple[Summary, dict[str, bool], list[str]]:
    """Write the output folder from every chunk (made by all processes, waited for) and swap it in; what the
    chunks hold in all, whether each predicted image has a mask, and the videos and DICOM SEGs written."""
    count = len(plans)
    chunks.wait_for_chunks(parts, count, process.print0)
    summary, has_mask = Summary(), {}

    def image_rows() -> Iterator[dict]:
        for result in chunks.records(parts, count):
            summary.add(result)
            if not result.skipped:
                has_mask[result.id] = result.area > 0
            yield result.csv_row()

    write_csv(output.building / "images.csv", image_rows(), IMAGE_COLUMNS)
    if not summary.predicted:  # the chunks are not kept: a rerun reads the files again (a reader installed since)
        shutil.rmtree(parts, ignore_errors=True)
        raise UserError(f"no image of {INPUT} could be read; the first: {summary.skipped[0].file}: "
                        f"{summary.skipped[0].skipped_because}")
    if write_submission:
        write_csv(output.building / "submission.csv", ({"img": result.id, "pixels": result.pixels} for result in
                                                       chunks.records(parts, count) if not result.skipped),
                  ["img", "pixels"])
    shown = chunks.shown_rows(parts, count, PAGE_LIMIT) if REPORT else None
    report = Report(output.building, images=len(items), max_pixels=MAX_IMAGE_PIXELS) if REPORT else None
    pictures = None if shown is None else {name for row in shown for name in (row["thumb"], row["full"]) if name}
    chunks.link_outputs(parts, count, output.building, pictures=pictures)
    if report:
        about = describe_prediction(CHECKPOINT, checkpoint, engine=engine, input_folder=INPUT, masks_folder=MASKS)
        if shown is not None:
            about.append(("shown here", f"{len(shown)} of the entries, the worst and least certain; images.csv "
                                        "lists every image"))
        report.rows = list(chunks.rows(parts, count)) if shown is None else shown
        report.write(output.building / "report.html", about=about, summary=summary, has_truths=bool(truths),
                     every_row=None if shown is None else chunks.rows(parts, count))
    media = chunks.media(parts, count)
    output.finish()
    shutil.rmtree(parts, ignore_errors=True)
    return summary, has_mask, media


summary, has_mask, media = merge()
distributed.stop()

# %% Pictures and the Dice
examples = []
for item in pick_examples([item for item in items if item["id"] in has_mask], has_mask, NUM_PICTURES):
    name = item["id"]
    image = read_image(item["image"], max_pixels=MAX_IMAGE_PIXELS).pixels
    mask = np.asarray(Image.open(Path(OUTPUT, "masks", f"{name}.png"))) > 0
    truth = truth_of(truths, name)[0]
    dice = (
        float(kaggle_dice(torch.as_tensor(mask)[None, None], torch.as_tensor(truth)[None, None]))
        if truth is not None
        else None
    )
    examples.append({"id": name, "image": image, "prediction": mask, "truth": truth, "dice": dice})
picture = Path(PICTURES, "predictions.png")
replaced = " (replacing the picture of the run before; --pictures DIR keeps it)" if picture.exists() else ""
if examples:
    plot_predictions(examples, picture, f"Predicted outlines ({Path(CHECKPOINT).name}, {INPUT})")
seconds = time.perf_counter() - started
submission = f", {OUTPUT}/submission.csv" if write_submission else ""
pictured = f" and {picture}{replaced}" if examples else ""
submission += f", {OUTPUT}/report.html" if REPORT else ""
submission += "".join(f", {OUTPUT}/{name}" for name in media[:4]) + (f" and {len(media) - 4} more" if media[4:] else "")
print(
    f"wrote {summary.predicted} masks to {OUTPUT}/masks, {OUTPUT}/images.csv{submission}{pictured} in {seconds:.1f} s "
    f"({summary.predicted / seconds:.1f} images/s)"
)
if summary.skipped:
    print(f"skipped {summary.skipped_count} unreadable file(s), listed in {OUTPUT}/images.csv and left out of the "
          "submission:", file=sys.stderr)
    for result in summary.skipped:
        print(f"  {result.file}: {result.skipped_because}", file=sys.stderr)
if summary.noted:
    print(f"{summary.noted_count} image(s) to look at (also in {OUTPUT}/images.csv):", file=sys.stderr)
    for result in summary.noted:
        print(f"  {result.file}: {result.note}", file=sys.stderr)
if scores := summary.scores():
    print(f"Kaggle {describe_scores(scores)} on {scores['images']} images with truth masks; all-empty baseline "
          f"{scores['all_empty_baseline']:.4f}")
    if check := summary.uncertainty_check():
        print(f"uncertainty: {describe_check(check)}")
