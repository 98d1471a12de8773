"""Real time: frames a second of the whole video path (decode, segment, draw, encode) against a live scanner's 30.

    python benchmarks/video_realtime.py --checkpoint 2D_Nerve_Segmentation.pt            # both engines
    python benchmarks/video_realtime.py --checkpoint model.pt --engine torch --frames 300

A synthetic 580 x 420 video (the nerve sliding out of the field and back, nerveseg/cleaning/synthetic.py) is
written first; then each engine runs the path a live display would, one frame at a time: decode the frame
(nerveseg/video.py), resize it to the network's size, segment it (the model, post-processing and the mask at
full size, as predict.py does), draw the outline and figures, encode it (nerveseg/inference/overlay_video.py).
Printed per engine: frames a second (wall), CPU seconds a frame, and the share of each step, with the load
average of the machine (other processes on the same cores slow every step). docs/performance.md has the figures.
"""

import argparse
import os
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nerveseg.cleaning import synthetic
from nerveseg.cleaning.synthetic_video import sweep_frames
from nerveseg.inference.overlay_video import OverlayVideo, draw_frame
from nerveseg.onnx_model import onnx_graph
from nerveseg.postprocess import PostProcessing, to_mask, upsample
from nerveseg.predictors import load_predictor, prediction_model
from nerveseg.video import inspect_video, video_frames

STEPS = ("decode", "segment", "draw", "encode")
LIVE_FPS = 30  # a scanner's live display


class Clock:
    """Wall and CPU seconds of each step, summed over frames."""

    def __init__(self) -> None:
        self.wall = dict.fromkeys(STEPS, 0.0)
        self.cpu = dict.fromkeys(STEPS, 0.0)
        self.started = (time.perf_counter(), time.process_time())

    def lap(self, step: str) -> None:
        """Charge the time since the last lap to `step`."""
        now = (time.perf_counter(), time.process_time())
        self.wall[step] += now[0] - self.started[0]
        self.cpu[step] += now[1] - self.started[1]
        self.started = now


def run_path(video_path: Path, checkpoint: str, engine: str, output: Path, *, threads: int) -> dict:
    """The live path over every frame of the video with one engine; its figures."""
    predictor, fields, engine = load_predictor(checkpoint, torch.device("cpu"), engine=engine, amp=False)
    post = PostProcessing(**fields["postprocessing"])
    image_size = tuple(fields["preprocessing"]["image_size"])
    if engine == "onnxruntime" and threads and str(checkpoint).endswith(".pt"):  # ONNX Runtime on `threads` too
        import onnxruntime

        model, _ = prediction_model(checkpoint, torch.device("cpu"), fold=0, tta="auto")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        graph = onnx_graph(model, image_size, has_presence=fields["model_config"].get("presence", False))
        predictor.session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    video = inspect_video(video_path)
    overlay = OverlayVideo(output, fps=video.fps, width=video.width, height=video.height)
    clock, count = Clock(), 0
    started = (time.perf_counter(), time.process_time(), os.getloadavg()[0])
    with torch.no_grad():
        for frame in video_frames(video):
            clock.lap("decode")
            pixels = torch.from_numpy(frame.pixels.astype(np.float32))[None, None]
            small = F.interpolate(pixels, size=image_size, mode="area").round().clamp(0, 255).to(torch.uint8)
            probabilities, presences = predictor(small)
            probability = next(iter(upsample(probabilities, [frame.pixels.shape])))
            mask = to_mask(probability, presences[0], post)
            clock.lap("segment")
            picture = draw_frame(frame.pixels, mask, f"{frame.seconds:7.2f} s  presence {float(presences[0]):.2f}  "
                                 f"area {int(mask.sum())} px")
            clock.lap("draw")
            overlay.add(picture)
            clock.lap("encode")
            count += 1
    overlay.close()
    clock.lap("encode")
    wall, cpu = time.perf_counter() - started[0], time.process_time() - started[1]
    return {"engine": engine, "frames": count, "fps": count / wall, "cpu_per_frame": cpu / count,
            "wall": clock.wall, "cpu": clock.cpu, "load": (started[2], os.getloadavg()[0]), "image_size": image_size,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .pt from train.py (or an .onnx from export.py)")
    parser.add_argument("--engine", default="both", choices=["both", "torch", "onnxruntime"])
    parser.add_argument("--frames", type=int, default=150, help="frames of the synthetic video (30 a second)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads of PyTorch and ONNX Runtime (0: their defaults, one a core)")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "sweep.mp4"
        writer = OverlayVideo(source, fps=Fraction(LIVE_FPS), width=synthetic.WIDTH, height=synthetic.HEIGHT)
        for image, _ in sweep_frames(options.frames):
            writer.add(np.repeat(image[..., None], 3, axis=2))
        writer.close()
        engines = ["torch", "onnxruntime"] if options.engine == "both" else [options.engine]
        print(f"{options.frames} frames of 580x420 at 30 fps, {os.cpu_count()} cores, torch threads "
              f"{torch.get_num_threads()}, load average at the start {os.getloadavg()[0]:.2f}")
        for engine in engines:
            result = run_path(source, options.checkpoint, engine, Path(folder) / f"overlay-{engine}.mp4",
                              threads=options.threads)
            shares = ", ".join(f"{step} {1000 * result['wall'][step] / result['frames']:.1f} ms "
                               f"({1000 * result['cpu'][step] / result['frames']:.1f} ms CPU)" for step in STEPS)
            print(f"{result['engine']}: {result['fps']:.1f} frames/s ({result['fps'] / LIVE_FPS:.2f} of a live "
                  f"scanner's {LIVE_FPS}), {1000 * result['cpu_per_frame']:.1f} ms CPU a frame; per frame: {shares}; "
                  f"network input {result['image_size'][0]}x{result['image_size'][1]}; load average "
                  f"{result['load'][0]:.2f} -> {result['load'][1]:.2f}")


if __name__ == "__main__":
    main()
