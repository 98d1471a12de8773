"""train.py's epoch with the memory cache and with the disk cache: the seconds to make the cache, the training epoch's
seconds, the whole run's wall and CPU seconds and its peak memory (resident, and of it the anonymous pages that the
kernel cannot give back), on a clean copy or on that copy N times over (--repeat N: the files hard-linked under new
subjects, so 5,590 pairs become 55,900). See docs/performance.md, Training from a cache on disk.

    python benchmarks/training_cache.py --data CLEAN --work DIR [--repeat 10] [--runs memory,disk] [-- OPTIONS]

OPTIONS go to train.py (default: --max-epochs 1). `disk-again` reuses the file `disk` made.
"""

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SUBJECT_STEP = 1000  # copy k of subject s becomes subject s + k * SUBJECT_STEP


def repeated_copy(clean: Path, times: int, work: Path) -> Path:
    """`clean` `times` over: every kept pair hard-linked once a copy under a subject of its own, one manifest."""
    target = work / f"clean-x{times}"
    if (target / "manifest.csv").is_file():
        return target
    building = work / f"clean-x{times}.building"
    shutil.rmtree(building, ignore_errors=True)
    (building / "images").mkdir(parents=True)
    (building / "masks").mkdir()
    with open(clean / "manifest.csv", newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        fields, rows = reader.fieldnames, [row for row in reader if row["kept"] == "1"]
    copies = []
    for copy in range(times):
        for row in rows:
            subject = str(int(row["subject"]) + copy * SUBJECT_STEP)
            new = dict(row, subject=subject, id=f"{subject}_{row['frame']}")
            for column, folder in (("image", "images"), ("mask", "masks")):
                new[column] = f"{folder}/{new['id']}.tif"
                os.link(clean / row[column], building / new[column])
            copies.append(new)
    with open(building / "manifest.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(copies)
    building.rename(target)
    return target


def run_training(name: str, data: Path, work: Path, options: list[str], cache: str) -> dict:
    """train.py as a subprocess: the time to its first training line (reading the manifest, the split, the network,
    the cache), its wall and CPU seconds, peak RSS and peak anonymous RSS (sampled every 0.2 s), and metrics.csv."""
    command = [sys.executable, str(ROOT / "train.py"), "--data-dir", str(data), "--cache", cache,
               "--cache-dir", str(work / "training-cache"), "--runs-dir", str(work / "runs"), "--run-name", name,
               "--model-path", str(work / f"{name}.pt"), "--pictures", str(work / f"pictures-{name}"),
               "--tensorboard", "false", *options]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    peak_rss, peak_anon, setup = 0, 0, []
    with open(work / f"{name}.log", "w") as log:
        process = subprocess.Popen(command, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})

        def copy_output() -> None:  # each line to the log with its second; the first training line ends the setup
            for line in process.stdout:
                log.write(f"{time.perf_counter() - started:8.1f} {line}")
                log.flush()
                if not setup and "training on" in line:
                    setup.append(time.perf_counter() - started)

        reader = threading.Thread(target=copy_output)
        reader.start()
        watched = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                peak_rss = max(peak_rss, watched.memory_info().rss)
                peak_anon = max(peak_anon, anonymous_bytes(process.pid))
            except (psutil.NoSuchProcess, FileNotFoundError):
                pass
            time.sleep(0.2)
        reader.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(work / "runs" / name / "metrics.csv", newline="") as file:
        epochs = list(csv.DictReader(file))
    return {"run": name, "returncode": process.returncode, "wall_s": round(time.perf_counter() - started, 1),
            "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 1),
            "setup_s": round(setup[0], 1) if setup else None,
            "epoch_train_s": [float(row["train_seconds"]) for row in epochs],
            "epoch_s": [float(row["seconds"]) for row in epochs], "peak_rss_gib": round(peak_rss / 2**30, 2),
            "peak_anonymous_gib": round(peak_anon / 2**30, 2), "dice": epochs[-1].get("val_dice")}


def anonymous_bytes(pid: int) -> int:
    """RssAnon of a process: its own memory, which the kernel cannot drop (unlike the file pages of a mapped file)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="a clean copy (data_cleaning.py's output)")
    parser.add_argument("--work", required=True, type=Path, help="a folder for the copies, caches, runs and logs")
    parser.add_argument("--repeat", type=int, default=1, help="the pairs this many times over")
    parser.add_argument("--runs", default="memory,disk,disk-again", help="comma-separated: memory, disk, disk-again")
    options, train_options = parser.parse_known_args()
    train_options = [option for option in train_options if option != "--"] or ["--max-epochs", "1"]
    work = options.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = options.data.resolve()
    if options.repeat > 1:
        data = repeated_copy(data, options.repeat, work)
    with open(data / "manifest.csv", newline="", encoding="utf-8") as file:
        pairs = sum(row["kept"] == "1" for row in csv.DictReader(file))
    print(f"{pairs:,} pairs kept in {data}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the "
          f"start; train.py {' '.join(train_options)}", flush=True)
    for name in options.runs.split(","):
        shutil.rmtree(work / "runs" / name, ignore_errors=True)
        figures = run_training(name, data, work, train_options, cache="memory" if name == "memory" else "disk")
        print("RESULT " + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
