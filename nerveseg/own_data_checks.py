"""Stage 1's checks of a user's own data: one image and its masks, in any format, written as PNG."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from nerveseg.duplicates import thumbnail_feature
from nerveseg.images import MaskValues, describe_label, mask_labels, target_pixels, to_grayscale
from nerveseg.pairs import PairResult


@dataclass
class OwnPairJob:
    """What a worker needs to verify one pair of a user's own data."""

    id: str
    subject: str
    images: list[str]
    masks: list[str]
    mask_values: MaskValues
    output: str


def read_own_image(path: str) -> tuple[np.ndarray, str, str]:
    """(8-bit grayscale pixels, the mode it was converted from or "", the reason it is unusable or "")."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            pixels = np.asarray(to_grayscale(image))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        return np.zeros(0), "", f"{path} cannot be decoded (truncated or not an image: {error})"
    return pixels, "" if mode == "L" else mode, ""


def verify_own_pair(job: OwnPairJob) -> PairResult:
    """Verify one pair of own data and write it into the output folder as 8-bit grayscale PNG and a 0/255 PNG
    mask (runs in a worker process). Several mask files of one image are merged."""
    result = PairResult(job.id, job.subject, "", original_image=" + ".join(job.images),
                        original_mask=" + ".join(job.masks))
    if not job.images:
        result.reason = f"mask {job.masks[0]} has no image"
        return result
    if len(job.images) > 1:
        result.reason = f"image {job.id} was found {len(job.images)} times ({', '.join(job.images)}); keep only one"
        return result
    if not job.masks:
        result.reason = f"image {job.images[0]} has no mask"
        return result
    image, result.converted_from, problem = read_own_image(job.images[0])
    target = np.zeros(image.shape, dtype=bool)
    for path in job.masks if not problem else []:
        try:
            with Image.open(path) as mask_image:
                labels = mask_labels(mask_image)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            problem = f"{path} cannot be decoded (truncated or not an image: {error})"
            break
        if labels.shape != image.shape:
            problem = (f"{path} is {labels.shape[1]}x{labels.shape[0]}, its image is "
                       f"{image.shape[1]}x{image.shape[0]}")
            break
        part, result.several_values = target_pixels(labels, job.mask_values)
        if part is None:
            shown = ", ".join(map(describe_label, result.several_values[:8]))
            problem = f"{path} holds several mask values ({shown}); name the target with --mask-values"
            break
        target |= part
    if problem:
        result.reason = problem
        return result
    result.image, result.mask = f"images/{job.id}.png", f"masks/{job.id}.png"
    for name, pixels in ((result.image, image), (result.mask, target.astype(np.uint8) * 255)):
        path = Path(job.output, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, compress_level=3)
    notes = [f"converted from {result.converted_from}" if result.converted_from else "",
             f"{len(job.masks)} mask files merged" if len(job.masks) > 1 else ""]
    result.height, result.width = image.shape
    result.mask_area = int(np.count_nonzero(target))
    result.kept, result.reason, result.feature = True, "; ".join(filter(None, notes)), thumbnail_feature(image)
    return result
