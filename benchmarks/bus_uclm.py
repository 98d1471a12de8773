"""Convert ../shared/data/bus-uclm (breast ultrasound, 64% empty masks) to the Kaggle layout, for measuring.

    python benchmarks/bus_uclm.py OUTPUT [--held-out 8] [--seed 0]

Writes OUTPUT/train/<patient>_<n>.tif and _mask.tif (8-bit grayscale LZW TIFF, masks 0/255) for the
training patients, and OUTPUT/test/<k>.tif with OUTPUT/test_masks/<k>.tif for HELD_OUT whole patients that
no stage ever trains or tunes on (their truth is only read by predict.py --masks). A patient is the first
four letters of a file name; patients are numbered 1, 2, ... in alphabetical order. Colour frames (Doppler,
calliper marks) become grayscale as PIL's "L" conversion makes them.

A stop-gap until data_cleaning.py reads such image/mask folders itself.
"""

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "bus-uclm"


def convert(source: Path, output: Path, held_out: int, seed: int) -> dict[str, list[str]]:
    """Write the Kaggle-layout copy; return the training and held-out patients."""
    images = sorted((source / "images").glob("*.jpg"))
    patients = sorted({path.stem[:4] for path in images})
    test_patients = set(random.Random(seed).sample(patients, held_out))
    for folder in ("train", "test", "test_masks"):
        (output / folder).mkdir(parents=True, exist_ok=True)
    test_number = 0
    for path in images:
        patient, frame = path.stem[:4], int(path.stem.split("_")[1]) + 1
        image = Image.open(path).convert("L")
        mask = Image.fromarray(((np.asarray(Image.open(source / "masks" / f"{path.stem}.png").convert("L")) > 0)
                                * 255).astype(np.uint8))
        if patient in test_patients:
            test_number += 1
            image.save(output / "test" / f"{test_number}.tif", compression="tiff_lzw")
            mask.save(output / "test_masks" / f"{test_number}.tif", compression="tiff_lzw")
        else:
            name = f"{patients.index(patient) + 1}_{frame}"
            image.save(output / "train" / f"{name}.tif", compression="tiff_lzw")
            mask.save(output / "train" / f"{name}_mask.tif", compression="tiff_lzw")
    return {"train": sorted(set(patients) - test_patients), "held_out": sorted(test_patients)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="where the Kaggle-layout copy goes")
    parser.add_argument("--source", type=Path, default=SOURCE, help="the bus-uclm folder (default: %(default)s)")
    parser.add_argument("--held-out", type=int, default=8, help="whole patients kept for testing (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="chooses the held-out patients (default: 0)")
    arguments = parser.parse_args()
    if not (arguments.source / "images").is_dir():
        parser.error(f"{arguments.source / 'images'} not found; pass --source with the bus-uclm folder")
    print(convert(arguments.source, arguments.output, arguments.held_out, arguments.seed))
