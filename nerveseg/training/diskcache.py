"""Training from a cache on disk, for data sets whose decoded images do not fit in memory (train.py's CACHE).

The memory cache (MONAI's CacheDataset over nerveseg/transforms.py's load_transforms) holds every decoded, resized
image and mask as a tensor in each process. The disk cache holds the same bytes in one file, memory-mapped:

    header    magic line, then JSON (what the file was made from, and where each part starts), padded to 4 KiB
    images    uint8 (N, H, W): the images at the network's size, as load_transforms makes them
    labels    uint8 (N, H, W): the masks at the network's size, 0/1
    sizes     int32 (N, 2): each image's (height, width) before resizing
    offsets   int64 (N + 1): where each row's full-size mask starts in the packed masks
    packed    each mask at its own size, 8 pixels a byte (what validation's Dice at original size needs)

one row per training pair of the clean folder's manifest (held-out pairs left out), in its order, so every split and
every fold of --folds reads the same file. The header names the pairs' files with their sizes and modification times
(as a digest), the image size and the libraries that decoded and resized them: a cache whose header differs from what
the data is now is built again, never reused.

It is built once: every process (torchrun) decodes every world_size-th row into the file that rank 0 opened beside
the cache (nerveseg/files.py's atomic_write); rank 0 writes the header last and renames the file into place. A
killed build leaves only that hidden temporary file, which the next build removes: nothing that looks complete.
A batch's rows are read in one go (the dataset's __getitems__); DataLoader workers, forked, share the mapping (the
kernel's page cache), and a pickled dataset (spawned workers) carries the file's name, not its bytes.
"""

import glob
import hashlib
import json
import math
import os
from collections.abc import Callable
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import IO

import monai
import numpy as np
import PIL
import torch
from monai.data import CacheDataset

from nerveseg import distributed
from nerveseg.errors import UserError
from nerveseg.files import atomic_write, hidden_stem
from nerveseg.memory import available_memory
from nerveseg.progress import progress
from nerveseg.transforms import load_transforms

MAGIC = b"nerveseg training cache 1\n"
HEADER_BYTES = 4096
ALIGN = 64  # each part starts at a multiple of this many bytes
CACHES = ("auto", "memory", "disk")  # train.py's CACHE
TRAINING_MEMORY = 3 * 2**30  # what a training process takes beside its cache (docs/performance.md: 2.4 GB peak)
CACHED_PAIR_OVERHEAD = 32 * 1024  # a pair in the memory cache beyond its pixels (measured: docs/performance.md)


class MemoryCache(CacheDataset):
    """The memory cache: MONAI's CacheDataset, whose filling shows its progress as every long step here does (a bar
    in a terminal, a line every 30 s elsewhere: nerveseg/progress.py); 55,900 pairs take minutes."""

    def __init__(self, items: list[dict], transform: Callable, *, desc: str, quiet: bool, copy_cache: bool = True
                 ) -> None:
        self.desc, self.quiet = desc, quiet
        super().__init__(items, transform, progress=False, copy_cache=copy_cache)

    def _fill_cache(self, indices: list[int] | None = None) -> list:
        """CacheDataset's, with our progress."""
        if self.cache_num <= 0:
            return []
        indices = list(range(self.cache_num)) if indices is None else indices
        with ThreadPool(self.num_workers) as pool:
            return list(progress(pool.imap(self._load_cache_item, indices), desc=self.desc, unit="pair",
                                 total=len(indices), quiet=self.quiet))


def memory_cache_bytes(items: list[dict], image_size: tuple[int, int]) -> int:
    """What the memory caches of all processes together take for `items`: image and mask at the network's size,
    the full-size mask packed (validation keeps it), and each pair's Python objects."""
    height, width = image_size
    return sum(2 * height * width + packed_bytes(item["size"]) + CACHED_PAIR_OVERHEAD for item in items)


def choose_cache(setting: str, items: list[dict], image_size: tuple[int, int], *, available: int | None,
                 processes_here: int = 1) -> str:
    """memory or disk: `setting`, or for auto the memory cache where it and the training processes on this machine
    fit in the memory `available` (None: unknown, memory), else the disk."""
    if setting != "auto":
        return setting
    needed = memory_cache_bytes(items, image_size) + TRAINING_MEMORY * processes_here
    return "memory" if available is None or needed <= available else "disk"


def describe_choice(cache: str, items: list[dict], image_size: tuple[int, int], *, setting: str,
                    available: int | None, path: Path) -> str:
    """The cache chosen, in a line: why (for auto), and where the disk cache lives."""
    size = f"the memory cache takes about {memory_cache_bytes(items, image_size) / 1e9:.2f} GB"
    why = (f" ({size}, {available / 1e9:.1f} GB available)" if setting == "auto" and available is not None
           else f" ({size})" if setting == "auto" else "")
    return f"cache: in memory{why}" if cache == "memory" else f"cache: on disk, {path}{why}"


def cache_path(folder: Path, image_size: tuple[int, int]) -> Path:
    """The cache file of one image size in `folder`."""
    return folder / f"pairs-{image_size[0]}x{image_size[1]}.bin"


