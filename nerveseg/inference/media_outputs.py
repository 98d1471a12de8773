"""What predict.py writes for DICOM files and videos beyond each frame's mask: the frame's time and its area in mm²
(images.csv), each video as one entry of the report (its presence and area over time, its doubtful and skipped
frames), an overlay video per input video (nerveseg/inference/overlay_video.py) and a DICOM SEG per DICOM input
(nerveseg/inference/dicom_seg.py, --dicom-seg). The per-frame figures of a video are a few numbers a frame; the
frames themselves are read again from the video and the masks from the written PNGs, one at a time."""

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from nerveseg.dicom import is_dicom_file  # noqa: E402
from nerveseg.frames import split_frame  # noqa: E402
from nerveseg.inference.dicom_seg import write_dicom_segs  # noqa: E402
from nerveseg.inference.overlay_video import OverlayVideo, draw_frame  # noqa: E402
from nerveseg.inference.report import PICTURES, Report  # noqa: E402
from nerveseg.pictures import save_figure  # noqa: E402
from nerveseg.postprocess import PostProcessing  # noqa: E402
from nerveseg.video import inspect_video, is_video_file, video_frames  # noqa: E402

DOUBT_BAND = 0.1  # a frame whose presence lies this close to the presence threshold is doubtful
LISTED = 20  # doubtful and skipped frames named in a video's report entry


def area_mm2(pixel_area_mm2: float | None, area: int) -> float | None:
    """A mask's area in mm², where the size of a pixel is known."""
    return None if pixel_area_mm2 is None else area * pixel_area_mm2


@dataclass
class VideoSeries:
    """One video's frames as predicted: number, time, presence, area (pixels) and uncertainty a frame, and the
    frames skipped with their reasons."""

    name: str
    file: str
    numbers: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    presence: list[float] = field(default_factory=list)
    area: list[int] = field(default_factory=list)
    uncertainty: list[float] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)


class Videos:
    """The videos of a prediction, frame by frame, for the report: `add` a segmented frame, `add_skipped` one that
    was not, then `report` each video as one entry."""

    def __init__(self) -> None:
        self.series: dict[str, VideoSeries] = {}

    @staticmethod
    def holds(file: str) -> bool:
        """Whether an item's file is a video (its frames are reported together)."""
        return is_video_file(file)

    def video(self, name: str, file: str) -> VideoSeries:
        """The series of the video a frame `<name>#<n>` belongs to."""
        return self.series.setdefault(file, VideoSeries(name.rpartition("#")[0] or name, file))

    def add(self, *, name: str, file: str, seconds: float, presence: float, area: int, uncertainty: float) -> None:
        """A segmented frame."""
        series = self.video(name, file)
        series.numbers.append(int(name.rpartition("#")[2] or 1))
        series.seconds.append(seconds)
        series.presence.append(presence)
        series.area.append(area)
        series.uncertainty.append(uncertainty)

    def add_skipped(self, *, name: str, file: str, reason: str) -> None:
        """A frame that could not be read, and why."""
        number = name.rpartition("#")[2]
        self.video(name, file).skipped.append((int(number) if number.isdigit() else 0, reason))

    def report(self, report: Report, *, presence_threshold: float) -> None:
        """Each video as one entry of the report: a plot of its presence and area over time, its doubtful frames
        and its skipped ones."""
        for series in self.series.values():
            if not series.numbers:
                reasons = "; ".join(reason for _, reason in series.skipped[:1])
                report.add_skipped(name=series.name, file=series.file, reason=reasons)
                continue
            number = report.next_number
            thumb = f"{PICTURES}/{number}-video.png"
            plot_series(series, report.folder / thumb, presence_threshold=presence_threshold)
            with Image.open(report.folder / thumb) as picture:
                width, height = picture.size
            scale = 2 * 192 / width
            report.add_video(name=series.name, file=series.file, picture=thumb,
                             size=(round(width * scale), round(height * scale)),
                             text=describe_series(series, presence_threshold=presence_threshold))


def doubtful_frames(series: VideoSeries, *, presence_threshold: float) -> list[int]:
    """The frames whose decision is in doubt: presence within DOUBT_BAND of the threshold, or a decision unlike
    both its neighbours' (a flicker)."""
    present = [value >= presence_threshold for value in series.presence]
    doubtful = []
    for index, number in enumerate(series.numbers):
        near = abs(series.presence[index] - presence_threshold) < DOUBT_BAND
        lone = 0 < index < len(present) - 1 and present[index - 1] == present[index + 1] != present[index]
        if near or lone:
            doubtful.append(number)
    return doubtful


