"""The overlay video: an input video's frames with the predicted outline drawn on them and the presence and area
written in a corner, at the input's frame rate, encoded frame by frame (H.264 in mp4, as browsers play it), so
memory does not grow with the video's length. PyAV is the optional extra `video`."""

from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nerveseg.errors import UserError
from nerveseg.inference.report import PREDICTED, outline
from nerveseg.video import require_av

TEXT, SHADOW = (255, 255, 255), (0, 0, 0)


def draw_frame(image: np.ndarray, mask: np.ndarray | None, caption: str) -> np.ndarray:
    """An 8-bit grayscale frame in colour (H, W, 3) with the outline of `mask` (None: not segmented) and
    `caption` in the top left corner."""
    height, width = image.shape
    picture = np.repeat(image[..., None], 3, axis=2)
    if mask is not None:
        picture[outline(mask.astype(bool), max(1, round(max(height, width) / 300)))] = PREDICTED
    canvas = Image.fromarray(picture)
    size = max(10, round(height / 28))
    ImageDraw.Draw(canvas).text((size // 2, size // 2), caption, fill=TEXT, font=ImageFont.load_default(size),
                                stroke_width=max(1, size // 8), stroke_fill=SHADOW)
    return np.asarray(canvas)


class OverlayVideo:
    """An mp4 written frame by frame: `add` one drawn frame after the other, `close` to finish it. Frames are
    padded by a black row or column to an even size (what H.264's colour subsampling needs). A write that fails
    (a full disk) is a UserError naming the file; the partial file is removed."""

    def __init__(self, path: Path, *, fps: Fraction, width: int, height: int) -> None:
        self.av = require_av()
        self.path, self.error = path, self.av.error.FFmpegError
        self.size = (height + height % 2, width + width % 2)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.container = self.av.open(str(path), "w", options={"movflags": "faststart"})
            self.stream = self.container.add_stream("libx264", rate=fps)
            self.stream.width, self.stream.height = self.size[1], self.size[0]
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"preset": "veryfast", "crf": "23"}
        except (OSError, self.error) as error:
            self.fail(error)

    def add(self, picture: np.ndarray) -> None:
        """One (H, W, 3) RGB frame, the next in time."""
        if picture.shape[:2] != self.size:
            padded = np.zeros((*self.size, 3), np.uint8)
            padded[: picture.shape[0], : picture.shape[1]] = picture
            picture = padded
        frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
        try:
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
        except (OSError, self.error) as error:
            self.fail(error)

    def close(self) -> None:
        """Flush the encoder and finish the file."""
        try:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
        except (OSError, self.error) as error:
            self.fail(error)

    def fail(self, error: Exception) -> None:
        """Remove the partial file and say why."""
        self.path.unlink(missing_ok=True)
        reason = getattr(error, "strerror", None) or str(error)
        raise UserError(f"cannot write {self.path}: {reason}; free some space, choose another --output, or pass "
                        "--overlay-videos false") from None
