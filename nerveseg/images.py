"""Pixels in, pixels out: any image as 8-bit grayscale and any mask as target or background.

One definition for every stage: data_cleaning.py converts a user's images with `to_grayscale` and their
masks with `mask_labels` and `target_pixels`; train.py and predict.py read images through the same
`to_grayscale` (nerveseg/transforms.py), so a 16-bit or colour image looks the same to the network in
training and in prediction.
"""

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from nerveseg.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # more than 8 bits a pixel
COLOUR = 1 << 24  # a label at or above this is a colour, COLOUR + 0xRRGGBB; below it, a grey (or 16-bit) value


def to_grayscale(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit grayscale ("L"): colours by luminance (PIL's ITU-R 601 weights), alpha ignored,
    16-bit and floating-point images stretched linearly from their lowest to their highest value."""
    if image.mode == "L":
        return image
    if image.mode in WIDE_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
        return Image.fromarray(np.round(scaled).astype(np.uint8))
    return image.convert("L")


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


def read_mask(path: str, rule: MaskValues) -> np.ndarray:
    """A mask file as 0/1 uint8 (for truths in predict.py); a mask with several values and no rule is refused."""
    with Image.open(path) as image:
        labels = mask_labels(image)
    target, several = target_pixels(labels, rule)
    if target is None:
        raise UserError(f"{path} holds several mask values ({', '.join(map(describe_label, several[:8]))}); "
                        f"name the target with --mask-values ({MASK_VALUES_FORMS})")
    return target.astype(np.uint8)
