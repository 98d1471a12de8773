"""The presence decision over time (predict.py --presence-window, off by default): in a video, a frame's presence
probability becomes the median of the probabilities of the `window` frames centred on it (fewer at the video's
ends and beside a skipped frame), so that one doubtful frame does not make the outline blink on and off.

The frames after a batch are not predicted yet when the batch's masks are made: their presences are predicted
ahead (the `window // 2` frames after each video's last frame in the batch, read again from the dataset: a few
frames a batch), and the last presences of each video are kept for the next batch. Only video frames are
decided over time; DICOM cine frames and images keep their own presence. How it was judged: docs/results.md.
"""

from collections.abc import Callable, Sequence

import numpy as np
import torch

from nerveseg.video import is_video_file


def median_presence(presences: Sequence[float], window: int) -> list[float]:
    """Each presence replaced by the median of the `window` presences centred on it (fewer at the ends)."""
    reach = window // 2
    return [float(np.median(presences[max(0, index - reach): index + reach + 1])) for index in range(len(presences))]


class PresenceOverTime:
    """Decides each video frame's presence on its `window` neighbours, batch after batch (see the module's
    docstring). `dataset` is the predict.py dataset the batches come from, in order; `predictor` its model."""

    def __init__(self, window: int, dataset: object, predictor: Callable) -> None:
        self.reach, self.dataset, self.predictor = window // 2, dataset, predictor
        self.position = {item["id"]: index for index, item in enumerate(dataset.data)}
        self.recent: dict[str, dict[int, float]] = {}  # a video's last `reach` presences, by frame number

    def __call__(self, batch: dict, readable: list[int], presences: Sequence[float]) -> list[float]:
        """The presences of a batch's readable items, those of video frames decided over time."""
        if self.reach == 0:
            return list(presences)
        known = {file: dict(values) for file, values in self.recent.items()}
        last: dict[str, int] = {}  # each video's last item in the batch, as a position in the dataset
        for index, presence in zip(readable, presences, strict=True):
            file = batch["image_path"][index]
            if is_video_file(file):
                known.setdefault(file, {})[batch["frame"][index]] = presence
                last[file] = max(last.get(file, -1), self.position[batch["id"][index]])
        for file, position in last.items():
            self.predict_ahead(file, position, known[file])
        decided = []
        for index, presence in zip(readable, presences, strict=True):
            file, frame = batch["image_path"][index], batch["frame"][index]
            if not is_video_file(file):
                decided.append(presence)
                continue
            window = [known[file][number] for number in range(frame - self.reach, frame + self.reach + 1)
                      if number in known[file]]
            decided.append(float(np.median(window)))
        for file, position in last.items():
            newest = self.dataset.data[position]["frame"]
            self.recent[file] = {number: value for number, value in known[file].items()
                                 if newest - self.reach < number <= newest}
        return decided

    def predict_ahead(self, file: str, position: int, known: dict[int, float]) -> None:
        """The presences of the `reach` frames of `file` after dataset position `position` (those readable)."""
        ahead = [item for item in (self.dataset[number] for number in range(position + 1, position + 1 + self.reach)
                                   if number < len(self.dataset) and self.dataset.data[number]["image_path"] == file)
                 if not item["error"]]
        if ahead:
            _, presences = self.predictor(torch.stack([item["image"] for item in ahead]))
            known.update({item["frame"]: float(presence) for item, presence in zip(ahead, presences, strict=True)})
