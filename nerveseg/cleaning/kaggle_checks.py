"""Stage 1's checks of a Kaggle download: every training pair and test image verified and copied byte for byte,
each mask compared with its train_masks.csv row."""

import csv
import io
import re
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from nerveseg.cleaning.clean_copy import CleaningOptions
from nerveseg.cleaning.duplicates import thumbnail_feature
from nerveseg.cleaning.pairs import PairJob, PairResult, PairStatus
from nerveseg.cleaning.parallel import run_parallel
from nerveseg.cleaning.sources import ArchiveCache, Download, Locator, TooLarge, read_csv_text
from nerveseg.errors import UserError
from nerveseg.images import UnreadableImage, frame_count, opened_image
from nerveseg.inputs import natural_key
from nerveseg.rle import rle_encode

TRAIN_NAME = re.compile(r"^(\d+)_(\d+)(_mask)?\.tiff?$", re.IGNORECASE)
TEST_NAME = re.compile(r"^(\d+)\.tiff?$", re.IGNORECASE)
EXPECTED = ("expected 8-bit grayscale TIFFs train/<subject>_<n>.tif with masks train/<subject>_<n>_mask.tif of the "
            "same size, values 0/255")  # said when no usable pair is found

_cache = ArchiveCache()  # the archives this process reads from (each process opens its own)


def read_train_masks_csv(download: Download, options: CleaningOptions) -> dict[str, str] | None:
    """train_masks.csv as id -> run-length text (None: the download has none). Read in this process with an
    archive cache closed before any worker starts: no open archive crosses a fork."""
    if download.train_masks_csv is None:
        return None
    with ArchiveCache() as cache:
        text = read_csv_text(download.train_masks_csv, cache, max_bytes=options.limits()["max_bytes"])
    return parse_train_masks_csv(text, download.train_masks_csv.describe())


def verify_download(
    download: Download, rle_rows: dict[str, str] | None, building: Path, options: CleaningOptions
) -> tuple[list[PairResult], list[dict]]:
    """Verify every training pair and test image in worker processes and copy the usable ones into `building`:
    the training ids' results (ids refused by their names alone, or listed in train_masks.csv but not found,
    included) and the test images' rows."""
    jobs, results = pair_jobs(download, rle_rows, building, options)
    results += verify_in_workers(verify_pair, jobs, options, "training pairs")
    test_jobs, refused = test_image_jobs(download, building, options)
    results += refused
    tests = verify_in_workers(verify_test_image, test_jobs, options, "test images")
    if rle_rows is not None:
        found_ids = {r.id for r in results}
        for missing in sorted(rle_rows.keys() - found_ids, key=natural_key):
            results.append(PairResult(missing, *missing.split("_"),
                                      reason="listed in train_masks.csv but no image or mask file was found"))
    return results, tests


def verify_in_workers(function: Callable[[PairJob], Any], jobs: list[PairJob], options: CleaningOptions,
               description: str) -> list:
    """run_parallel; then this process closes the archives it opened where it did the work itself, so that none
    crosses the next fork."""
    results = run_parallel(function, jobs, options.workers, description, quiet=options.quiet)
    _cache.close()
    return results


def decode_gray8(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, str]:
    """Decode an 8-bit grayscale TIFF of one frame; return (pixels, "") or (empty array, the reason it is unusable)."""
    if not data:
        return np.zeros(0), f"{name} is an empty file"
    try:
        with opened_image(data, name=name, max_pixels=max_pixels) as image:
            image_format, mode, frames = image.format, image.mode, frame_count(image)
            pixels = np.asarray(image)
    except UnreadableImage as error:
        return np.zeros(0), str(error)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        return np.zeros(0), f"{name} cannot be decoded (truncated or not an image: {error})"
    if image_format != "TIFF":
        return np.zeros(0), f"{name} is a {image_format} file, not a TIFF"
    if mode != "L" or pixels.ndim != 2:
        return np.zeros(0), f"{name} is mode {mode}, expected 8-bit grayscale (L)"
    if frames > 1:
        return np.zeros(0), f"{name} holds {frames} frames, expected one image"
    return pixels, ""


def read_unique(locators: list[Locator], name: str, max_bytes: int) -> tuple[bytes, str]:
    """The bytes of a file found once, or found several times with the same content."""
    try:
        contents = {_cache.read(locator, max_bytes=max_bytes) for locator in locators}
    except TooLarge as error:
        return b"", str(error)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        reason = f"{type(error).__name__}: {error}"
        return b"", f"{name} cannot be read ({reason}); the download may be damaged: re-download it"
    if len(contents) > 1:
        places = ", ".join(locator.describe() for locator in locators)
        return b"", f"{name} was found {len(locators)} times with different content ({places}); keep only the right one"
    return contents.pop(), ""


def normalize_mask(mask: np.ndarray) -> tuple[np.ndarray, str, str]:
    """Return (mask as {0, 255}, a note on what was repaired, the reason it is refused).

    A 0/1 mask is repaired (scaled to 0/255: nothing is guessed). Any other value, such as the grey
    edge of an anti-aliased drawing, is refused: which side of the edge is nerve would be a guess.
    """
    values = set(np.flatnonzero(np.bincount(mask.ravel(), minlength=256)).tolist())  # uint8: 3x faster than unique
    if values <= {0, 255}:
        return mask, "", ""
    if values <= {0, 1}:
        return (mask * 255).astype(np.uint8), "repaired: 0/1 mask scaled to 0/255", ""
    shown = sorted(values)[:6]
    return mask, "", f"mask is not binary (values {shown}{'...' if len(values) > 6 else ''}), expected 0/255"


