"""Pixels in, pixels out: any image file safely decoded, as 8-bit grayscale, and any mask as target or background.

One definition for every stage: every image and mask file is decoded by `opened_image` (a regular file only,
at most MAX_IMAGE_PIXELS pixels, checked in its header before decoding, and turned upright by its EXIF
orientation); data_cleaning.py converts a user's images with `to_grayscale` and their masks with `mask_labels`
and `target_pixels`; train.py and predict.py read images through the same `read_gray` (nerveseg/transforms.py),
so a 16-bit, colour or rotated image looks the same to the network in training and in prediction.
"""

import io
import os
import re
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from nerveseg.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # more than 8 bits a pixel
COLOUR = 1 << 24  # a label at or above this is a colour, COLOUR + 0xRRGGBB; below it, a grey (or 16-bit) value
MAX_IMAGE_PIXELS = 25_000_000  # the default bound on an image's width x height (5000 x 5000), checked before decoding
FILE_KINDS = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a named pipe", stat.S_ISCHR: "a character device",
              stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}


class UnreadableImage(UserError):
    """An image file refused before or while decoding; the message names the file and says why."""


def check_regular_file(path: str | Path) -> None:
    """Refuse anything but a regular file (a symbolic link to one is fine) before it is opened: reading a named
    pipe waits for ever, and a device never ends."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise UnreadableImage(f"{path}: cannot be read ({error.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = next((kind for test, kind in FILE_KINDS.items() if test(mode)), "not a regular file")
        raise UnreadableImage(f"{path}: {kind}, not an image file; move it out of the folder")


@contextmanager
def opened_image(
    file: str | Path | bytes, *, name: str = "", max_pixels: int = MAX_IMAGE_PIXELS
) -> Iterator[Image.Image]:
    """An image file (a path, or the bytes of an archive member called `name`) opened, checked and decoded: a
    regular file only; at most `max_pixels` pixels, read from the header before anything is decoded (a 15 MB PNG
    can hold 144 million pixels); turned upright by its EXIF orientation (as every viewer shows it). A multi-frame
    file (TIFF, GIF, APNG) gives its first frame. Raises UnreadableImage for the first two; PIL's own errors for a
    damaged file pass through."""
    name = name or str(file)
    if not isinstance(file, bytes):
        check_regular_file(file)
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, max_pixels)  # PIL's own bound never below ours
    too_many = f"more than the {max_pixels / 1e6:g} million allowed (--max-image-pixels); shrink it, or raise the bound"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own bound follows
            image = Image.open(io.BytesIO(file) if isinstance(file, bytes) else file)
    except Image.DecompressionBombError:  # over twice PIL's bound: refused by PIL before ours is checked
        bound = 2 * Image.MAX_IMAGE_PIXELS / 1e6
        raise UnreadableImage(f"{name}: over {bound:.0f} million pixels, {too_many}") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise UnreadableImage(f"{name}: {width}x{height} is {width * height / 1e6:.4g} million pixels, {too_many} "
                                  "where the memory allows (see docs/reliability.md)")
        ImageOps.exif_transpose(image, in_place=True)  # decodes the first frame
        yield image


def frame_count(image: Image.Image) -> int:
    """How many frames (pages of a TIFF, frames of a GIF or APNG) the file holds; only the first is used."""
    return getattr(image, "n_frames", 1)


def to_grayscale(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit grayscale ("L"): colours by luminance (PIL's ITU-R 601 weights), alpha ignored,
    16-bit and floating-point images stretched linearly from their lowest to their highest finite value
    (NaN and infinite pixels are ignored by the stretch and become black)."""
    if image.mode == "L":
        return image
    if image.mode in WIDE_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        finite = np.isfinite(pixels)
        values = pixels[finite] if not finite.all() else pixels
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
        return Image.fromarray(np.round(np.where(finite, scaled, 0.0)).astype(np.uint8))
    return image.convert("L")


@dataclass
class GrayImage:
    """An image file as 8-bit grayscale pixels, the mode it was converted from ("" for "L"), and notes on what a
    user should know about it ("" or, for example, "first of 3 frames used")."""

    pixels: np.ndarray
    converted_from: str
    notes: str