def packed_bytes(size: tuple[int, int]) -> int:
    """The bytes of a mask of `size` packed 8 pixels a byte."""
    return math.ceil(size[0] * size[1] / 8)


def source_digest(items: list[dict], data_dir: Path) -> str:
    """A digest of what the cache is made from: each pair's files (named relative to the data folder), their sizes
    and modification times, in order."""
    digest = hashlib.sha256()
    for item in items:
        for key in ("image", "label"):
            stat = os.stat(item[key])
            name = os.path.relpath(item[key], data_dir)
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()


def align(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def expected_header(items: list[dict], image_size: tuple[int, int], data_dir: Path) -> dict:
    """The header of a cache of `items` as the data is now: what it is made from, and where each part starts."""
    count, (height, width) = len(items), image_size
    images = HEADER_BYTES
    labels = images + count * height * width
    sizes = align(labels + count * height * width)
    offsets = align(sizes + count * 2 * 4)
    packed = align(offsets + (count + 1) * 8)
    return {
        "pairs": count,
        "image_size": [height, width],
        "sources": source_digest(items, data_dir),
        "made_by": {"transforms": "nerveseg.transforms.load_transforms", "monai": monai.__version__,
                    "torch": torch.__version__.split("+")[0], "numpy": np.__version__, "pillow": PIL.__version__},
        "parts": {"images": images, "labels": labels, "sizes": sizes, "offsets": offsets, "packed": packed},
        "bytes": packed + sum(packed_bytes(item["size"]) for item in items),
    }


def read_header(path: Path) -> dict | None:
    """The header of the cache file `path`; None where there is none. A file there that is not a cache is refused
    (the cache never replaces a file it did not write)."""
    try:
        with open(path, "rb") as file:
            start = file.read(HEADER_BYTES)
            file_bytes = os.fstat(file.fileno()).st_size
    except FileNotFoundError:
        return None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}; choose another --cache-dir") from None
    if not start.startswith(MAGIC):
        raise UserError(f"{path} is not a cache that train.py wrote, and it never replaces such a file; move it, or "
                        "choose another --cache-dir")
    try:
        header = json.loads(start[len(MAGIC):].rstrip(b"\0"))
    except ValueError:
        return None
    return header if header.get("bytes") == file_bytes else None


def parts(whole: np.ndarray, header: dict) -> tuple[np.ndarray, ...]:
    """The images, labels, sizes, offsets and packed masks of a cache file's bytes `whole` (views, not copies)."""
    places, count, (height, width) = header["parts"], header["pairs"], header["image_size"]
    return (whole[places["images"]:places["labels"]].reshape(count, height, width),
            whole[places["labels"]:places["labels"] + count * height * width].reshape(count, height, width),
            whole[places["sizes"]:places["sizes"] + count * 8].view(np.int32).reshape(count, 2),
            whole[places["offsets"]:places["offsets"] + (count + 1) * 8].view(np.int64),
            whole[places["packed"]:])


class DiskCache:
    """The parts of a cache file as read-only arrays over one memory map; `row_of` finds a pair's row by its image."""

    def __init__(self, path: Path, header: dict, items: list[dict]) -> None:
        self.path, self.header = path, header
        self.row_of = {item["image"]: row for row, item in enumerate(items)}
        self.open()

    def open(self) -> None:
        self.images, self.labels, self.sizes, self.offsets, self.packed = parts(
            np.memmap(self.path, dtype=np.uint8, mode="r"), self.header)

    def packed_mask(self, row: int) -> np.ndarray:
        return self.packed[self.offsets[row]:self.offsets[row + 1]]

    def __getstate__(self) -> dict:  # a spawned worker gets the file's name and maps it itself
        return {"path": self.path, "header": self.header, "row_of": self.row_of}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.open()


