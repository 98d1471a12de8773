"""Frames as images: every frame of a DICOM file or a video is an image to segment, named `<file>#<frame>`.

nerveseg/inputs.py lists a DICOM file or a video as its frames (`frame_items`: the header is read, nothing is
decoded): a multi-frame DICOM file `cine.dcm` as the images `cine#1`, `cine#2`, ..., a single-frame one as `cine`,
a video `clip.mp4` as `clip#1`, `clip#2`, ... with each frame's time in seconds; each item also carries the area
of one pixel in mm² where the DICOM file gives it. `read_image` reads any of them, or an image file, as 8-bit
grayscale; a frame that cannot be read raises UnreadableImage with its reason, as an image file does, so every
stage skips it and names it. A file that cannot be listed (truncated, not an image, too long) stays one item
that fails with its reason when read.
"""

import re
from pathlib import Path

import numpy as np

from nerveseg.dicom import inspect_dicom, is_dicom_file, read_dicom_frame, read_dicom_labels
from nerveseg.errors import UserError
from nerveseg.images import (
    MASK_VALUES_FORMS,
    MAX_IMAGE_PIXELS,
    GrayImage,
    MaskValues,
    UnreadableImage,
    describe_label,
    read_gray,
    read_mask,
    target_pixels,
)
from nerveseg.video import MAX_VIDEO_FRAMES, FrameReader, inspect_video, is_video_file

FRAME = re.compile(r"^(?P<path>.+)#(?P<number>\d+)$")  # <file>#<frame>, frames numbered from 1
_frame_reader = None  # the process's nerveseg.video.FrameReader, made at its first video frame


def is_media_file(path: str | Path) -> bool:
    """A DICOM file or a video (by name; a DICOM file without suffix by its marker)."""
    return is_video_file(path) or is_dicom_file(path)


def split_frame(name: str) -> tuple[str, int]:
    """(file, frame number) of `<file>#<frame>`; (name, 0) for a file (a name with # that exists is a file)."""
    match = FRAME.match(name)
    if match is None or Path(name).exists():
        return name, 0
    return match["path"], int(match["number"])


def frame_items(path: Path, identifier: str, *, max_pixels: int = MAX_IMAGE_PIXELS,
                max_video_frames: int = MAX_VIDEO_FRAMES) -> list[dict]:
    """The images of a DICOM file or a video for predict.py: one item a frame, as images_to_segment gives one
    an image file, with "seconds" (a video frame's time) and "pixel_area_mm2" (a DICOM pixel's area, where
    known). A file whose header cannot be read is one item: reading it gives the reason."""
    whole = [{"image": str(path), "image_path": str(path), "id": identifier, **media_fields()}]
    try:
        if is_dicom_file(path):
            info = inspect_dicom(path, max_pixels=max_pixels)
            area = info.pixel_size_mm[0] * info.pixel_size_mm[1] if info.pixel_size_mm else None
            if info.frames == 1:
                return [{**whole[0], "image": f"{path}#1", **media_fields(frame=1, pixel_area_mm2=area)}]
            return [{"image": f"{path}#{number}", "image_path": str(path), "id": f"{identifier}#{number}",
                     **media_fields(frame=number, pixel_area_mm2=area,
                                    seconds=(number - 1) * info.frame_seconds if info.frame_seconds else None)}
                    for number in range(1, info.frames + 1)]
        video = inspect_video(path, max_pixels=max_pixels, max_frames=max_video_frames)
    except UnreadableImage:
        return whole
    return [{"image": f"{path}#{number}", "image_path": str(path), "id": f"{identifier}#{number}",
             **media_fields(frame=number, seconds=video.seconds(number))} for number in range(1, video.frames + 1)]


def media_fields(*, frame: int = 0, seconds: float | None = None, pixel_area_mm2: float | None = None) -> dict:
    """What an item says beyond its file and name, the same keys for every item (a batch lists them): its frame
    number (0 for an image file), its time in seconds and the area of a pixel in mm² (None where not known)."""
    return {"frame": frame, "seconds": seconds, "pixel_area_mm2": pixel_area_mm2}


def frame_name(path: str, frame: int) -> str:
    """What read_image reads: `<file>#<frame>`, or the file itself (frame 0)."""
    return f"{path}#{frame}" if frame else path


def read_image(name: str, *, max_pixels: int = MAX_IMAGE_PIXELS, max_video_frames: int = MAX_VIDEO_FRAMES
               ) -> GrayImage:
    """An image file, or frame n of a DICOM file or video (`<file>#<n>`), as 8-bit grayscale."""
    path, number = split_frame(name)
    if not number and not is_media_file(path):
        return read_gray(path, max_pixels=max_pixels)
    if is_dicom_file(path):
        return read_dicom_frame(path, number or 1, max_pixels=max_pixels)
    global _frame_reader
    if _frame_reader is None:
        _frame_reader = FrameReader()
    return _frame_reader.read(path, number or 1, max_pixels=max_pixels, max_frames=max_video_frames)


def read_truth(path: str | Path, frame: int, rule: MaskValues, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """A truth mask as 0/1 uint8: a mask file (nerveseg.images.read_mask), or frame `frame` of a mask given as
    DICOM; a mask with several values and no `rule` to say which is the target is refused."""
    if not is_dicom_file(path):
        return read_mask(str(path), rule, max_pixels=max_pixels)
    target, several = target_pixels(read_dicom_labels(path, frame, max_pixels=max_pixels), rule)
    if target is None:
        raise UserError(f"{path} (frame {frame}) holds several mask values "
                        f"({', '.join(map(describe_label, several[:8]))}); name the target with --mask-values "
                        f"({MASK_VALUES_FORMS})")
    return target.astype(np.uint8)
