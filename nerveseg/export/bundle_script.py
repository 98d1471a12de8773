"""A MONAI Bundle's scripts/images.py: which images the bundle segments, and the skipping of an unreadable one.

Stock MONAI runs the bundle with nothing of this project, so the bundle carries predict.py's finder
(nerveseg/inputs.py images_to_segment, and natural_key's order), copied from that module's source when the bundle
is written: the bundle segments the image files predict.py segments (a truth mask, a masks/ folder beside
images/, a folder reached twice through a link are not), in its order; DICOM files and videos, which stock MONAI's
PIL reader cannot read, are left to predict.py. configs/inference.json loads the file from the
bundle's own folder (runpy) and takes `datalist` and `SkippingDataset` from it.
"""

import inspect
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from monai.data import Dataset
from PIL import Image

from nerveseg import inputs
from nerveseg.images import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS
from nerveseg.inputs import images_to_segment
from nerveseg.video import MAX_VIDEO_FRAMES

HEADER = '''"""The images this bundle segments: those predict.py segments, in its order (its finder, copied from
nerveseg/inputs.py by export.py), read by a dataset that skips an unreadable image with a one-line message."""

import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from monai.data import Dataset
from PIL import Image


class UserError(Exception):
    """A folder that holds no image to segment, or two images of one name; the message says what to do."""


def is_media_file(path: Path) -> bool:
    """DICOM files and videos are predict.py's alone: this bundle reads image files (with PIL), and leaves them."""
    return False


def media_fields() -> dict:
    """An image file's item holds its file and its name, nothing more, here."""
    return {}


def frame_items(path: Path, identifier: str, **limits: int) -> list[dict]:
    """Never called here (is_media_file is False): the frames of DICOM files and videos are predict.py's."""
    raise UserError(f"{path}: DICOM files and videos are segmented by predict.py, not by this bundle")


'''
CONSTANTS = {"IMAGE_SUFFIXES": IMAGE_SUFFIXES, "MAX_IMAGE_PIXELS": MAX_IMAGE_PIXELS,
             "MAX_VIDEO_FRAMES": MAX_VIDEO_FRAMES, "IMAGE_FOLDERS": inputs.IMAGE_FOLDERS,
             "MASK_FOLDERS": inputs.MASK_FOLDERS, "PIPELINE_MARKERS": inputs.PIPELINE_MARKERS}
FINDER = (inputs.skipped_folder, inputs.image_files, inputs.mask_name_pattern, inputs.relative_id, inputs.join_id,
          inputs.id_of, inputs.folder_pairs, inputs.images_to_segment, inputs.natural_key)


def datalist(dataset_dir: str, mask_suffix: str) -> list[str]:
    """The images below `dataset_dir` that predict.py --input dataset_dir segments, in its order."""
    return [item["image"] for item in images_to_segment(Path(dataset_dir), mask_suffix, option="--dataset_dir")]


class SkippingDataset(Dataset):
    """A Dataset whose unreadable image (damaged, not an image) becomes a blank one with "error" set, the
    one-line message that names it, so that the batch is still made (as predict.py makes it) and the others get
    their masks; "error" is "" for the images read. The blank image is a file read by the same transforms, so
    that it carries the metadata the others carry (MONAI's collation drops a batch's metadata otherwise)."""

    def __init__(self, data: list[dict], transform: Callable, image_size: list[int]) -> None:
        super().__init__(data, transform)
        self.image_size = image_size
        self.blank: dict | None = None

    def _transform(self, index: int) -> dict:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return {**super()._transform(index), "error": ""}
        except Exception as error:  # any reader failure: truncated, not an image, unsupported mode
            cause = error
            while cause.__cause__ or cause.__context__:  # MONAI wraps the reader's own error
                cause = cause.__cause__ or cause.__context__
            reason = (str(cause).splitlines() or [type(cause).__name__])[0][:200]
            return {**self.blank_image(), "error": f"skipped {self.data[index]['image']}: it cannot be read "
                                                   f"({reason}); no mask written"}

    def blank_image(self) -> dict:
        """A black image of the network's size, read and transformed as the others are (once)."""
        if self.blank is None:
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "blank.png")
                Image.new("L", tuple(reversed(self.image_size))).save(path)
                self.blank = self.transform({"image": path})
        return self.blank


def bundle_script() -> str:
    """The text of scripts/images.py."""
    constants = "".join(f"{name} = {value!r}\n" for name, value in CONSTANTS.items())
    functions = [inspect.getsource(function) for function in (*FINDER, datalist, SkippingDataset)]
    return HEADER + constants + "\n\n" + "\n\n".join(functions)