class CachedPairs(torch.utils.data.Dataset):
    """Some pairs of a DiskCache as the dicts that the memory cache gives for them: the item, its image and mask at
    the network's size ((1, H, W) uint8), its original_size and, with full_label, its packed full-size mask."""

    def __init__(self, cache: DiskCache, items: list[dict], *, full_label: bool) -> None:
        self.cache, self.items, self.full_label = cache, items, full_label
        self.rows = [cache.row_of[item["image"]] for item in items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """The pairs at `indices`, their rows read in one go (a DataLoader asks for a batch this way)."""
        rows = [self.rows[index] for index in indices]
        images, labels = torch.from_numpy(self.cache.images[rows]), torch.from_numpy(self.cache.labels[rows])
        sizes = self.cache.sizes[rows].tolist()
        pairs = []
        for place, (index, row) in enumerate(zip(indices, rows, strict=True)):
            pair = {**self.items[index], "image": images[place][None], "label": labels[place][None],
                    "original_size": torch.tensor(sizes[place])}
            if self.full_label:
                pair["full_label"] = torch.from_numpy(np.array(self.cache.packed_mask(row)))
            pairs.append(pair)
        return pairs


def training_cache(setting: str, items: list[dict], image_size: tuple[int, int], *, data_dir: Path, folder: Path,
                   process: distributed.Process, quiet: bool) -> DiskCache | None:
    """The cache that CACHE (`setting`) asks for, chosen on rank 0 for every process: None for the memory cache,
    or the disk cache of `items` in `folder` (made now where there is none, or none that is current)."""
    path, choice = cache_path(folder, image_size), None
    if process.is_main:
        available = available_memory()
        choice = choose_cache(setting, items, image_size, available=available,
                              processes_here=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        print(describe_choice(choice, items, image_size, setting=setting, available=available, path=path))
    if distributed.from_main(choice, process) == "memory":
        return None
    return open_disk_cache(items, image_size, data_dir=data_dir, folder=folder, process=process, quiet=quiet)


def open_disk_cache(items: list[dict], image_size: tuple[int, int], *, data_dir: Path, folder: Path,
                    process: distributed.Process, quiet: bool) -> DiskCache:
    """The disk cache of `items` (all training pairs of the manifest, in its order) in `folder`: the one there when
    it is current, else built now, by every process its rows."""
    path = cache_path(folder, image_size)
    header, current = None, False
    if process.is_main:
        header = expected_header(items, image_size, data_dir)
        current = read_header(path) == header
    header, current = distributed.from_main((header, current), process)
    if current:
        process.print0(f"disk cache: {path}, made before for these {len(items)} pairs")
    else:
        process.print0(f"building the disk cache {path} ({len(items)} pairs, {header['bytes'] / 1e9:.2f} GB)")
        build(items, image_size, path=path, header=header, process=process, quiet=quiet)
    others = sorted(set(folder.glob(cache_path(folder, ("*", "*")).name)) - {path})
    if others:  # kept for runs at those sizes, never removed by train.py: say what they take
        process.print0(f"disk cache: {folder} also holds {', '.join(other.name for other in others)} "
                       f"({sum(other.stat().st_size for other in others) / 1e9:.2f} GB) for other image sizes; "
                       "delete them if no run uses those sizes")
    return DiskCache(path, header, items)


def build(items: list[dict], image_size: tuple[int, int], *, path: Path, header: dict, process: distributed.Process,
          quiet: bool) -> None:
    """Write the cache of `items` to `path`: rank 0 opens a file beside it and every process decodes its rows into
    it; rank 0 writes the header last and renames the file into place."""
    if not process.is_main:
        write_rows(distributed.from_main(None, process), items, image_size, header=header, process=process,
                   quiet=True)
        distributed.wait_for_all(process)  # every row written
        distributed.wait_for_all(process)  # the file in place
        return
    with atomic_write(path, "wb") as file:
        file.truncate(header["bytes"])
        offsets = np.cumsum([0] + [packed_bytes(item["size"]) for item in items], dtype=np.int64)
        file.seek(header["parts"]["offsets"])
        file.write(offsets.tobytes())
        file.flush()
        temporary = distributed.from_main(str(temporary_path(file, path)), process)
        write_rows(temporary, items, image_size, header=header, process=process, quiet=quiet)
        distributed.wait_for_all(process)  # every row written
        start = MAGIC + json.dumps(header).encode()
        if len(start) > HEADER_BYTES:
            raise ValueError(f"the cache's header needs {len(start)} bytes, more than {HEADER_BYTES}")
        file.seek(0)
        file.write(start)
    distributed.wait_for_all(process)


def temporary_path(file: IO, path: Path) -> Path:
    """The path of the temporary file that atomic_write opened beside `path` (every process writes into it)."""
    inode = os.fstat(file.fileno()).st_ino
    return next(p for p in path.parent.glob(f".{glob.escape(hidden_stem(path))}.*.tmp") if p.stat().st_ino == inode)


def write_rows(temporary: str, items: list[dict], image_size: tuple[int, int], *, header: dict,
               process: distributed.Process, quiet: bool) -> None:
    """Decode and resize this process's rows (every world_size-th) into the cache being built at `temporary`."""
    whole = np.memmap(temporary, dtype=np.uint8, mode="r+")
    images, labels, sizes, offsets, packed = parts(whole, header)
    transforms = load_transforms(image_size, with_label=True, keep_full_label=True)
    rows = range(process.rank, len(items), process.world_size)
    for row in progress(rows, desc="disk cache", unit="pair", quiet=quiet):
        item = items[row]
        pair = transforms(item)
        if tuple(pair["original_size"].tolist()) != tuple(item["size"]) or len(pair["full_label"]) != (
                offsets[row + 1] - offsets[row]):
            raise UserError(f"{item['image']} is {'x'.join(map(str, pair['original_size'].tolist()))} pixels, and "
                            f"manifest.csv says {'x'.join(map(str, item['size']))}: run data_cleaning.py again")
        images[row], labels[row] = pair["image"][0].numpy(), pair["label"][0].numpy()
        sizes[row] = pair["original_size"].numpy()
        packed[offsets[row]:offsets[row + 1]] = pair["full_label"].numpy()
    whole.flush()
    del whole
