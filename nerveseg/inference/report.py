"""predict.py's report.html: a page of every image with its outlines and figures, to open from disk in a browser.

The page (the template report.html beside this file) holds the figures of every image as JSON and makes the
cards with a small script: sorting, filters and the full-size view need no server and no network. Its
Content-Security-Policy allows only its own style and script (by their sha256) and images from disk, so nothing
can be fetched, and a file name is only ever text: the JSON escapes <, > and &, the script sets textContent.

Each image's picture is a small JPEG in report/ beside the page, loaded when it scrolls into view: a thumbnail
drawn from the image as the network saw it (no second read of the file) with the outlines of the mask (red)
and of the truth (green); for up to FULL_SIZE_LIMIT images also a view at the image's own size, read again.
The page and its pictures are written into predict.py's output folder while it is built, so a new report
replaces an older one at once, with the rest of the folder (outputs.OutputFolder).
"""

import base64
import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nerveseg.errors import UserError
from nerveseg.files import atomic_write, name_text
from nerveseg.frames import frame_name, read_image
from nerveseg.images import MAX_IMAGE_PIXELS
from nerveseg.inference.records import ImageResult, Summary
from nerveseg.inference.uncertainty import describe_check
from nerveseg.inputs import natural_key
from nerveseg.metrics import describe_scores

