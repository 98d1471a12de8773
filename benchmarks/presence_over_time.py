"""The presence decision over time, judged on synthetic videos with a known truth (predict.py --presence-window).

    python benchmarks/presence_over_time.py --checkpoint 2D_Nerve_Segmentation.pt --videos 4 --frames 90

Each video is a probe sweep of a subject no model has seen (nerveseg/cleaning/synthetic_video.py, its own seed):
the nerve slides out of the field and back, so the truth is empty in some frames. Every frame is segmented as
predict.py does (resized by area, the model, the stored post-processing); then each window's decision
(median of the presence probabilities of that many frames centred on each, nerveseg/inference/presence_over_time)
is scored over all frames: the Kaggle Dice, the Dice on frames with the nerve, the empty frames left empty, and
the flicker: decisions (mask or no mask) that change from one frame to the next where the truth does not, per
100 frames. docs/results.md has the table.
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from nerveseg.cleaning.synthetic_video import sweep_frames
from nerveseg.inference.presence_over_time import median_presence
from nerveseg.metrics import kaggle_dice
from nerveseg.postprocess import PostProcessing, to_mask, upsample
from nerveseg.predictors import load_predictor


def segment(frames: list[np.ndarray], predictor: object, image_size: tuple[int, int], post: PostProcessing
            ) -> tuple[list[float], list[np.ndarray]]:
    """Each frame's presence probability and its mask were the nerve judged present."""
    presences, masks = [], []
    with torch.no_grad():
        for start in range(0, len(frames), 16):
            pixels = torch.from_numpy(np.stack(frames[start:start + 16]).astype(np.float32))[:, None]
            small = F.interpolate(pixels, size=image_size, mode="area").round().clamp(0, 255).to(torch.uint8)
            probabilities, batch_presences = predictor(small)
            for probability in upsample(probabilities, [frame.shape for frame in frames[start:start + 16]]):
                masks.append(to_mask(probability, 1.0, post).astype(bool))
            presences += [float(value) for value in batch_presences]
    return presences, masks


def score(presences: list[float], masks: list[np.ndarray], truths: list[np.ndarray], threshold: float) -> dict:
    """The figures of one decision: Dice (all frames, frames with the nerve), empty frames right, flicker."""
    decided = [mask if presence >= threshold else np.zeros_like(mask) for presence, mask in zip(presences, masks,
                                                                                              strict=True)]
    dice = [float(kaggle_dice(torch.as_tensor(mask)[None, None], torch.as_tensor(truth)[None, None])[0])
            for mask, truth in zip(decided, truths, strict=True)]
    present = [bool(truth.any()) for truth in truths]
    shown = [bool(mask.any()) for mask in decided]
    flicker = sum(shown[t] != shown[t - 1] and present[t] == present[t - 1] for t in range(1, len(shown)))
    return {"dice": dice, "target": [d for d, p in zip(dice, present, strict=True) if p],
            "empty_right": [not s for s, p in zip(shown, present, strict=True) if not p], "flicker": flicker,
            "frames": len(shown)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--frames", type=int, default=90)
    parser.add_argument("--windows", default="1,3,5,7,9")
    options = parser.parse_args()
    predictor, fields, _ = load_predictor(options.checkpoint, torch.device("cpu"), engine="torch", amp=False)
    post = PostProcessing(**fields["postprocessing"])
    image_size = tuple(fields["preprocessing"]["image_size"])
    windows = [int(window) for window in options.windows.split(",")]
    totals = {window: {"dice": [], "target": [], "empty_right": [], "flicker": 0, "frames": 0} for window in windows}
    for video in range(options.videos):
        sweep = sweep_frames(options.frames, subject=1 + video % 3, seed=101 + video)
        presences, masks = segment([image for image, _ in sweep], predictor, image_size, post)
        for window in windows:
            figures = score(median_presence(presences, window), masks, [truth for _, truth in sweep],
                            post.presence_threshold)
            for key in ("dice", "target", "empty_right"):
                totals[window][key] += figures[key]
            totals[window]["flicker"] += figures["flicker"]
            totals[window]["frames"] += figures["frames"]
    print(f"{options.videos} videos of {options.frames} frames, presence threshold {post.presence_threshold}")
    print("| window | Kaggle Dice | Dice on frames with the nerve | empty frames left empty | flicker per 100 frames |")
    print("|---|---|---|---|---|")
    for window, total in totals.items():
        print(f"| {window} | {np.mean(total['dice']):.3f} | {np.mean(total['target']):.3f} "
              f"({len(total['target'])}) | {np.mean(total['empty_right']):.3f} ({len(total['empty_right'])}) | "
              f"{100 * total['flicker'] / total['frames']:.1f} |")


if __name__ == "__main__":
    main()
