"""The disk cache (nerveseg/training/diskcache.py): the same pairs as the memory cache, made once, made again when
the data changed, nothing complete-looking after a killed build; the automatic choice from the memory left."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader
from PIL import Image

from nerveseg import progress
from nerveseg.distributed import Process
from nerveseg.errors import UserError
from nerveseg.memory import available_memory
from nerveseg.training import diskcache
from nerveseg.training.diskcache import CachedPairs, MemoryCache, cache_path, choose_cache, open_disk_cache
from nerveseg.transforms import collate_keep_sizes, load_transforms
from tests.helpers import FAST_TRAINING, ROOT, read_metrics, run_script

IMAGE_SIZE = (32, 48)
ONE_PROCESS = Process(0, 1, torch.device("cpu"))


def write_pairs(folder: Path, count: int = 7) -> list[dict]:
    """`count` random image and mask PNGs of differing sizes, as read_manifest's items."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    items = []
    for number in range(count):
        height, width = 40 + 3 * number, 70 - 5 * number
        image, mask = folder / "images" / f"{number}.png", folder / "masks" / f"{number}.png"
        Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).save(image)
        Image.fromarray((rng.random((height, width)) < 0.3).astype(np.uint8) * 255).save(mask)
        items.append({"image": str(image), "label": str(mask), "id": str(number), "subject": str(number % 3),
                      "empty": False, "mask_fraction": 0.3, "size": (height, width)})
    return items


def open_cache(items: list[dict], data: Path):
    return open_disk_cache(items, IMAGE_SIZE, data_dir=data, folder=data / "training-cache", process=ONE_PROCESS,
                           quiet=True)


def assert_same_pairs(disk: CachedPairs, memory: CacheDataset) -> None:
    assert len(disk) == len(memory)
    for index in range(len(memory)):
        got, expected = disk[index], memory[index]
        for key in ("image", "label", "original_size", "full_label"):
            assert got[key].dtype == expected[key].dtype and got[key].shape == expected[key].shape, key
            assert torch.equal(got[key], expected[key]), (index, key)


def test_the_disk_cache_gives_the_bytes_of_the_memory_cache(tmp_path: Path) -> None:
    items = write_pairs(tmp_path)
    cache = open_cache(items, tmp_path)
    memory = CacheDataset(items[2:], load_transforms(IMAGE_SIZE, with_label=True, keep_full_label=True), progress=False)
    assert_same_pairs(CachedPairs(cache, items[2:], full_label=True), memory)
    batch = [4, 0, 2, 2]  # as a sampler asks: any order, repeats
    got = collate_keep_sizes(CachedPairs(cache, items[2:], full_label=False).__getitems__(batch))
    expected = collate_keep_sizes([memory[index] for index in batch])
    assert torch.equal(got["image"], expected["image"]) and torch.equal(got["label"], expected["label"])
    assert got["id"] == expected["id"] and "full_label" not in got


def test_workers_share_the_file_instead_of_copying_it(tmp_path: Path) -> None:
    items = write_pairs(tmp_path)
    dataset = CachedPairs(open_cache(items, tmp_path), items, full_label=True)
    assert len(pickle.dumps(dataset)) < 4000  # a spawned worker gets the file's name, not its bytes
    assert_same_pairs(pickle.loads(pickle.dumps(dataset)), dataset_in_memory(items))
    in_workers = list(DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_keep_sizes))
    here = list(DataLoader(dataset, batch_size=3, num_workers=0, collate_fn=collate_keep_sizes))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(in_workers, here, strict=True))


def dataset_in_memory(items: list[dict]) -> CacheDataset:
    return CacheDataset(items, load_transforms(IMAGE_SIZE, with_label=True, keep_full_label=True), progress=False)


def test_the_memory_cache_holds_what_monai_caches_and_says_how_far_it_is(tmp_path: Path, monkeypatch, capsys) -> None:
    items = write_pairs(tmp_path)
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)  # a line for every pair (stderr is not a terminal here)
    memory = MemoryCache(items, load_transforms(IMAGE_SIZE, with_label=True, keep_full_label=True),
                         desc="caching the training pairs", quiet=False)
    assert "caching the training pairs: pair 7 of 7" in capsys.readouterr().err
    assert_same_pairs(memory, dataset_in_memory(items))
    MemoryCache(items, load_transforms(IMAGE_SIZE, with_label=True), desc="caching", quiet=True)
    assert capsys.readouterr().err == ""