def describe_series(series: VideoSeries, *, presence_threshold: float) -> str:
    """A video's entry in words: frames, where the target was found, doubtful and skipped frames."""
    present = sum(value >= presence_threshold for value in series.presence)
    doubtful = doubtful_frames(series, presence_threshold=presence_threshold)
    text = (f"video: {len(series.numbers)} frames segmented over {series.seconds[-1] - series.seconds[0]:.1f} s, "
            f"target present in {present}; {len(doubtful)} doubtful")
    if doubtful:
        text += " (frames " + ", ".join(map(str, doubtful[:LISTED])) + (", ..." if len(doubtful) > LISTED else "") + ")"
    if series.skipped:
        first = series.skipped[0]
        text += f"; {len(series.skipped)} skipped (frame {first[0]}: {first[1]})"
    return text


def plot_series(series: VideoSeries, path: Path, *, presence_threshold: float) -> None:
    """Presence (with the threshold) and mask area over time, doubtful frames marked."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(6, 3.2), sharex=True)
    top.plot(series.seconds, series.presence, color="#ff3b30", linewidth=1)
    top.axhline(presence_threshold, color="grey", linestyle="--", linewidth=0.8)
    doubtful = set(doubtful_frames(series, presence_threshold=presence_threshold))
    marked = [(s, p) for n, s, p in zip(series.numbers, series.seconds, series.presence, strict=True) if n in doubtful]
    if marked:
        top.plot(*zip(*marked, strict=True), "o", color="#ff9500", markersize=3, label="doubtful")
        top.legend(loc="upper right", fontsize=7)
    top.set(ylabel="presence", ylim=(-0.05, 1.05), title=series.name)
    bottom.plot(series.seconds, series.area, color="#007aff", linewidth=1)
    bottom.set(xlabel="time (s)", ylabel="area (px)")
    save_figure(figure, path)


def write_overlay_videos(folder: Path, videos: Videos, read_mask: Callable[[str], np.ndarray], *,
                         max_pixels: int) -> list[str]:
    """folder/videos/<name>.mp4 for each video: its frames, read again one at a time, with the outline of their
    mask (`read_mask(frame name)`) and their presence and area drawn on them, at its frame rate. Returns the
    names written below `folder`."""
    written = []
    for series in videos.series.values():
        if not series.numbers:
            continue
        figures = dict(zip(series.numbers, zip(series.presence, series.area, strict=True), strict=True))
        video = inspect_video(series.file, max_pixels=max_pixels, max_frames=sys.maxsize)  # bounded when listed
        target = folder / "videos" / f"{series.name}.mp4"
        overlay = OverlayVideo(target, fps=video.fps, width=video.width, height=video.height)
        for frame in video_frames(video):
            if frame.pixels is None:
                continue  # a frame that cannot be decoded is left out
            if frame.number in figures:
                presence, area = figures[frame.number]
                mask, caption = read_mask(f"{series.name}#{frame.number}"), f"presence {presence:.2f}  area {area} px"
            else:
                mask, caption = None, "not segmented"
            overlay.add(draw_frame(frame.pixels, mask, f"{frame.seconds:7.2f} s  {caption}"))
        overlay.close()
        written.append(target.relative_to(folder).as_posix())
    return written


def dicom_inputs(items: list[dict]) -> list[tuple[str, str, int]]:
    """(name, file, frames) of each DICOM input that was listed as frames, in order."""
    found: dict[str, tuple[str, str, int]] = {}
    for item in items:
        path, number = split_frame(item["image"])
        if number and is_dicom_file(path):
            name = item["id"].rpartition("#")[0] if "#" in item["id"] else item["id"]
            previous = found.get(path, (name, path, 0))
            found[path] = (name, path, max(previous[2], number))
    return list(found.values())


def write_media_outputs(folder: Path, items: list[dict], videos: Videos, report: Report | None,
                        post: PostProcessing, *, dicom_seg: bool, overlay_videos: bool, max_pixels: int) -> list[str]:
    """After the masks of `items` are written in `folder` (a chunk being built, see chunks.py): each video's report
    entry, overlay videos (`overlay_videos`) and DICOM SEGs (`dicom_seg`) in `folder`. Returns the names of the
    videos and segmentations written."""

    def read_mask(name: str) -> np.ndarray | None:
        path = folder / "masks" / f"{name}.png"
        if not path.exists():
            return None  # a skipped frame
        with Image.open(path) as picture:
            return np.asarray(picture) > 0

    if report:
        videos.report(report, presence_threshold=post.presence_threshold)
    written = write_overlay_videos(folder, videos, read_mask, max_pixels=max_pixels) if overlay_videos else []
    if dicom_seg:
        segs = write_dicom_segs(folder / "dicom-seg", dicom_inputs(items), read_mask, software=software())
        written += [f"dicom-seg/{name}" for name in segs]
    return written


def software() -> str:
    """nerveseg's version, for the DICOM SEG's Software Versions."""
    try:
        return f"nerveseg {metadata.version('nerveseg')}"
    except metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "nerveseg"
