"""Stage 1's checks of a Kaggle download: the training pairs, the test images, train_masks.csv."""

import csv
import io
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from nerveseg.duplicates import thumbnail_feature
from nerveseg.errors import UserError
from nerveseg.pairs import PairResult
from nerveseg.rle import rle_encode
from nerveseg.sources import ArchiveCache, Download, Locator

KAGGLE_SIZE = (420, 580)  # height, width of every competition image
TRAIN_NAME = re.compile(r"^(\d+)_(\d+)(_mask)?\.tiff?$", re.IGNORECASE)
TEST_NAME = re.compile(r"^(\d+)\.tiff?$", re.IGNORECASE)

_cache = ArchiveCache()  # the archives this process reads from (each process opens its own)


def decode_gray8(data: bytes, name: str) -> tuple[np.ndarray, str]:
    """Decode an 8-bit grayscale TIFF; return (pixels, "") or (empty array, the reason it is unusable)."""
    if not data:
        return np.zeros(0), f"{name} is an empty file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format, mode = image.format, image.mode
            pixels = np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        return np.zeros(0), f"{name} cannot be decoded (truncated or not an image: {error})"
    if image_format != "TIFF":
        return np.zeros(0), f"{name} is a {image_format} file, not a TIFF"
    if mode != "L" or pixels.ndim != 2:
        return np.zeros(0), f"{name} is mode {mode}, expected 8-bit grayscale (L)"
    return pixels, ""


def read_unique(locators: list[Locator], name: str) -> tuple[bytes, str]:
    """The bytes of a file found once, or found several times with the same content."""
    try:
        contents = {_cache.read(locator) for locator in locators}
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


def verify_pair(job: tuple) -> PairResult:
    """Verify one training id and copy its files into the output folder (runs in a worker process)."""
    (subject, frame, image_locators, mask_locators, rle_text, output) = job
    result = PairResult(f"{subject}_{frame}", str(subject), str(frame))
    image_name = image_locators[0].describe() if image_locators else ""
    mask_name = mask_locators[0].describe() if mask_locators else ""
    result.original_image, result.original_mask = image_name, mask_name
    if not image_locators:
        result.reason = f"mask {mask_name} has no image"
        return result
    if not mask_locators:
        result.reason = f"image {image_name} has no mask"
        return result
    image_bytes, problem = read_unique(image_locators, image_name)
    mask_bytes, mask_duplicate = read_unique(mask_locators, mask_name)
    problem = problem or mask_duplicate
    image = mask = np.zeros(0)
    if not problem:
        image, problem = decode_gray8(image_bytes, image_name)
    if not problem:
        mask, problem = decode_gray8(mask_bytes, mask_name)
    if not problem and image.shape != mask.shape:
        problem = f"{mask_name} is {mask.shape[1]}x{mask.shape[0]}, its image is {image.shape[1]}x{image.shape[0]}"
    note = ""
    if not problem:
        mask, note, refused = normalize_mask(mask)
        problem = f"{mask_name}: {refused}" if refused else ""
    if not problem and rle_text is not None and rle_encode(mask) != " ".join(rle_text.split()):
        problem = f"{mask_name} differs from its train_masks.csv row"
    if problem:
        result.reason = problem
        return result
    result.image, result.mask = f"images/{result.id}.tif", f"masks/{result.id}.tif"
    Path(output, result.image).write_bytes(image_bytes)
    if note:
        Image.fromarray(mask).save(Path(output, result.mask), compression="tiff_lzw")
    else:
        Path(output, result.mask).write_bytes(mask_bytes)
    result.height, result.width = mask.shape
    result.mask_area = int(np.count_nonzero(mask))
    result.kept, result.reason, result.feature = True, note, thumbnail_feature(image)
    return result


def verify_test_image(job: tuple) -> dict:
    """Verify one test image and copy it into the output folder (runs in a worker process)."""
    number, locators, output = job
    name = locators[0].describe()
    data, problem = read_unique(locators, name)
    if not problem:
        _, problem = decode_gray8(data, name)
    row = {"id": str(number), "image": "", "kept": 0, "reason": problem}
    if not problem:
        row["image"], row["kept"] = f"test/{number}.tif", 1
        Path(output, row["image"]).write_bytes(data)
    return row


def parse_train_masks_csv(text: str, where: str) -> dict[str, str]:
    """train_masks.csv rows as id -> run-length text."""
    rows = csv.DictReader(io.StringIO(text))
    if rows.fieldnames is None or not {"subject", "img", "pixels"} <= set(rows.fieldnames):
        raise UserError(f"{where} should have the columns subject,img,pixels; re-download it")
    return {f"{row['subject']}_{row['img']}": row["pixels"] or "" for row in rows}


def pair_jobs(
    download: Download, rle_rows: dict[str, str] | None, output: Path
) -> tuple[list[tuple], list[PairResult]]:
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
    for key in sorted(images.keys() | masks.keys()):
        rle_text = None if rle_rows is None else rle_rows.get(f"{key[0]}_{key[1]}")
        jobs.append((key[0], key[1], images.get(key, []), masks.get(key, []), rle_text, str(output)))
    return jobs, unnamed
