"""predict.py's work in chunks: resumable, shared by any number of processes (torchrun), merged at the end.

The input files (in input order) are cut into chunks of whole files, each at least a fixed number of images: a
DICOM file's or a video's frames are never split between chunks, so the presence over time, the overlay video and
the DICOM SEG of a file are made inside one chunk, by one process. A chunk's masks, report pictures, overlay videos,
DICOM SEGs and records are written into a hidden folder in OUTPUT.parts/ (beside OUTPUT) and renamed to
chunk-NNNNNN when all are written: a chunk folder is complete or absent, whatever stops the process (a killed
process leaves only a hidden .chunk-NNNNNN.building-* folder, removed by the next run). A rerun of the same command
does only the chunks that are absent, with any number of processes; OUTPUT.parts/settings.json holds what the
chunks were made with (the model file's hash, the images, every setting that changes what a chunk holds) and a
rerun with other ones is refused, naming what differs. At the end one process merges the chunks, in order, into
the output folder (outputs.OutputFolder: built beside OUTPUT, swapped in when complete) and removes OUTPUT.parts.
"""

import hashlib
import heapq
import json
import os
import shutil
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

from nerveseg.errors import UserError
from nerveseg.files import atomic_write, building_folder, discard_building, swap_into_place, write_json
from nerveseg.inference.records import ImageResult
from nerveseg.inference.report import PICTURES
from nerveseg.inputs import CHUNKS_MARKER
from nerveseg.video import is_video_file

RECORDS = "records.jsonl"  # a chunk's records, one JSON object a line, in the order they were made
CONTENTS = "chunk.json"  # a chunk's rows of the report page, and the videos and DICOM SEGs it wrote
SETTINGS = CHUNKS_MARKER  # the settings the chunks were made with; marks the folder as ours (not input)
WAIT_REPORT_SECONDS = 30  # the process that merges says how many chunks it waits for at least this often


@dataclass(frozen=True)
class ChunkPlan:
    """Chunk `index`: the items start..stop-1 of the input (whole files); `first_row` is the number of report
    entries before it (an image or a DICOM frame is one, a video one in all), which names its pictures."""

    index: int
    start: int
    stop: int
    first_row: int


def plan_chunks(items: list[dict], size: int) -> list[ChunkPlan]:
    """The items cut into chunks of whole files (consecutive items of one file are its frames), each of at least
    `size` items but the last."""
    plans, start, first_row = [], 0, 0
    for stop in range(1, len(items) + 1):
        end_of_file = stop == len(items) or items[stop]["image_path"] != items[stop - 1]["image_path"]
        if end_of_file and (stop - start >= size or stop == len(items)):
            plans.append(ChunkPlan(len(plans), start, stop, first_row))
            first_row += rows_of(items[start:stop])
            start = stop
    return plans


def rows_of(items: list[dict]) -> int:
    """The report entries of a run of whole files: one an image or DICOM frame, one a video."""
    return sum(not is_video_file(item["image_path"]) for item in items) + len(
        {item["image_path"] for item in items if is_video_file(item["image_path"])})


def batches_of(plans: list[ChunkPlan], batch_size: int) -> list[list[int]]:
    """The batches of the chunks `plans` read one after another (positions in their items, concatenated): each
    chunk's items in batches of `batch_size`, its last maybe fewer, so a batch is the same whoever reads it."""
    batches, offset = [], 0
    for plan in plans:
        count = plan.stop - plan.start
        batches += [list(range(offset + first, offset + min(first + batch_size, count)))
                    for first in range(0, count, batch_size)]
        offset += count
    return batches


def parts_folder(output: Path) -> Path:
    """Where the chunks of OUTPUT are kept until they are merged."""
    return output.parent / f"{output.name}.parts"


def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}"


