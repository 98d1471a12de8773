"""Video in: the frames of an ultrasound recording (mp4, avi, mov), streamed one at a time as 8-bit grayscale.

`inspect_video` reads a video's header: its size, frame rate and number of frames (counted from the packets where
the header does not say), and refuses one too long for the bound (--max-video-frames) before anything is
decoded. `video_frames` decodes frame after frame, each numbered from its timestamp (1 = the first) with its time
in seconds, so memory does not grow with the video's length. What can go wrong comes back as a frame with a
`problem` instead of pixels, never as an exception in the middle of a video: a corrupt frame (its data cannot
be decoded; the frames after it are read), a frame missing from the stream, a frame size that changes
mid-stream (the rest of the video is not read: one overlay video has one size), a video that ends before the
frames its header announces (a truncated file). `FrameReader` gives frame n of a video on request, decoding
forward from where it last stopped (or from the key frame before n), for a dataset that asks in order.

PyAV (ffmpeg inside the wheel) is the optional extra `video` (pip install "nerveseg[video]").
"""

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import ModuleType

import numpy as np

from nerveseg.errors import UserError
from nerveseg.images import MAX_IMAGE_PIXELS, GrayImage, UnreadableImage, check_regular_file

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov")
MAX_VIDEO_FRAMES = 54_000  # the default bound on a video's frames: 30 minutes at 30 frames a second
SEEK_AHEAD = 120  # FrameReader decodes forward up to this many frames; further, it seeks to the key frame before


def require_av() -> ModuleType:
    """PyAV, or a UserError naming the extra to install."""
    try:
        import av
    except ImportError:
        raise UserError('reading and writing video needs the "video" extra: pip install "nerveseg[video]" (PyAV)') \
            from None
    return av


def is_video_file(path: str | Path) -> bool:
    """A video by its name: .mp4, .avi or .mov."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class VideoFile:
    """A video's header: its frames (announced, or counted), frame size, frame rate and start time in seconds."""

    path: str
    frames: int
    height: int
    width: int
    fps: Fraction
    start: float

    def seconds(self, number: int) -> float:
        """The time of frame `number` (1 = the first) from the start of the video."""
        return (number - 1) / float(self.fps)


def describe_duration(seconds: float) -> str:
    """1:02:03 or 2:03."""
    minutes, second = divmod(round(seconds), 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours}:{minute:02d}:{second:02d}" if hours else f"{minute}:{second:02d}"


