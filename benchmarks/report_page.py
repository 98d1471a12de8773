"""What predict.py's report.html adds to a prediction of the 5,508 Kaggle test images: its seconds and its size.

    python benchmarks/report_page.py            # 5,508 images of 580x420, as the competition's test set
    python benchmarks/report_page.py --images 500

Synthetic entries, made as predict.py makes them (the network's 128x176 image, a 420x580 mask, no truth): the
uncertainty figure of each image, its thumbnail, then the page. Without truths and beyond the report's
FULL_SIZE_LIMIT no image is read again, as in predict.py. Prints the seconds and the page's size without the
thumbnails (and theirs). The page and the thumbnails are written by one process.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nerveseg.inference.records import ImageResult, Summary
from nerveseg.inference.report import Report
from nerveseg.inference.uncertainty import single_model_uncertainty
from nerveseg.postprocess import PostProcessing


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5508, help="how many entries")
    count = parser.parse_args().images
    rng = np.random.default_rng(0)
    network_image = rng.integers(0, 256, (128, 176), dtype=np.uint8)
    probability = torch.from_numpy(rng.random((1, 128, 176), dtype=np.float32))
    post = PostProcessing(threshold=0.5, presence_threshold=0.5)
    masks = [np.zeros((420, 580), np.uint8) for _ in range(2)]
    masks[1][150:250, 200:330] = 1  # every other image with a nerve-sized mask
    with tempfile.TemporaryDirectory() as folder:
        started, cpu_started = time.perf_counter(), time.process_time()
        report, summary = Report(Path(folder), images=count), Summary()
        for number in range(count):
            uncertainty = single_model_uncertainty(probability, 0.7, post)
            mask = masks[number % 2]
            result = ImageResult(str(number + 1), f"data/clean/test/{number + 1}.tif", presence=0.7,
                                 area=int(mask.sum()), uncertainty=uncertainty)
            report.add(result, network_image=network_image, mask=mask, truth=None)
            summary.add(result)
        report.write(Path(folder, "report.html"), about=[("model", "2D_Nerve_Segmentation.pt")], summary=summary,
                     has_truths=False)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        page = Path(folder, "report.html").stat().st_size
        pictures = sum(path.stat().st_size for path in Path(folder, "report").iterdir())
    print(f"report of {count:,} images: {seconds:.1f} s ({seconds / count * 1000:.2f} ms an image; CPU time "
          f"{cpu_seconds:.1f} s, which a machine shared with other work does not inflate); page "
          f"{page / 1e6:.2f} MB without the thumbnails, thumbnails {pictures / 1e6:.1f} MB "
          f"({pictures / count / 1e3:.1f} kB each)")


if __name__ == "__main__":
    main()
