"""predict.py in chunks: chunks of whole files (a video or a DICOM file never split), two torchrun processes (gloo)
write what one does, a killed run leaves nothing that looks complete and resumes with any number of processes, a
rerun with other settings is refused naming what differs, the merge bounds the report."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from nerveseg.data import partition
from nerveseg.errors import UserError
from nerveseg.inference import chunks
from nerveseg.inference.chunks import RECORDS, Chunk, ChunkPlan, batches_of, chunk_name, open_parts, plan_chunks
from nerveseg.inference.records import ImageResult
from tests import media
from tests.helpers import ROOT, tree_hashes, write_small_checkpoint


def item(file: str, frame: int = 0) -> dict:
    return {"id": f"{file}#{frame}" if frame else file, "image_path": file}


def test_a_chunk_is_whole_files_of_at_least_its_size_and_batches_stay_inside_it():
    items = [item("a.png"), item("b.png"), item("cine.dcm", 1), item("cine.dcm", 2), item("cine.dcm", 3),
             *(item("clip.mp4", n) for n in range(1, 6)), item("c.png"), item("d.png"), item("e.png")]
    plans = plan_chunks(items, 2)
    assert [(plan.start, plan.stop) for plan in plans] == [(0, 2), (2, 5), (5, 10), (10, 12), (12, 13)]
    # the report's entries before each chunk (its pictures' names): an image or a DICOM frame one, a video one
    assert [plan.first_row for plan in plans] == [0, 2, 5, 6, 8]
    assert [(plan.start, plan.stop) for plan in plan_chunks(items, 100)] == [(0, 13)]
    assert batches_of([plans[1], plans[3]], 2) == [[0, 1], [2], [3, 4]]  # a chunk's last batch may be short


def test_every_chunk_goes_to_exactly_one_process():
    for to_do in ([0, 1, 2, 3, 4, 5, 6], [1, 4, 5], [3], []):
        for processes in (1, 2, 3, 5):
            shares = [partition(to_do, rank, processes, pad=False) for rank in range(processes)]
            assert sorted(index for share in shares for index in share) == to_do


def test_a_rerun_with_other_settings_is_refused_naming_what_differs(tmp_path):
    settings = {"model file (sha256)": "abc", "--tta": "auto", "--batch-size": 4}
    parts = tmp_path / "out.parts"
    assert open_parts(parts, settings, 3) == [0, 1, 2]
    (parts / chunk_name(1)).mkdir()
    assert open_parts(parts, settings, 3) == [0, 2]
    with pytest.raises(UserError, match=r"--tta 'auto' then, 'true' now.*delete .*out.parts"):
        open_parts(parts, {**settings, "--tta": "true"}, 3)
    with pytest.raises(UserError, match=r"model file \(sha256\) 'abc' then, 'def' now"):
        open_parts(parts, {**settings, "model file (sha256)": "def"}, 3)


def test_a_chunk_is_complete_or_absent(tmp_path):
    parts = tmp_path / "out.parts"
    open_parts(parts, {}, 2)
    chunk = Chunk(parts, ChunkPlan(0, 0, 2, 0))
    (chunk.folder / "masks" / "a.png").write_bytes(b"png")
    chunk.results += [ImageResult("a", "a.png", presence=0.9, area=12, pixels="1 12", uncertainty=0.1),
                      ImageResult("b", "b.png", skipped_because="not an image")]
    assert not (parts / chunk_name(0)).exists()  # not yet
    chunk.commit([{"name": "a"}], ["videos/a.mp4"])
    assert sorted(p.name for p in parts.iterdir()) == [chunks.SETTINGS, chunk_name(0)]
    assert list(chunks.records(parts, 1)) == chunk.results and chunks.media(parts, 1) == ["videos/a.mp4"]
    unfinished = Chunk(parts, ChunkPlan(1, 2, 4, 2))
    folder = unfinished.folder
    assert folder.name.startswith(".chunk-000001.building-")
    del unfinished  # an error or Ctrl-C before commit: nothing left
    assert not folder.exists() and not (parts / chunk_name(1)).exists()


def test_the_page_of_many_entries_shows_videos_skips_the_worst_and_the_least_certain(tmp_path):
    rows = [{"kind": "hit", "dice": 1 - n / 200 if n % 2 else None, "uncertainty": n / 100, "n": n}
            for n in range(100)]
    rows[7] = {"kind": "skipped", "dice": None, "uncertainty": None, "n": 7}
    parts = tmp_path / "out.parts"
    for index in range(2):
        (parts / chunk_name(index)).mkdir(parents=True)
        (parts / chunk_name(index) / chunks.CONTENTS).write_text(json.dumps({"rows": rows[50 * index:][:50],
                                                                             "media": []}))
    assert chunks.shown_rows(parts, 2, 100) is None  # all fit
    shown = {row["n"] for row in chunks.shown_rows(parts, 2, 11)}
    assert len(shown) == 11 and 7 in shown  # the skipped file
    assert {99, 97, 95, 93, 91} <= shown  # the lowest Dice (odd numbers only have truths)
    assert shown - {7, 99, 97, 95, 93, 91} == {98, 96, 94, 92, 90}  # then the least certain others


# Running predict.py (slow) ---------------------------------------------------------------------------------

# On PYTHONPATH: KILL_AT=N (and KILL_RANK) kill a run as it keeps its Nth chunk (SIGKILL: no clean-up at all)
KILL_HOOK = ROOT / "benchmarks" / "hooks"
# batches of 2, chunks of at least 2 images: 01-02 | 03-04 | 05 and the DICOM file's 3 frames | the video's 6 frames
# | 06-07 | 08
CHUNKED = ("--batch-size", "2", "--chunk-batches", "1", "--quiet", "--num-workers", "0", "--presence-window", "3",
           "--dicom-seg", "true")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """(model, folder): a small untrained model; 8 images, a 3-frame DICOM file and a 6-frame video."""
    pytest.importorskip("highdicom")
    pytest.importorskip("av")
    root = tmp_path_factory.mktemp("chunk-inputs")
    folder = root / "in"
    folder.mkdir()
    frames = media.nerve_frames(8, subject=3)
    for number, (image, _) in enumerate(frames, start=1):
        Image.fromarray(image).save(folder / f"{number:02d}.png")
    media.write_dicom(folder / "05_cine.dcm", [image for image, _ in frames[:3]])
    media.write_video(folder / "05_clip.mp4", [image for image, _ in media.moving_nerve(6)])
    return write_small_checkpoint(root / "model.pt"), folder


def predict(work: Path, inputs: tuple[Path, Path], output: str, *extra: str, processes: int = 1,
            environment: dict | None = None) -> subprocess.CompletedProcess:
    """predict.py on the inputs, alone or under torchrun with `processes` processes."""
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    model, folder = inputs
    command = [*launcher, str(ROOT / "predict.py"), "--checkpoint", str(model), "--input", str(folder), "--output",
               output, "--pictures", f"{output}-pictures", *CHUNKED, *extra]
    env = {**os.environ, "PYTHONPATH": f"{KILL_HOOK}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1", **(environment or {})}
    return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)


def outputs(folder: Path) -> dict[str, object]:
    """What a prediction wrote: the hash of each file, a DICOM SEG's masks (its UIDs and time are new each run)."""
    import pydicom

    found: dict[str, object] = dict(tree_hashes(folder))
    for name in [name for name in found if name.startswith("dicom-seg/")]:
        found[name] = pydicom.dcmread(folder / name).pixel_array.tobytes()
    return found


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory) -> Path:
    """predict.py, one process, in 6 chunks: the reference."""
    work = tmp_path_factory.mktemp("one-process")
    result = predict(work, inputs, "out")
    assert result.returncode == 0, result.stderr
    assert ": 6 chunks" in result.stdout
    return work / "out"