def test_a_second_run_reuses_the_cache_and_a_changed_image_rebuilds_it(tmp_path: Path, monkeypatch) -> None:
    items = write_pairs(tmp_path)
    open_cache(items, tmp_path)
    path = cache_path(tmp_path / "training-cache", IMAGE_SIZE)
    made = path.stat().st_mtime_ns
    builds = []
    monkeypatch.setattr(diskcache, "build", lambda *args, **kwargs: builds.append(1))
    open_cache(items, tmp_path)
    assert builds == [] and path.stat().st_mtime_ns == made
    monkeypatch.undo()
    Image.fromarray(np.full(items[3]["size"], 7, dtype=np.uint8)).save(items[3]["image"])  # same size, new pixels
    cache = open_cache(items, tmp_path)
    assert path.stat().st_mtime_ns != made
    assert int(cache.images[3].min()) == int(cache.images[3].max()) == 7
    assert_same_pairs(CachedPairs(cache, items, full_label=True), dataset_in_memory(items))
    items[5]["size"] = (1, 1)  # a manifest that disagrees with its image is refused, naming it
    with pytest.raises(UserError, match=f"{items[5]['image']} is .* run data_cleaning.py again"):
        open_cache(items, tmp_path)


def test_a_cache_of_another_image_size_is_kept_and_named_with_its_size(tmp_path: Path, capsys) -> None:
    items = write_pairs(tmp_path)
    open_cache(items, tmp_path)
    other = open_disk_cache(items, (16, 24), data_dir=tmp_path, folder=tmp_path / "training-cache",
                            process=ONE_PROCESS, quiet=True)
    assert other.images.shape[1:] == (16, 24) and cache_path(tmp_path / "training-cache", IMAGE_SIZE).is_file()
    assert re.search(r"also holds pairs-32x48.bin \(0.00 GB\) for other image sizes; delete them if no run uses",
                     capsys.readouterr().out)


def test_a_file_that_is_not_a_cache_is_never_replaced(tmp_path: Path) -> None:
    items = write_pairs(tmp_path)
    path = cache_path(tmp_path / "training-cache", IMAGE_SIZE)
    path.parent.mkdir()
    path.write_bytes(b"someone's file")
    with pytest.raises(UserError, match="not a cache that train.py wrote"):
        open_cache(items, tmp_path)
    assert path.read_bytes() == b"someone's file"


def test_auto_takes_the_disk_only_when_the_memory_cache_would_not_fit() -> None:
    items = [{"size": (420, 580)}] * 10_000
    needed = diskcache.memory_cache_bytes(items, (128, 176)) + diskcache.TRAINING_MEMORY
    assert 10_000 * 2 * 128 * 176 < needed
    assert choose_cache("auto", items, (128, 176), available=needed) == "memory"
    assert choose_cache("auto", items, (128, 176), available=needed - 1) == "disk"
    assert choose_cache("auto", items, (128, 176), available=needed + diskcache.TRAINING_MEMORY - 1,
                        processes_here=2) == "disk"
    assert choose_cache("auto", items, (128, 176), available=None) == "memory"
    assert choose_cache("disk", items[:1], (128, 176), available=10**12) == "disk"
    assert choose_cache("memory", items, (128, 176), available=0) == "memory"


