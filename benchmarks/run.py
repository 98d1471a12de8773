"""Speed and memory of every stage, measured on a synthetic download that this script makes itself.

    python benchmarks/run.py              # default sizes: a few minutes on 2 CPU cores
    python benchmarks/run.py --full       # the full-size set (5,635 pairs, 5,508 test images)
    python benchmarks/run.py --quick      # tiny sizes, to try a change end to end (the figures mean nothing)
    python benchmarks/run.py --gpu-quick  # the default sizes with fewer repetitions: about 5 minutes on a GPU machine

The code: measure.py (the sizes, the data and the measurements), report.py (the table and the
machine), this file (the command line).

It prints the machine, then a table of figures and ratios, all measured in this run, and writes the table to
OUT/results.md and OUT/results.csv. Generated downloads are cached in benchmarks/.cache/. What each row
measures, and how, is in benchmarks/README.md.
"""

import argparse
import os
import tempfile
from pathlib import Path

import torch
from measure import CACHE, PROFILES, ROOT, measure
from report import Watch, machine_lines, others_line, write_results

from nerveseg.memory import keep_freed_memory


def parse_arguments() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sizes = parser.add_mutually_exclusive_group()
    for name, text in (
        ("quick", "tiny sizes, to try a change end to end"),
        ("full", "the full-size set"),
        ("gpu-quick", "the default sizes with fewer repetitions, for a short GPU run"),
    ):
        sizes.add_argument(f"--{name}", dest="mode", action="store_const", const=name, help=text)
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where training and prediction run (auto: CUDA if there is a GPU)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for results.md and results.csv"
    )
    arguments = parser.parse_args()
    if arguments.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but PyTorch sees no GPU")
    return arguments


def main() -> None:
    """Measure, print the table and write it."""
    arguments = parse_arguments()
    profile = PROFILES[arguments.mode or "default"]
    use_cuda = arguments.device == "cuda" or (arguments.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    keep_freed_memory()  # as train.py and predict.py do: the in-process training steps run like theirs
    mode = f"{profile.name} ({profile.spec.n_train:,} training pairs, {profile.spec.n_test:,} test images)"
    header = machine_lines(device, mode)
    print("\n".join(header), flush=True)
    if os.getloadavg()[0] > 0.25 * (os.cpu_count() or 1):
        print("warning: the machine is busy; the figures will be lower than on an idle machine", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    watch = Watch()
    with tempfile.TemporaryDirectory(prefix="work-", dir=CACHE) as work:
        rows = measure(profile, device, Path(work))
    header.append(others_line(watch))
    print("\n" + write_results(arguments.out, header, rows) + f"\nwritten to {arguments.out}/results.md and .csv")


if __name__ == "__main__":
    main()