@pytest.mark.slow
def test_two_processes_write_what_one_does(one_process, inputs, tmp_path):
    result = predict(tmp_path, inputs, "out", processes=2)
    assert result.returncode == 0, result.stderr
    assert "2 processes on cpu" in result.stdout
    written = outputs(tmp_path / "out")
    assert written == outputs(one_process) and not (tmp_path / "out.parts").exists()
    assert {"videos/05_clip.mp4", "dicom-seg/05_cine.dcm", "masks/05_cine#3.png", "masks/05_clip#6.png",
            "masks/08.png", "report.html", "images.csv"} <= set(written)


@pytest.mark.slow
def test_a_killed_process_leaves_nothing_complete_and_a_rerun_finishes_with_any_number(one_process, inputs,
                                                                                        tmp_path):
    killed = predict(tmp_path, inputs, "out", processes=2,
                     environment={"KILL_AT": "2", "KILL_RANK": "1"})  # rank 1 as it commits its second chunk
    assert killed.returncode != 0
    parts = tmp_path / "out.parts"
    assert not (tmp_path / "out").exists()  # nothing that looks like predictions
    done = sorted(path.name for path in parts.glob("chunk-*"))
    assert 1 <= len(done) < 6
    for name in done:  # a committed chunk is whole: a record and a mask per readable image
        lines = (parts / name / RECORDS).read_text().splitlines()
        assert len(list((parts / name / "masks").rglob("*.png"))) == len(lines) >= 1

    refused = predict(tmp_path, inputs, "out", "--presence-window", "5")
    assert refused.returncode == 1 and "--presence-window 3 then, 5 now" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and sorted(p.name for p in parts.glob("chunk-*")) == done

    resumed = predict(tmp_path, inputs, "out")  # one process now
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done)} done by an earlier run" in resumed.stdout
    assert outputs(tmp_path / "out") == outputs(one_process) and not parts.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden folder left


@pytest.mark.slow
def test_predictions_inside_the_input_folder_are_not_read_as_input_when_resumed_or_rerun(one_process, inputs,
                                                                                         tmp_path):
    model, original = inputs
    folder = tmp_path / "scans"
    shutil.copytree(original, folder)
    killed = predict(tmp_path, (model, folder), "scans/out", "--pictures", "pictures", environment={"KILL_AT": "2"})
    assert killed.returncode != 0 and len(list((folder / "out.parts").glob("chunk-*"))) == 1
    for run in ("resumed", "rerun"):  # the chunks, then the finished predictions, lie in the input folder
        result = predict(tmp_path, (model, folder), "scans/out", "--pictures", "pictures")
        assert result.returncode == 0, f"{run}: {result.stderr}"
        assert ": 6 chunks" in result.stdout, run
        assert masks_and_media(outputs(folder / "out")) == masks_and_media(outputs(one_process)), run


def masks_and_media(written: dict[str, object]) -> dict[str, object]:
    """What does not name the input folder (images.csv and the report do)."""
    return {name: value for name, value in written.items() if name.startswith(("masks/", "videos/", "dicom-seg/"))}