def test_the_memory_left_is_the_least_of_the_system_and_the_cgroup_limits(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    own = tmp_path / "cgroup"
    cgroups = tmp_path / "sys"
    own.write_text("0::/job/step\n")
    (cgroups / "job" / "step").mkdir(parents=True)
    assert available_memory(meminfo=meminfo, cgroups=cgroups, own_cgroup=own) == 20000000 * 1024
    (cgroups / "job" / "memory.max").write_text(f"{8 * 2**30}\n")
    (cgroups / "job" / "memory.current").write_text(f"{2**30}\n")
    (cgroups / "job" / "step" / "memory.max").write_text("max\n")
    assert available_memory(meminfo=meminfo, cgroups=cgroups, own_cgroup=own) == 7 * 2**30
    own.write_text("4:memory:/v1job\n")  # cgroup v1
    (cgroups / "memory" / "v1job").mkdir(parents=True)
    (cgroups / "memory" / "v1job" / "memory.limit_in_bytes").write_text(f"{3 * 2**30}\n")
    (cgroups / "memory" / "v1job" / "memory.usage_in_bytes").write_text(f"{2**30}\n")
    assert available_memory(meminfo=meminfo, cgroups=cgroups, own_cgroup=own) == 2 * 2**30
    assert available_memory(meminfo=tmp_path / "none", cgroups=tmp_path / "none", own_cgroup=tmp_path / "none") is None


@pytest.mark.slow
def test_a_killed_build_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    items = write_pairs(tmp_path, count=12)
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from nerveseg.training import diskcache
        from tests.test_diskcache import open_cache
        import json
        items = json.loads(Path({str(tmp_path / 'items.json')!r}).read_text())
        transforms = diskcache.load_transforms
        def slow_transforms(*args, **kwargs):
            compose = transforms(*args, **kwargs)
            def one(item):
                print("row", flush=True)
                time.sleep(0.3)
                return compose(item)
            return one
        diskcache.load_transforms = slow_transforms
        open_cache(items, Path({str(tmp_path)!r}))
    """)
    (tmp_path / "items.json").write_text(json.dumps(items))
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    rows = 0
    while rows < 3:  # killed in the middle of its rows
        line = child.stdout.readline()
        assert line, "the build ended before it was killed"
        rows += line == "row\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    folder = tmp_path / "training-cache"
    path = cache_path(folder, IMAGE_SIZE)
    left = list(folder.iterdir())
    assert not path.exists() and len(left) == 1 and left[0].name.startswith(f".{path.name}.")
    time.sleep(1.1)  # older than files.ABANDONED_AFTER_S: the next build knows it as a dead run's
    cache = open_cache([dict(item, size=tuple(item["size"])) for item in items], tmp_path)
    assert sorted(folder.iterdir()) == [path]
    assert_same_pairs(CachedPairs(cache, items, full_label=True), dataset_in_memory(items))


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.slow
def test_training_from_the_disk_cache_is_bit_for_bit_training_from_memory(train_clean: Path, tmp_path: Path) -> None:
    runs = {}
    for cache in ("memory", "disk"):
        result = run_script("train.py", "--data-dir", str(train_clean), "--max-epochs", "2", "--cache", cache,
                            "--cache-dir", str(tmp_path / "cache"), "--run-name", cache, "--tensorboard", "false",
                            "--model-path", f"{cache}.pt", *FAST_TRAINING, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert ("building the disk cache" in result.stdout) == (cache == "disk")
        runs[cache] = tmp_path / "runs" / cache
    memory, disk = (weights(runs[cache] / "last.pt") for cache in ("memory", "disk"))
    assert memory["model"].keys() == disk["model"].keys()
    assert all(torch.equal(memory["model"][key], disk["model"][key]) for key in memory["model"])
    timings = ("train_seconds", "seconds")
    rows = {cache: [{k: v for k, v in row.items() if k not in timings} for row in read_metrics(runs[cache])]
            for cache in runs}
    assert rows["memory"] == rows["disk"] and len(rows["disk"]) == 2


@pytest.mark.slow
def test_two_processes_build_the_file_one_process_builds(tmp_path: Path) -> None:
    items = write_pairs(tmp_path, count=9)
    (tmp_path / "items.json").write_text(json.dumps(items))
    script = textwrap.dedent(f"""
        import json
        from pathlib import Path
        from nerveseg import distributed
        from nerveseg.training import diskcache
        from tests.test_diskcache import IMAGE_SIZE
        process = distributed.start("cpu")
        rows = []
        write_rows = diskcache.write_rows
        diskcache.write_rows = lambda *args, **kwargs: rows.append(process.rank) or write_rows(*args, **kwargs)
        items = json.loads(Path({str(tmp_path / 'items.json')!r}).read_text())
        diskcache.open_disk_cache(items, IMAGE_SIZE, data_dir=Path({str(tmp_path)!r}),
                                  folder=Path({str(tmp_path / 'two')!r}), process=process, quiet=True)
        print(f"rank {{process.rank}} wrote rows: {{rows}}", flush=True)
        distributed.stop()
    """)
    (tmp_path / "build.py").write_text(script)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(tmp_path / "build.py")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 wrote rows: [0]" in result.stdout and "rank 1 wrote rows: [1]" in result.stdout
    open_disk_cache(items, IMAGE_SIZE, data_dir=tmp_path, folder=tmp_path / "one", process=ONE_PROCESS, quiet=True)
    one, two = (cache_path(tmp_path / name, IMAGE_SIZE) for name in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [two.name]