def read_gray(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> GrayImage:
    """An image file as 8-bit grayscale, through `opened_image` and `to_grayscale`, with its notes."""
    with opened_image(path, max_pixels=max_pixels) as image:
        mode, frames = image.mode, frame_count(image)
        non_finite = int(np.count_nonzero(~np.isfinite(np.asarray(image)))) if mode == "F" else 0
        pixels = np.asarray(to_grayscale(image))
    notes = [f"first of {frames} frames used" if frames > 1 else "",
             f"{non_finite} non-finite pixels shown black" if non_finite else ""]
    return GrayImage(pixels, "" if mode == "L" else mode, "; ".join(filter(None, notes)))


def mask_labels(image: Image.Image) -> np.ndarray:
    """Each pixel's label as int64: its grey (or 16-bit, or palette colour's grey) value, or COLOUR + 0xRRGGBB
    where the mask is in colour (red, green and blue differ somewhere). Black is 0 either way; alpha is ignored."""
    if image.mode in ("1", "L", *WIDE_MODES):
        return np.asarray(image).astype(np.int64)
    rgb = np.asarray(image.convert("RGB")).astype(np.int64)
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0]
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    return np.where(code > 0, COLOUR + code, 0)


def describe_label(label: int) -> str:
    """A label as the user writes it in --mask-values: 255, or #ff0000 for a colour."""
    return f"#{label - COLOUR:06x}" if label >= COLOUR else str(label)


@dataclass(frozen=True)
class MaskValues:
    """Which mask values mean "target". `text` as given: "" (each mask holds one non-zero value, whatever it
    is: 0/255, 0/1 or one colour), "any" (every non-zero value), or a list of values, ranges and colours."""

    text: str = ""
    ranges: tuple[tuple[int, int], ...] = ()


MASK_VALUES_FORMS = '"any", or values, ranges and colours such as "1", "1,2", "128-255" or "#ff0000,#00ff00"'


def parse_mask_values(text: str) -> MaskValues:
    """Read --mask-values; a UserError says what forms it takes."""
    text = text.strip()
    if text in ("", "any"):
        return MaskValues(text)
    ranges = []
    for token in re.split(r"[,\s]+", text):
        if re.fullmatch(r"#[0-9a-fA-F]{6}", token):
            value = COLOUR + int(token[1:], 16)
            ranges.append((value, value))
        elif match := re.fullmatch(r"(\d+)(?:-(\d+))?", token):
            low, high = int(match[1]), int(match[2] or match[1])
            if low > high or low == 0:
                raise UserError(f"--mask-values: {token!r} must be a non-zero value or a rising range, such as 128-255")
            ranges.append((low, high))
        elif token:
            raise UserError(f"--mask-values takes {MASK_VALUES_FORMS}, not {text!r}")
    return MaskValues(text, tuple(ranges))


def target_pixels(labels: np.ndarray, rule: MaskValues) -> tuple[np.ndarray, list[int]]:
    """(the target as a bool array, []) or, where `rule` is "" and the mask holds several non-zero values,
    (None, those values): which of them is the target is for the user to say (--mask-values)."""
    if rule.text == "any":
        return labels != 0, []
    if rule.text == "":
        values = np.unique(labels)
        values = values[values != 0]
        return (labels != 0, []) if len(values) <= 1 else (None, values.tolist())
    target = np.zeros(labels.shape, dtype=bool)
    for low, high in rule.ranges:
        target |= (labels >= low) & (labels <= high)
    return target, []


def read_mask(path: str, rule: MaskValues, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """A mask file as 0/1 uint8 (for truths in predict.py); a mask with several values and no rule is refused."""
    with opened_image(path, max_pixels=max_pixels) as image:
        labels = mask_labels(image)
    target, several = target_pixels(labels, rule)
    if target is None:
        raise UserError(f"{path} holds several mask values ({', '.join(map(describe_label, several[:8]))}); "
                        f"name the target with --mask-values ({MASK_VALUES_FORMS})")
    return target.astype(np.uint8)
