"""torchrun: two CPU processes (gloo) train like one, validate exactly, and only rank 0 writes."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import monai
import pytest
import torch
import torch.distributed as dist

from nerveseg.checkpoint import load_checkpoint
from nerveseg.data import read_manifest, split_by_subject, split_into_folds
from nerveseg.distributed import Process, from_main, stop
from nerveseg.training.evaluation import evaluate
from nerveseg.training.steps import SegmentationLoss
from nerveseg.transforms import collate_keep_sizes, load_transforms
from tests.helpers import FAST_TRAINING, ROOT

# Python's audit hooks see every file opened for writing, renamed or created; rank 1 reports what it did.
WATCH_WRITES = textwrap.dedent("""
    import atexit, os, sys
    if os.environ.get("RANK", "0") != "0":
        writes = []
        def hook(event, args):
            writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT
            if event == "open" and isinstance(args[0], str) and (
                    any(c in (args[1] or "") for c in "wax+") or (args[1] is None and args[2] & writing)):
                writes.append(os.path.abspath(args[0]))
            elif event in ("os.rename", "os.replace", "os.mkdir"):
                writes.append(os.path.abspath(args[1] if event != "os.mkdir" else args[0]))
        sys.addaudithook(hook)
        atexit.register(lambda: print("RANK1-WRITES:" + repr([w for w in writes if w.startswith(os.getcwd())]),
                                      file=sys.stderr, flush=True))
""")


def torchrun(train_clean: Path, work: Path, hooks: Path, *extra: str) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": f"{hooks}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "train.py"),
        "--data-dir",
        str(train_clean),
        "--max-epochs",
        "2",
        "--run-name",
        "ddp",
        *FAST_TRAINING,
        *extra,
    ]
    return subprocess.Popen(
        command, cwd=work, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def validation_figures(model: torch.nn.Module, val_items: list[dict], settings: dict) -> dict:
    """One process's validation of a model on val_items, as train.py validates."""
    monai.data.set_track_meta(False)
    size = (settings["image_height"], settings["image_width"])
    dataset = monai.data.Dataset(val_items, load_transforms(size, with_label=True, keep_full_label=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=collate_keep_sizes)
    loss = SegmentationLoss(settings["presence_weight"])
    return evaluate(model, loader, loss, Process(0, 1, torch.device("cpu")), amp=False)[0]


@pytest.mark.slow
def test_two_processes_train_validate_exactly_and_only_rank_0_writes(train_clean, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(WATCH_WRITES)
    single, folds = tmp_path / "single", tmp_path / "folds"
    for work in (single, folds):
        work.mkdir()
    # at once: torchrun picks free ports. The second accumulates slices of 3 of each batch of 8 (DDP's no_sync),
    # in each of two cross-validation folds.
    runs = [torchrun(train_clean, single, hooks),
            torchrun(train_clean, folds, hooks, "--micro-batch-size", "3", "--folds", "2")]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (stdout, stderr) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, stderr[-3000:]
        assert "training on cpu x 2" in stdout
        assert "RANK1-WRITES:[]" in stderr, [line for line in stderr.splitlines() if "RANK1" in line]
    for work, logs in ((single, 1), (folds, 2)):  # one TensorBoard log per fold, rank 0's
        assert len(list((work / "runs").rglob("events.out.tfevents.*"))) == logs
    # The Dice reduced over both ranks is rank 0's model's: the ranks stayed in step.
    model, checkpoint = load_checkpoint(single / "2D_Nerve_Segmentation.pt")
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in checkpoint["state_dict"])
    settings = checkpoint["settings"]
    _, val_items = split_by_subject(read_manifest(train_clean), settings["val_fraction"], settings["seed"])
    metrics = validation_figures(model, val_items, settings)
    assert metrics["images"] == len(val_items) == checkpoint["metrics"]["images"]
    assert metrics["dice"] == pytest.approx(checkpoint["metrics"]["dice"], abs=1e-9)
    assert metrics["dice_nonempty"] == pytest.approx(checkpoint["metrics"]["dice_nonempty"], abs=1e-9)
    # Each fold model of the ensemble too, on its own validation subjects.
    _, checkpoint = load_checkpoint(folds / "2D_Nerve_Segmentation.pt")
    splits = split_into_folds(read_manifest(train_clean), 2, settings["val_fraction"], settings["seed"])
    for member, (_, val_items) in zip(checkpoint["ensemble"], splits, strict=True):
        model, _ = load_checkpoint(folds / "2D_Nerve_Segmentation.pt", fold=member["fold"])
        metrics = validation_figures(model, val_items, settings)
        assert metrics["images"] == len(val_items) == member["metrics"]["images"]
        assert metrics["dice"] == pytest.approx(member["metrics"]["dice"], abs=1e-9)


def report_what_rank_0_said(rank: int, init_file: str, results: "torch.multiprocessing.Queue") -> None:
    """A process of a two-process gloo group: what from_main gives it, for a value only it worked out."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    folder = Path(f"runs/20261202-180000-{rank + 1}")  # rank 0 took a suffix; rank 1 would not know it
    results.put((rank, from_main(folder, Process(rank, 2, torch.device("cpu")))))
    stop()


@pytest.mark.slow  # two processes, each importing torch
def test_every_process_uses_the_run_folder_rank_0_made(tmp_path):
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    torch.multiprocessing.start_processes(report_what_rank_0_said, args=(str(tmp_path / "init"), results),
                                          nprocs=2, start_method="spawn")
    made = Path("runs/20261202-180000-1")
    assert dict(results.get(timeout=60) for _ in range(2)) == {0: made, 1: made}
    # one process alone: its own value, no process group needed
    assert from_main(Path("runs/x"), Process(0, 1, torch.device("cpu"))) == Path("runs/x")