PICTURES = "report"  # the folder of the pictures, beside report.html
THUMBNAIL_SIDE = 192  # a thumbnail's longer side, in pixels
FULL_SIZE_LIMIT = 1000  # full-size views are written for up to this many images (each is read again)
PAGE_LIMIT = 10_000  # the page shows every entry up to this many; beyond, the worst and least certain (images.csv all)
PREDICTED, TRUTH = (255, 40, 40), (40, 255, 80)  # outline colours
# What the page knows of each file, written as one list per file in this order (the page's script reads them by
# these names): a list of lists keeps a page of 5,508 images small
COLUMNS = ["name", "file", "kind", "presence", "area", "dice", "uncertainty", "truth_empty", "thumb", "width",
           "height", "full", "reason", "area_mm2"]


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The pixels of a bool mask that touch its outside (4-neighbours), `width` pixels deep."""
    inner = mask.copy()
    for _ in range(width):
        padded = np.pad(inner, 1)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def draw_outlines(image: np.ndarray, mask: np.ndarray, truth: np.ndarray | None, width: int) -> Image.Image:
    """An 8-bit grayscale image in colour with the outlines of the truth (under) and the mask."""
    picture = np.repeat(image[..., None], 3, axis=2)
    if truth is not None:
        picture[outline(truth, width)] = TRUTH
    picture[outline(mask, width)] = PREDICTED
    return Image.fromarray(picture)


def resized_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A bool mask at (width, height) `size`."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0


class Report:
    """Collects the images of a prediction, writing each one's pictures at once, then writes the page. `first` is
    the number of the entries before these (a chunk's, see chunks.py): the pictures are named by their number."""

    def __init__(self, folder: Path, *, images: int, max_pixels: int = MAX_IMAGE_PIXELS, first: int = 0) -> None:
        self.folder, self.max_pixels, self.first = folder, max_pixels, first
        self.full_size = images <= FULL_SIZE_LIMIT
        (folder / PICTURES).mkdir()
        self.rows: list[dict] = []  # one per file, with the keys of COLUMNS

    @property
    def next_number(self) -> int:
        """The number of the next entry: what its pictures are named by."""
        return self.first + len(self.rows)

    def add(self, result: ImageResult, *, network_image: np.ndarray, mask: np.ndarray, truth: np.ndarray | None,
            frame: int = 0) -> None:
        """One predicted image, its figures from its record: `network_image` the (h, w) 8-bit image the network
        saw, `mask` and `truth` (bool, or None) at the image's own (H, W) size; `frame` its frame in a DICOM file
        (0: an image file). The record is given the names of its pictures."""
        number = self.next_number
        height, width = mask.shape
        scale = THUMBNAIL_SIDE / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = np.asarray(Image.fromarray(network_image).resize(size, Image.Resampling.BILINEAR))
        small_truth = None if truth is None else resized_mask(truth, size)
        result.thumb = f"{PICTURES}/{number}.jpg"
        self.save(draw_outlines(small, resized_mask(mask, size), small_truth, 1), result.thumb, quality=85)
        result.width, result.height = size
        if self.full_size:
            image = read_image(frame_name(result.file, frame), max_pixels=self.max_pixels).pixels  # as predict read it
            result.full = f"{PICTURES}/{number}-full.jpg"
            line = max(1, round(max(height, width) / 300))
            self.save(draw_outlines(image, mask.astype(bool), truth, line), result.full, quality=90)
        self.rows.append({
            "name": name_text(result.id), "file": name_text(result.file), "kind": result.kind(),
            "presence": round(result.presence, 4), "area": result.area,
            "dice": None if result.dice is None else round(result.dice, 4),
            "uncertainty": round(result.uncertainty, 4), "truth_empty": result.truth_empty, "thumb": result.thumb,
            "width": result.width, "height": result.height, "full": result.full, "reason": "",
            "area_mm2": None if result.area_mm2 is None else round(result.area_mm2, 2),
        })

    def add_skipped(self, *, name: str, file: str, reason: str) -> None:
        """A file that could not be read, and why."""
        self.rows.append({"name": name_text(name), "file": name_text(file), "kind": "skipped", "presence": None,
                          "area": 0, "dice": None,
                          "uncertainty": None, "truth_empty": None, "thumb": "", "width": 0, "height": 0, "full": "",
                          "reason": reason, "area_mm2": None})

    def add_video(self, *, name: str, file: str, picture: str, size: tuple[int, int], text: str) -> None:
        """A video as one entry: `picture` (below the report's folder) its presence and area over time, `text` its
        frames in words (see nerveseg/inference/media_outputs.py)."""
        self.rows.append({"name": name_text(name), "file": name_text(file), "kind": "video", "presence": None,
                          "area": 0, "dice": None,
                          "uncertainty": None, "truth_empty": None, "thumb": picture, "width": size[0],
                          "height": size[1], "full": picture, "reason": text, "area_mm2": None})

    def save(self, picture: Image.Image, relative: str, *, quality: int) -> None:
        """A JPEG beside the page; a full disk is a UserError that names it."""
        path = self.folder / relative
        try:
            picture.save(path, quality=quality)
        except OSError as error:
            path.unlink(missing_ok=True)
            raise UserError(f"cannot write {path}: {error.strerror}; free some space, choose another --output, or "
                            "pass --report false") from None

    def write(self, path: Path, *, about: list[tuple[str, str]], summary: Summary, has_truths: bool,
              every_row: Iterable[dict] | None = None) -> None:
        """The page, atomically: `about` the lines of what predicted with what; the Dice and the uncertainty check
        from `summary`, gathered from the same records. The counts are of `every_row` (one at a time, in input
        order) where the page shows only some (the rows given to this Report); of the page's rows otherwise."""
        self.rows.sort(key=row_order)  # as images.csv: "2" before "10"
        kinds: Counter = Counter()
        empty, skipped, videos = 0, [], []
        for row in self.rows if every_row is None else every_row:
            kinds[row["kind"]] += 1
            empty += row["kind"] not in ("skipped", "video") and row["area"] == 0
            listed = {"skipped": skipped, "video": videos}.get(row["kind"])
            if listed is not None and len(listed) < 20:
                listed.append(row)
        predicted = sum(kinds.values()) - kinds["skipped"] - kinds["video"]
        lines = [*about, ("images", f"{predicted} predicted, {kinds['skipped']} skipped; {empty} empty masks")]
        lines += [(f"skipped {row['file']}", row["reason"]) for row in sorted(skipped, key=row_order)]
        lines += [(f"video {row['file']}", row["reason"]) for row in sorted(videos, key=row_order)]
        if scores := summary.scores():
            lines.append(("Kaggle Dice", f"{describe_scores(scores)}; all-empty baseline "
                                         f"{scores['all_empty_baseline']:.4f}"))
            counts = ", ".join(f"{kinds[kind]} {kind}" for kind in
                               ("hit", "miss", "true empty", "false empty", "stray mask"))
            lines.append(("cases", counts))
            if check := summary.uncertainty_check():
                lines.append(("uncertainty", describe_check(check)))
        data = {"columns": COLUMNS, "rows": [[row[column] for column in COLUMNS] for row in self.rows],
                "summary": lines, "has_truths": has_truths, "full_size_limit": FULL_SIZE_LIMIT}
        with atomic_write(path) as file:
            file.write(page(data))


def row_order(row: dict) -> tuple:
    """The page's order of its rows: by name, "2" before "10" (as images.csv)."""
    return natural_key(row["name"])


def page(data: dict) -> str:
    """The template filled with `data`: its JSON made safe inside a script element, the policy with the hashes
    of the template's own style and script."""
    template = resources.files("nerveseg.inference").joinpath("report.html").read_text(encoding="utf-8")
    hashes = {kind: f"'sha256-{digest(text)}'" for kind, text in (
        ("style", re.search(r"<style>(.*?)</style>", template, re.S).group(1)),
        ("script", re.search(r"<script>(.*?)</script>", template, re.S).group(1)),
    )}
    policy = (f"default-src 'none'; img-src 'self' file:; style-src {hashes['style']}; "
              f"script-src {hashes['script']}; base-uri 'none'; form-action 'none'")
    text = json.dumps(without_nan(data), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")  # never ends the element
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return template.replace("@CSP@", policy, 1).replace("@DATA@", text, 1)


def without_nan(value: Any) -> Any:
    """`value` with every NaN or infinite number made None (shown blank): bare NaN is not JSON, and would stop the
    page's script."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_nan(item) for item in value]
    return value


def digest(text: str) -> str:
    """A CSP hash source's value: base64 of the sha256 of the UTF-8 text."""
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def describe_prediction(checkpoint_path: str, checkpoint: dict, *, engine: str, input_folder: str,
                        masks_folder: str) -> list[tuple[str, str]]:
    """The page's lines on what was predicted with what: the model, its training data and validation figures,
    ensemble and test-time augmentation, post-processing."""
    settings, metrics = checkpoint.get("settings") or {}, checkpoint.get("metrics") or {}
    predicting_with = checkpoint.get("predicting_with") or f"epoch {checkpoint.get('epoch')}"
    lines = [("input", name_text(input_folder) + (f" (truths: {name_text(masks_folder)})" if masks_folder else "")),
             ("model", f"{checkpoint_path}: {predicting_with}, run by "
                       f"{'ONNX Runtime' if engine == 'onnxruntime' else 'PyTorch'}")]
    if settings:
        size = f"{settings.get('image_height', '?')}x{settings.get('image_width', '?')}"
        lines.append(("trained on", f"{settings.get('data_dir', '?')}, up to {settings.get('max_epochs', '?')} "
                                    f"epochs at {size}"))
    if "postprocessed" in metrics:
        lines.append(("validation", f"{describe_scores(metrics['postprocessed'])} on the validation images"))
    elif "cross_validation" in metrics:
        pooled = metrics["cross_validation"]["pooled"]["postprocessed"]
        lines.append(("validation", f"{describe_scores(pooled)}, all folds' validation images pooled"))
    tta = checkpoint.get("tta") or {}
    lines.append(("test-time augmentation", "on" if tta.get("use") else "off"))
    post = checkpoint.get("postprocessing") or {}
    largest = "on" if post.get("keep_largest") else "off"
    lines.append(("post-processing", f"presence below {post.get('presence_threshold')} means empty, threshold "
                                     f"{post.get('threshold')}, largest component {largest}, minimum area "
                                     f"{post.get('min_area_fraction', 0):.2%} of the image"))
    return lines
