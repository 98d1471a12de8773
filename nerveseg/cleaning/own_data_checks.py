"""Stage 1's checks of a user's own data: each image and its masks, in any format, verified and written as PNG."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from nerveseg.cleaning.clean_copy import CleaningOptions
from nerveseg.cleaning.duplicates import thumbnail_feature
from nerveseg.cleaning.layouts import OwnData
from nerveseg.cleaning.pairs import PairJob, PairResult, PairStatus
from nerveseg.cleaning.parallel import run_parallel
from nerveseg.cleaning.sources import Locator
from nerveseg.dicom import is_dicom_file, read_dicom_labels
from nerveseg.frames import read_image, split_frame
from nerveseg.images import (
    UnreadableImage,
    describe_label,
    frame_count,
    mask_labels,
    opened_image,
    target_pixels,
)

EXPECTED = "expected pairs of images and masks of the same size (PNG, JPEG, TIFF, BMP or DICOM)"  # when none is usable


def verify_own_data(
    own: OwnData, subjects: Callable[[str], str | None] | None, building: Path, options: CleaningOptions
) -> list[PairResult]:
    """Verify every pair in worker processes and write the usable ones into `building`: the results, ids without
    a subject included. `subjects` gives each id its subject (None: each image is its own subject)."""
    jobs, results = own_pair_jobs(own, subjects, building, options)
    return results + run_parallel(verify_own_pair, jobs, options.workers, "pairs", quiet=options.quiet)


def own_pair_jobs(
    own: OwnData, subjects: Callable[[str], str | None] | None, output: Path, options: CleaningOptions
) -> tuple[list[PairJob], list[PairResult]]:
    """A job for each pair; ids that `subjects` gives no subject become results at once."""
    jobs, unassigned = [], []
    for pair in own.pairs:
        subject = pair.id if subjects is None else subjects(pair.id)
        if subject is None:
            unassigned.append(PairResult(pair.id, "", "", reason=f"{pair.id}: no subject found for it by --subjects"))
            continue
        jobs.append(PairJob(pair.id, subject, "", [Locator(str(path)) for path in pair.images],
                            [Locator(str(path)) for path in pair.masks], str(output), mask_values=options.mask_values,
                            **options.limits()))
    return jobs, unassigned


def read_own_image(path: str, max_pixels: int) -> tuple[np.ndarray, str, str, str]:
    """(8-bit grayscale pixels, the mode it was converted from or "", notes (see read_gray), the reason it is
    unusable or "")."""
    try:
        image = read_image(path, max_pixels=max_pixels)  # an image file, or a DICOM file's frame (<file>#<n>)
    except UnreadableImage as error:
        return np.zeros(0), "", "", str(error)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        return np.zeros(0), "", "", f"{path} cannot be decoded (truncated or not an image: {error})"
    return image.pixels, image.converted_from, image.notes, ""


def read_mask_labels(path: str, max_pixels: int) -> tuple[np.ndarray, int]:
    """A mask's labels (nerveseg.images.mask_labels; a DICOM mask's stored values, of its frame n for
    `<file>#<n>`) and the number of frames of its file (only the first of a multi-frame image file is used)."""
    file, frame = split_frame(path)
    if is_dicom_file(file):
        return read_dicom_labels(file, frame or 1, max_pixels=max_pixels), 1
    with opened_image(path, max_pixels=max_pixels) as mask_image:
        return mask_labels(mask_image), frame_count(mask_image)


def verify_own_pair(job: PairJob) -> PairResult:
    """Verify one pair of own data and write it into the output folder as 8-bit grayscale PNG and a 0/255 PNG
    mask (runs in a worker process). Several mask files of one image are merged."""
    images, masks = [image.path for image in job.images], [mask.path for mask in job.masks]  # plain files
    result = PairResult(job.id, job.subject, job.frame, original_image=" + ".join(images),
                        original_mask=" + ".join(masks))
    if not images:
        result.reason = f"mask {masks[0]} has no image"
        return result
    if len(images) > 1:
        result.reason = f"image {job.id} was found {len(images)} times ({', '.join(images)}); keep only one"
        return result
    if not masks:
        result.reason = f"image {images[0]} has no mask"
        return result
    image, result.converted_from, image_notes, problem = read_own_image(images[0], job.max_pixels)
    target, mask_notes = np.zeros(image.shape, dtype=bool), []
    for path in masks if not problem else []:
        try:
            labels, frames = read_mask_labels(path, job.max_pixels)
        except UnreadableImage as error:
            problem = str(error)
            break
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
        mask_notes += [f"{path}: first of {frames} frames used"] if frames > 1 else []
    if problem:
        result.reason = problem
        return result
    result.image, result.mask = f"images/{job.id}.png", f"masks/{job.id}.png"
    for name, pixels in ((result.image, image), (result.mask, target.astype(np.uint8) * 255)):
        path = Path(job.output, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, compress_level=3)
    notes = [f"converted from {result.converted_from}" if result.converted_from else "", image_notes,
             f"{len(masks)} mask files merged" if len(masks) > 1 else "", *mask_notes]
    result.height, result.width = image.shape
    result.mask_area = int(np.count_nonzero(target))
    result.status, result.reason = PairStatus.KEPT, "; ".join(filter(None, notes))
    result.feature = thumbnail_feature(image)
    return result