def verify_pair(job: PairJob) -> PairResult:
    """Verify one training id and copy its files into the output folder (runs in a worker process)."""
    result = PairResult(job.id, job.subject, job.frame)
    image_name = job.images[0].describe() if job.images else ""
    mask_name = job.masks[0].describe() if job.masks else ""
    result.original_image, result.original_mask = image_name, mask_name
    if not job.images:
        result.reason = f"mask {mask_name} has no image"
        return result
    if not job.masks:
        result.reason = f"image {image_name} has no mask"
        return result
    image_bytes, problem = read_unique(job.images, image_name, job.max_bytes)
    mask_bytes, mask_duplicate = read_unique(job.masks, mask_name, job.max_bytes)
    problem = problem or mask_duplicate
    image = mask = np.zeros(0)
    if not problem:
        image, problem = decode_gray8(image_bytes, image_name, job.max_pixels)
    if not problem:
        mask, problem = decode_gray8(mask_bytes, mask_name, job.max_pixels)
    if not problem and image.shape != mask.shape:
        problem = f"{mask_name} is {mask.shape[1]}x{mask.shape[0]}, its image is {image.shape[1]}x{image.shape[0]}"
    note = ""
    if not problem:
        mask, note, refused = normalize_mask(mask)
        problem = f"{mask_name}: {refused}" if refused else ""
    rle_text = job.train_masks_row
    if not problem and rle_text is not None and rle_encode(mask) != " ".join(rle_text.split()):
        problem = f"{mask_name} differs from its train_masks.csv row"
    if problem:
        result.reason = problem
        return result
    result.image, result.mask = f"images/{result.id}.tif", f"masks/{result.id}.tif"
    Path(job.output, result.image).write_bytes(image_bytes)
    if note:
        Image.fromarray(mask).save(Path(job.output, result.mask), compression="tiff_lzw")
    else:
        Path(job.output, result.mask).write_bytes(mask_bytes)
    result.height, result.width = mask.shape
    result.mask_area = int(np.count_nonzero(mask))
    result.status, result.reason, result.feature = PairStatus.KEPT, note, thumbnail_feature(image)
    return result


def verify_test_image(job: PairJob) -> dict:
    """Verify one test image and copy it into the output folder (runs in a worker process): its test.csv row."""
    data, problem = read_unique(job.images, job.name, job.max_bytes)
    if not problem:
        _, problem = decode_gray8(data, job.name, job.max_pixels)
    row = {"id": job.id, "image": "", "kept": 0, "reason": problem}
    if not problem:
        row["image"], row["kept"] = f"test/{job.id}.tif", 1
        Path(job.output, row["image"]).write_bytes(data)
    return row


def parse_train_masks_csv(text: str, where: str) -> dict[str, str]:
    """train_masks.csv rows as id -> run-length text."""
    rows = csv.DictReader(io.StringIO(text))
    if rows.fieldnames is None or not {"subject", "img", "pixels"} <= set(rows.fieldnames):
        raise UserError(f"{where} should have the columns subject,img,pixels; re-download it")
    return {f"{row['subject']}_{row['img']}": row["pixels"] or "" for row in rows}


def pair_jobs(
    download: Download, rle_rows: dict[str, str] | None, output: Path, options: CleaningOptions
) -> tuple[list[PairJob], list[PairResult]]:
    """Group the training files by id; names that do not follow <subject>_<n> become results at once."""
    images: dict[tuple[int, int], list[Locator]] = {}
    masks: dict[tuple[int, int], list[Locator]] = {}
    unnamed = []
    for name, locators in download.train.items():
        match = TRAIN_NAME.match(name)
        if not match:
            unnamed.append(PairResult(name, "", "", reason=f"{locators[0].describe()}: name is not <subject>_<n>.tif"))
            continue
        key = (int(match[1]), int(match[2]))
        (masks if match[3] else images).setdefault(key, []).extend(locators)
    jobs = []
    for subject, frame in sorted(images.keys() | masks.keys()):
        pair_id = f"{subject}_{frame}"
        jobs.append(PairJob(pair_id, str(subject), str(frame), images.get((subject, frame), []),
                            masks.get((subject, frame), []), str(output),
                            train_masks_row=None if rle_rows is None else rle_rows.get(pair_id), **options.limits()))
    return jobs, unnamed


def test_image_jobs(
    download: Download, output: Path, options: CleaningOptions
) -> tuple[list[PairJob], list[PairResult]]:
    """The test images in natural order; names that do not follow <n>.tif become results at once."""
    jobs, unnamed = [], []
    for name, locators in sorted(download.test.items(), key=lambda item: natural_key(item[0])):
        match = TEST_NAME.match(name)
        if match:
            jobs.append(PairJob(str(int(match[1])), "", "", locators, [], str(output), **options.limits()))
        else:
            unnamed.append(PairResult(name, "", "", reason=f"{locators[0].describe()}: test image name is not <n>.tif"))
    return jobs, unnamed
