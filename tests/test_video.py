"""Video in: frames streamed in order with their times; a corrupt frame, a missing one, a size change, an early end
and a video over the length bound each come back with a reason, never as a traceback or unbounded memory."""

import sys
import tracemalloc

import numpy as np
import pytest

from nerveseg import video
from nerveseg.errors import UserError
from nerveseg.images import UnreadableImage
from tests import media

pytest.importorskip("av")


@pytest.fixture(scope="module")
def sweep() -> list[tuple[np.ndarray, np.ndarray]]:
    """60 frames of a nerve sliding out of the field and back, with its masks."""
    return media.moving_nerve(60)


@pytest.fixture(scope="module")
def sweep_video(sweep, tmp_path_factory) -> video.VideoFile:
    """The sweep as an H.264 mp4 at 30 frames a second."""
    path = media.write_video(tmp_path_factory.mktemp("video") / "sweep.mp4", [image for image, _ in sweep])
    return video.inspect_video(path)


def test_the_synthetic_nerve_leaves_the_field_and_comes_back(sweep):
    areas = [int(mask.sum()) for _, mask in sweep]
    assert areas[0] > 2000 and areas[-1] == areas[0] and min(areas) == 0
    assert sum(area == 0 for area in areas) >= 5


def test_frames_stream_in_order_with_their_times(sweep, sweep_video):
    assert (sweep_video.frames, sweep_video.width, sweep_video.height, sweep_video.fps) == (60, 580, 420, 30)
    frames = list(video.video_frames(sweep_video))
    assert [frame.number for frame in frames] == list(range(1, 61))
    assert not any(frame.problem for frame in frames)
    assert frames[30].seconds == pytest.approx(1.0)
    for frame, (image, _) in zip(frames, sweep, strict=True):
        assert frame.pixels.shape == (420, 580) and frame.pixels.dtype == np.uint8
        assert np.abs(frame.pixels.astype(int) - image).mean() < 4  # H.264's loss


def test_memory_does_not_grow_with_the_length(sweep_video):
    tracemalloc.start()
    count = sum(1 for _ in video.video_frames(sweep_video))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 60 and peak < 8 * 420 * 580  # all 60 frames held would be 14.6 MB


def test_frame_reader_reads_forward_backward_and_far(sweep_video):
    streamed = {frame.number: frame.pixels for frame in video.video_frames(sweep_video)}
    reader = video.FrameReader()
    for number in (3, 4, 5, 58, 2, 2, 60, 1):
        assert np.array_equal(reader.read(sweep_video.path, number).pixels, streamed[number]), number
    with pytest.raises(UnreadableImage, match="has 60 frames, not a frame 61"):
        reader.read(sweep_video.path, 61)


def test_a_corrupt_frame_is_named_and_the_rest_read(tmp_path, sweep):
    path = media.write_jpeg_video(tmp_path / "corrupt.avi", [image for image, _ in sweep[:10]], corrupt=[4])
    frames = list(video.video_frames(video.inspect_video(path)))
    assert [frame.number for frame in frames] == list(range(1, 11))
    assert [frame.number for frame in frames if frame.problem] == [5]
    assert frames[4].problem.startswith("a corrupt frame") and frames[4].pixels is None
    with pytest.raises(UnreadableImage, match="frame 5: a corrupt frame"):
        video.FrameReader().read(str(path), 5)


def test_a_size_change_mid_stream_stops_with_its_reason(tmp_path, sweep):
    images = [image for image, _ in sweep[:10]]
    images[6] = images[6][:300, :400]
    frames = list(video.video_frames(video.inspect_video(media.write_jpeg_video(tmp_path / "sizes.avi", images))))
    assert [frame.number for frame in frames] == list(range(1, 8))
    assert "the frame size changes mid-stream, from 580x420 to 400x300" in frames[-1].problem


def test_a_video_that_ends_early_says_so(tmp_path, sweep_video):
    whole = open(sweep_video.path, "rb").read()
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) * 4 // 5])  # the key frame is the first 60%
    cut = video.inspect_video(tmp_path / "cut.mp4")
    assert cut.frames == 60  # as the header (first in the file) announces
    frames = list(video.video_frames(cut))
    given = [frame for frame in frames if frame.pixels is not None]
    assert 5 < len(given) < 60
    assert frames[-1].pixels is None and frames[-1].number == given[-1].number + 1
    assert "ends early" in frames[-1].problem or "cannot be read on" in frames[-1].problem
    with pytest.raises(UnreadableImage, match=r"frame 60: (not read \()?the video ends early"):
        video.FrameReader().read(str(tmp_path / "cut.mp4"), 60)


def test_a_long_video_is_refused_before_decoding(sweep_video):
    with pytest.raises(UnreadableImage, match=r"60 frames \(0:02 at 30 frames a second\), more than the 50 allowed "
                                              r"\(--max-video-frames\)"):
        video.inspect_video(sweep_video.path, max_frames=50)
    assert video.describe_duration(4 * 3600 + 5) == "4:00:05"


def test_what_is_not_a_video(tmp_path):
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(UnreadableImage, match="noise.mp4: not a video this pipeline reads"):
        video.inspect_video(tmp_path / "noise.mp4")
    assert video.is_video_file("a.MOV") and video.is_video_file("b.avi") and not video.is_video_file("c.png")


def test_without_pyav_the_message_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(UserError, match=r'pip install "nerveseg\[video\]"'):
        video.require_av()