def file_digest(path: str | Path) -> str:
    """The sha256 of a file (a model: what the chunks were predicted with)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def list_digest(items: list[dict]) -> str:
    """The sha256 of the list of images (ids and files, in order)."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item['id']}\t{item['image']}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def open_parts(folder: Path, settings: dict, chunks: int) -> list[int]:
    """Make or reopen `folder` for chunks made with `settings`: refused where it holds the chunks of other
    settings. The chunks still to do."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot make {folder}: {error.strerror}; choose another --output") from None
    recorded = folder / SETTINGS
    if recorded.is_file():
        try:
            earlier = json.loads(recorded.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = {}
        differs = [f"{key} {earlier.get(key)!r} then, {value!r} now" for key, value in settings.items()
                   if earlier.get(key) != value]
        if differs:
            raise UserError(f"{folder} holds the chunks of an unfinished run with other settings ("
                            f"{'; '.join(differs)}); run it again as it was to finish it, or delete {folder} to start "
                            "again")
    else:
        write_json(recorded, settings)
    return [index for index in range(chunks) if not (folder / chunk_name(index)).is_dir()]


class Chunk:
    """One chunk being made, in a hidden folder (locked while this process lives: a killed run's is removed by the
    next), renamed into place by commit()."""

    def __init__(self, parts: Path, plan: ChunkPlan) -> None:
        self.plan, self.target = plan, parts / chunk_name(plan.index)
        try:
            self.folder = building_folder(self.target)
        except OSError as error:
            raise UserError(f"cannot write into {parts}: {error.strerror}; choose another --output") from None
        (self.folder / "masks").mkdir()
        self.results: list[ImageResult] = []
        self.discard = weakref.finalize(self, discard_building, self.folder)  # unless committed

    def commit(self, report_rows: list[dict], media: list[str]) -> None:
        """Write the records, the report's rows and the names of the videos and DICOM SEGs written, then rename the
        folder into place: the chunk is done."""
        with atomic_write(self.folder / RECORDS) as file:  # JSON in ASCII: a name that is not UTF-8 comes back whole
            file.writelines(json.dumps(asdict(result)) + "\n" for result in self.results)
        write_json(self.folder / CONTENTS, {"rows": report_rows, "media": media})
        self.discard.detach()
        swap_into_place(self.folder, self.target)


def wait_for_chunks(parts: Path, chunks: int, say: Callable[[str], None]) -> None:
    """Until every chunk is committed (by the other processes), saying how many are left now and then."""
    said = time.monotonic()
    while missing := [index for index in range(chunks) if not (parts / chunk_name(index)).is_dir()]:
        if time.monotonic() - said > WAIT_REPORT_SECONDS:
            say(f"waiting for the other processes: {len(missing)} of {chunks} chunks to go")
            said = time.monotonic()
        time.sleep(0.2)


def records(parts: Path, chunks: int) -> Iterator[ImageResult]:
    """Every record of every chunk, in input order, one line in memory at a time."""
    for index in range(chunks):
        with open(parts / chunk_name(index) / RECORDS, encoding="utf-8") as file:
            for line in file:
                yield ImageResult(**json.loads(line))


def contents(parts: Path, chunk: int) -> dict:
    """What a chunk wrote beside its records: its rows of the report page, its videos and DICOM SEGs."""
    return json.loads((parts / chunk_name(chunk) / CONTENTS).read_text(encoding="utf-8"))


def rows(parts: Path, chunks: int) -> Iterator[dict]:
    """Every row of the report page of every chunk, one chunk's in memory at a time."""
    for index in range(chunks):
        yield from contents(parts, index)["rows"]


def media(parts: Path, chunks: int) -> list[str]:
    """The names of the videos and DICOM SEGs the chunks wrote, in input order."""
    return [name for index in range(chunks) for name in contents(parts, index)["media"]]


def shown_rows(parts: Path, chunks: int, limit: int) -> list[dict] | None:
    """The report's rows to show when there are more than `limit` (None: all are shown), in bounded memory: the
    videos and skipped files first (up to half), then the images with the lowest Dice (where truths were given,
    up to half of what is left), then the least certain of the others."""
    if sum(1 for _ in islice(rows(parts, chunks), limit + 1)) <= limit:
        return None
    special = list(islice(((n, row) for n, row in enumerate(rows(parts, chunks))
                           if row["kind"] in ("video", "skipped")), limit // 2))
    chosen = {n for n, _ in special}
    worst = heapq.nsmallest((limit - len(chosen)) // 2, ((row["dice"], n) for n, row in enumerate(rows(parts, chunks))
                                                         if row["dice"] is not None))
    chosen |= {n for _, n in worst}
    uncertain = heapq.nsmallest(limit - len(chosen), (
        (-row["uncertainty"], n) for n, row in enumerate(rows(parts, chunks))
        if row["uncertainty"] is not None and n not in chosen))
    chosen |= {n for _, n in uncertain}
    return [row for n, row in enumerate(rows(parts, chunks)) if n in chosen]


def link_outputs(parts: Path, chunks: int, building: Path, *, pictures: set[str] | None) -> None:
    """Hard-link every file a chunk made (masks, overlay videos, DICOM SEGs, the report's pictures: those in
    `pictures` only, unless None) into the output folder being built: the chunks stay whole until the output is in
    place. A file system without hard links gets copies."""
    for index in range(chunks):
        chunk = parts / chunk_name(index)
        for folder, _, files in os.walk(chunk):
            below = Path(folder).relative_to(chunk)
            if below == Path("."):
                continue  # the chunk's records and contents
            (building / below).mkdir(parents=True, exist_ok=True)
            for name in files:
                relative = (below / name).as_posix()
                if pictures is not None and relative.startswith(f"{PICTURES}/") and relative not in pictures:
                    continue
                link(chunk / relative, building / relative)


def link(source: Path, target: Path) -> None:
    """A hard link of `source` at `target` (a copy where the file system has no hard links)."""
    try:
        os.link(source, target)
    except OSError:
        try:
            shutil.copyfile(source, target)
        except OSError as error:
            raise UserError(f"cannot write {target}: {error.strerror}; the chunks done so far are kept in "
                            f"{source.parent}, run the same command again") from None
