"""predict.py on 1 process and on 2 (torchrun, gloo, a thread each), against another version's one process: time,
CPU time, peak memory, and whether every run wrote the same files; a run killed as it keeps its third chunk, then
resumed on 2 processes; --repeat N to see the memory of N times the images (the same files, hard-linked N times).
See docs/performance.md.

    python benchmarks/predict_processes.py --checkpoint M.pt --input TEST --work DIR [--baseline OLD_CHECKOUT]
"""

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
KILL_HOOK = ROOT / "benchmarks" / "hooks"  # on PYTHONPATH: KILL_AT=N kills a run as it keeps its Nth chunk


def run(command: list[str], *, code: Path, work: Path, threads: int | None, kill_at: int = 0) -> dict:
    """Run a command to its end; its wall and CPU seconds (all its processes), the peak RSS of its largest process
    and of all together (sampled every 0.2 s), its exit status."""
    env = {**os.environ, "PYTHONPATH": f"{KILL_HOOK}{os.pathsep}{code}", "KILL_AT": str(kill_at or "")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(work / "log.txt", "a") as log:
        process = subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        watched, largest, together = psutil.Process(process.pid), 0, 0
        while process.poll() is None:
            sizes = []
            for member in [watched, *watched.children(recursive=True)]:
                try:
                    if "python" in member.name():
                        sizes.append(member.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            if sizes:
                largest, together = max(largest, max(sizes)), max(together, sum(sizes))
            time.sleep(0.2)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": time.perf_counter() - started, "cpu": cpu, "largest": largest, "together": together,
            "returncode": process.returncode}


def tree_digest(folder: Path) -> str:
    """One sha256 of every file below a folder, names and contents."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def repeated_input(folder: Path, times: int, work: Path) -> Path:
    """The images of `folder` `times` over, hard-linked into subfolders 0..times-1."""
    target = work / f"input-x{times}"
    if not target.is_dir():
        for copy in range(times):
            (target / str(copy)).mkdir(parents=True)
            for path in folder.iterdir():
                os.link(path, target / str(copy) / path.name)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--input", required=True, type=Path, help="a folder of images (the test set)")
    parser.add_argument("--work", required=True, type=Path, help="a folder for the outputs")
    parser.add_argument("--baseline", type=Path, help="a checkout of another version: its predict.py, one process")
    parser.add_argument("--repeat", type=int, default=1, help="the images this many times over (memory)")
    parser.add_argument("--device", default="cpu", help="predict.py's --device (cpu: the figures of the docs)")
    parser.add_argument("--only", default="", help="comma-separated runs to do (baseline,one,two,killed)")
    options = parser.parse_args()
    work = options.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    images = options.input.resolve() if options.repeat == 1 else repeated_input(options.input.resolve(),
                                                                                options.repeat, work)
    count = sum(1 for path in images.rglob("*") if path.is_file())
    common = ["--checkpoint", str(options.checkpoint.resolve()), "--input", str(images), "--quiet",
              "--device", options.device]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    plans = {  # name: command, code, threads (None: PyTorch's default, a thread a core)
        "baseline": ([sys.executable, str((options.baseline or ROOT) / "predict.py")], options.baseline, None),
        "one": ([sys.executable, str(ROOT / "predict.py")], ROOT, None),
        "two": ([*torchrun, str(ROOT / "predict.py")], ROOT, 1),
    }
    wanted = set(filter(None, options.only.split(","))) or {*plans, "killed"}
    print(f"{count:,} images from {images}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the start")
    digests = {}
    for name, (command, code, threads) in plans.items():
        if name not in wanted or code is None:
            continue
        output = work / f"out-{name.replace(', ', '-').replace(' ', '-')}"
        figures = run([*command, *common, "--output", str(output), "--pictures", str(work / "pictures")],
                      code=code, work=work, threads=threads)
        digests[name] = tree_digest(output) if figures["returncode"] == 0 else "failed"
        print(f"{name}: {figures['seconds']:.1f} s, CPU {figures['cpu']:.1f} s, peak RSS of the largest process "
              f"{figures['largest'] / 2**30:.2f} GiB (all {figures['together'] / 2**30:.2f} GiB), outputs "
              f"{digests[name]}", flush=True)
    if "killed" in wanted:
        output = work / "out-killed"
        command = [sys.executable, str(ROOT / "predict.py"), *common, "--output", str(output), "--pictures",
                   str(work / "pictures")]
        killed = run(command, code=ROOT, work=work, threads=1, kill_at=3)  # killed as it keeps its third chunk
        kept = sorted(path.name for path in Path(f"{output}.parts").glob("chunk-*"))
        left = "PRESENT" if output.exists() else "absent"  # nothing that looks complete
        resumed = run([*torchrun, *command[1:]], code=ROOT, work=work, threads=1)
        digests["killed, resumed"] = tree_digest(output) if resumed["returncode"] == 0 else "failed"
        print(f"killed after {len(kept)} chunks ({killed['seconds']:.1f} s, exit {killed['returncode']}, output "
              f"{left}), resumed on 2 processes: {resumed['seconds']:.1f} s, "
              f"CPU {resumed['cpu']:.1f} s, outputs {digests['killed, resumed']}", flush=True)
    same = len(set(digests.values())) == 1
    print(f"outputs byte-identical across {', '.join(digests)}: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