def inspect_video(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS,
                  max_frames: int = MAX_VIDEO_FRAMES) -> VideoFile:
    """A video's header; UnreadableImage says why it cannot be segmented (not a video, no video stream, frames
    over `max_pixels` pixels, more than `max_frames` frames)."""
    av = require_av()
    check_regular_file(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UnreadableImage(f"{path}: holds no video stream (sound only?)")
            stream = container.streams.video[0]
            fps = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not fps:
                raise UnreadableImage(f"{path}: its video stream gives no frame rate (damaged header)")
            width, height = stream.codec_context.width, stream.codec_context.height
            start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    except av.error.FFmpegError as error:
        raise UnreadableImage(f"{path}: not a video this pipeline reads ({describe_av_error(error)})") from None
    if width * height > max_pixels:
        raise UnreadableImage(f"{path}: {width}x{height} is {width * height / 1e6:.4g} million pixels a frame, more "
                              f"than the {max_pixels / 1e6:g} million allowed (--max-image-pixels)")
    if frames < 1:
        raise UnreadableImage(f"{path}: holds no frame")
    if frames > max_frames:
        raise UnreadableImage(f"{path}: {frames} frames ({describe_duration(frames / float(fps))} at {float(fps):g} "
                              f"frames a second), more than the {max_frames} allowed (--max-video-frames); cut it "
                              "into parts (ffmpeg -ss START -t SECONDS) or raise the bound")
    return VideoFile(str(path), int(frames), int(height), int(width), Fraction(fps), start)


def describe_av_error(error: Exception) -> str:
    """ffmpeg's message without its errno and function name."""
    text = getattr(error, "strerror", None) or str(error)
    return str(text).splitlines()[0][:160]


@dataclass
class VideoFrame:
    """Frame `number` of a video (1 = the first) at `seconds`, as 8-bit grayscale, or None and the `problem`."""

    number: int
    seconds: float
    pixels: np.ndarray | None
    problem: str = ""


def video_frames(video: VideoFile, *, start: int = 1) -> Iterator[VideoFrame]:
    """The frames of a video from frame `start` on, one at a time, in order; a frame that cannot be given comes
    as a VideoFrame with a problem (see the module's docstring). Never more than video.frames frames."""
    av = require_av()
    last = start - 1  # the number of the last frame given
    try:
        with warnings.catch_warnings(), av.open(video.path) as container:
            warnings.simplefilter("ignore")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if start > 1:
                container.seek(round((video.start + video.seconds(start)) / stream.time_base), stream=stream,
                               backward=True)
            for packet in container.demux(stream):
                try:
                    decoded = packet.decode()
                except av.error.FFmpegError as error:
                    number = frame_number(packet.pts, stream.time_base, video)
                    if number is not None and number > last and number <= video.frames:
                        yield from missing(video, last + 1, number)
                        yield VideoFrame(number, video.seconds(number), None,
                                         f"a corrupt frame: its data cannot be decoded ({describe_av_error(error)})")
                        last = number
                    continue
                for frame in decoded:
                    number = frame_number(frame.pts, stream.time_base, video)
                    number = last + 1 if number is None or number <= last and last >= start else number
                    if number < start:
                        continue  # decoded from the key frame before `start`
                    if number > video.frames:
                        return
                    yield from missing(video, last + 1, number)
                    last = number
                    if (frame.height, frame.width) != (video.height, video.width):
                        yield VideoFrame(number, video.seconds(number), None,
                                         f"the frame size changes mid-stream, from {video.width}x{video.height} to "
                                         f"{frame.width}x{frame.height}; this frame and the rest of the video are "
                                         "not read (split the video where the size changes)")
                        return
                    yield VideoFrame(number, video.seconds(number), frame.to_ndarray(format="gray"))
    except av.error.FFmpegError as error:
        problem = f"the video cannot be read on from here ({describe_av_error(error)})"
        if last < video.frames:
            yield VideoFrame(last + 1, video.seconds(last + 1), None, problem)
        return
    if last < video.frames:
        yield VideoFrame(last + 1, video.seconds(last + 1), None,
                         f"the video ends early: frame {last} is the last of the {video.frames} its header announces "
                         "(a truncated file?)")


def frame_number(pts: int | None, time_base: Fraction, video: VideoFile) -> int | None:
    """A frame's number (1 = the first) from its timestamp, or None where it has none."""
    if pts is None:
        return None
    return round((float(pts * time_base) - video.start) * float(video.fps)) + 1


def missing(video: VideoFile, first: int, after: int) -> Iterator[VideoFrame]:
    """The frames from `first` to just before `after` that the stream skipped."""
    for number in range(first, after):
        yield VideoFrame(number, video.seconds(number), None, "missing from the stream (a dropped or corrupt frame)")


class FrameReader:
    """Frame n of a video on request, for a dataset that reads a video's frames in order (one reader a process):
    each video keeps its decoder open where it stopped; a request behind it, or far ahead, starts again from
    the key frame before n. A frame that cannot be given raises UnreadableImage with its problem."""

    def __init__(self) -> None:
        self.open: dict[str, tuple[VideoFile, Iterator[VideoFrame]]] = {}
        self.current: dict[str, VideoFrame] = {}

    def read(self, path: str, number: int, *, max_pixels: int = MAX_IMAGE_PIXELS,
             max_frames: int = MAX_VIDEO_FRAMES) -> GrayImage:
        """Frame `number` of the video at `path` as 8-bit grayscale."""
        if path not in self.open:
            self.open.clear()  # one video at a time: a dataset moves on from video to video
            self.current.clear()
            video = inspect_video(path, max_pixels=max_pixels, max_frames=max_frames)
            self.open[path] = (video, video_frames(video, start=number))
        video, frames = self.open[path]
        if not 1 <= number <= video.frames:
            raise UnreadableImage(f"{path}: has {video.frames} frames, not a frame {number}")
        current = self.current.get(path)
        if current is not None and not current.number < number <= current.number + SEEK_AHEAD:
            if current.number == number:
                return self.answer(path, current)
            frames = video_frames(video, start=number)
            self.open[path] = (video, frames)
        for frame in frames:
            self.current[path] = frame
            if frame.number >= number:
                return self.answer(path, frame) if frame.number == number else self.gone(path, number, frame)
        return self.gone(path, number, self.current.get(path))

    @staticmethod
    def answer(path: str, frame: VideoFrame) -> GrayImage:
        """The frame's pixels, or its problem raised."""
        if frame.pixels is None:
            raise UnreadableImage(f"{path}: frame {frame.number}: {frame.problem}")
        return GrayImage(frame.pixels, "", "")

    @staticmethod
    def gone(path: str, number: int, last: VideoFrame | None) -> GrayImage:
        """A frame the stream did not reach: the problem that stopped it."""
        why = last.problem if last is not None and last.problem else "the video ends before it"
        raise UnreadableImage(f"{path}: frame {number}: not read ({why})")
