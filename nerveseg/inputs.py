"""The images a model reads: finding them below a folder (natural order, truths told apart from images) and
reading them one by one, an unreadable one skipped with its reason. Used by predict.py and export.py."""

import os
import re
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from monai.data import Dataset
from PIL import Image, UnidentifiedImageError

from nerveseg.errors import UserError
from nerveseg.frames import frame_items, is_media_file, media_fields, split_frame
from nerveseg.images import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, UnreadableImage
from nerveseg.video import MAX_VIDEO_FRAMES

IMAGE_FOLDERS = ("images", "image", "imgs", "img")


MASK_FOLDERS = ("masks", "mask", "labels", "label", "gt", "ground_truth", "groundtruth", "annotations")


CHUNKS_MARKER = ".nerveseg-chunks.json"  # predict.py's OUTPUT.parts/: the settings its chunks were made with
PIPELINE_MARKERS = ("cleaning.json", ".nerveseg-predictions", CHUNKS_MARKER, "train_masks.csv")  # never own data


def skipped_folder(folder: Path) -> bool:
    """A hidden folder, or one the pipeline wrote (a clean copy, predictions and their unfinished chunks) or a Kaggle
    download's own folder: never read as own data (so --output may lie inside --input)."""
    return folder.name.startswith(".") or any((folder / marker).exists() for marker in PIPELINE_MARKERS)


def image_files(folder: Path, *, media: bool = False) -> list[Path]:
    """Image files below `folder`, at any depth, in a fixed order (with `media`, DICOM files and videos too: see
    nerveseg/frames.py). Hidden files and folders are skipped, and so are folders the pipeline wrote (a clean
    copy, predictions) or a Kaggle download's own folder. Symbolic links to folders are followed, each folder read
    once: a link back up the tree (a loop) is not followed again."""
    found, visited = [], set()
    for root, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:  # reached again through a link: a loop, or a second link to the same folder
            folders[:] = []
            continue
        visited.add(real)
        folders[:] = sorted(name for name in folders if not skipped_folder(Path(root, name)))
        found += [Path(root, name) for name in sorted(files) if not name.startswith(".") and
                  (name.lower().endswith(IMAGE_SUFFIXES) or media and is_media_file(Path(root, name)))]
    return found


def mask_name_pattern(suffix: str) -> re.Pattern:
    """<name><suffix> or <name><suffix>_<k> (an extra mask of the same image); group "base" is <name>."""
    return re.compile(rf"^(?P<base>.+?){re.escape(suffix)}(?:_\d+)?$")


def relative_id(path: Path, root: Path) -> str:
    """The path below `root` without its extension, "/"-separated."""
    return path.relative_to(root).with_suffix("").as_posix()


def join_id(folder: str, name: str) -> str:
    """folder/name, or name alone for the top folder ("" or ".")."""
    return name if folder in ("", ".") else f"{folder}/{name}"


def id_of(path: Path, root: Path, mask_pattern: re.Pattern) -> tuple[str, bool]:
    """A file's id below `root`, and whether its name marks it as a mask (<name>_mask: then the id is <name>'s)."""
    folder, _, stem = relative_id(path, root).rpartition("/")
    match = mask_pattern.match(stem)
    return join_id(folder, match["base"] if match else stem), match is not None


def folder_pairs(source: Path) -> list[tuple[Path, Path]]:
    """(images folder, masks folder) siblings at the top of `source` or one level of class folders down."""
    pairs = []
    for parent in [source, *sorted(p for p in source.iterdir() if p.is_dir() and not skipped_folder(p))]:
        children = {child.name.lower(): child for child in parent.iterdir() if child.is_dir()}
        images = next((children[name] for name in IMAGE_FOLDERS if name in children), None)
        masks = next((children[name] for name in MASK_FOLDERS if name in children), None)
        if images is not None and masks is not None:
            pairs.append((images, masks))
    return pairs


def images_to_segment(folder: Path, suffix: str, *, option: str = "--input", max_pixels: int = MAX_IMAGE_PIXELS,
                      max_video_frames: int = MAX_VIDEO_FRAMES) -> list[dict]:
    """The images below `folder` (any depth) for predict.py, sorted naturally, each with its id: its path below the
    folder without extension. A file named like a mask of an image beside it (<name>_mask.png), or in the masks/
    folder beside an images/ folder, is a truth, not an image to segment. A DICOM file or a video is its frames,
    `<id>#<n>` (nerveseg.frames.frame_items). `option` names the setting that gave `folder`, for the messages."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass {option} with a folder of images")
    masks_folders = {masks for _, masks in folder_pairs(folder)}
    files = [path for path in image_files(folder, media=True)
             if not any(masks in path.parents for masks in masks_folders)]
    pattern = mask_name_pattern(suffix)
    ids = [id_of(path, folder, pattern) for path in files]
    image_ids = {identifier for identifier, is_mask in ids if not is_mask}
    images = [path for path, (identifier, is_mask) in zip(files, ids, strict=True)
              if not (is_mask and identifier in image_ids)]
    if not images:
        held_out = folder.parent / "held-out" / "images"  # own data: test/ is empty, the test set is held-out/
        hint = f" (to test on the held-out subjects: --input {held_out} --masks {held_out.parent / 'masks'})"
        raise UserError(f"{folder} holds no images (.tif, .png, .jpg, .bmp, DICOM or video); pass {option} with a "
                        "folder of images"
                        + (hint if held_out.is_dir() else ""))
    by_id: dict[str, list[Path]] = {}
    for path in images:
        by_id.setdefault(relative_id(path, folder), []).append(path)
    for identifier, paths in by_id.items():
        if len(paths) > 1:
            raise UserError(f"{' and '.join(map(str, paths))} would both be segmented as {identifier}.png; rename one")
    items = []
    for identifier, paths in sorted(by_id.items(), key=lambda item: natural_key(item[0])):
        if is_media_file(paths[0]):
            items += frame_items(paths[0], identifier, max_pixels=max_pixels, max_video_frames=max_video_frames)
        else:
            items.append({"image": str(paths[0]), "image_path": str(paths[0]), "id": identifier, **media_fields()})
    return items


def truth_files(folder: Path, suffix: str, *, images: set[Path]) -> dict[str, list[Path]]:
    """The masks below `folder` by the id of their image: <id>.png, <id>_mask.png, <id>_mask_1.png, ... (any image
    format; `images`, the resolved paths of the images being segmented, are not masks even in the same folder)."""
    pattern = mask_name_pattern(suffix)
    found: dict[str, list[Path]] = {}
    for path in image_files(folder, media=True):
        if path.resolve() not in images:
            found.setdefault(id_of(path, folder, pattern)[0], []).append(path)
    return found


def mask_suffix_hint(groups: list[tuple[list[str], set[str]]], suffix: str) -> str:
    """A hint at --mask-suffix where names add one ending to another file's name (case1_seg beside case1), "" if
    none. `groups`: the names (without extension) of one folder, each with the names they may extend (those of the
    same folder, or of the images/ folder beside a masks/ folder)."""
    endings: Counter = Counter()
    for names, bases in groups:
        for name in names:
            for separator in re.finditer(r"[-_. ]", name):
                if name[: separator.start()] in bases:
                    ending = name[separator.start():]
                    endings[re.sub(r"(?<=.)_\d+$", "", ending)] += 1  # an extra mask <name>_seg_1 counts as _seg
                    break
    endings.pop(suffix, None)
    if not endings:
        return ""
    ending, count = endings.most_common(1)[0]
    return f" {count} file(s) are named <name>{ending} beside <name>: if those are masks, pass --mask-suffix {ending}."


def natural_key(name: object) -> tuple:
    """Sort "2_10" after "2_9" (and subject 10 after subject 9). Only the digits 0-9 are numbers: "²" or "٣" are
    text (str.isdigit() takes "²" for a digit that int() then refuses)."""
    parts = re.split(r"([0-9]+)", str(name))
    return tuple(int(part) if index % 2 else part for index, part in enumerate(parts))



IMAGE_SIGNATURES = {b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"\x89PNG": "PNG", b"\xff\xd8": "JPEG", b"BM": "BMP"}


class ReadableDataset(Dataset):
    """A MONAI Dataset that reports an unreadable image by name and reason instead of failing inside a worker.

    Each item carries "error" (why it could not be read, "" when it was) and "notes" (see
    nerveseg.images.read_gray); a failed item holds a blank image of the network's size so the batch can still be
    assembled, and the main process skips it (or stops, with --strict).
    The library's own warnings about a damaged file (PIL's "Corrupt EXIF data", ...) are silenced: the
    summary says what happened to every file.
    """

    def __init__(self, data: list[dict], transform: Callable, image_size: tuple[int, int]) -> None:
        super().__init__(data, transform)
        self.image_size = image_size

    def _transform(self, index: int) -> dict:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return {**super()._transform(index), "error": ""}
        except Exception as error:  # any reader failure: truncated, not an image, unsupported mode
            item = self.data[index]
            return {
                **item,
                "image": torch.zeros(1, *self.image_size, dtype=torch.uint8),
                "original_size": torch.tensor([1, 1]),
                "notes": "",
                "error": read_error_reason(item["image"], error),
            }


def read_error_reason(path: str, error: BaseException) -> str:
    """Why an image could not be read, in words: the reason it was refused before decoding (see
    nerveseg.images.opened_image), or else, since MONAI wraps the reader's error, the cause found by opening the
    file again with PIL alone."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, UnreadableImage):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:  # a frame's reason names its file: "<file>: frame <n>: ..."
        return str(cause).removeprefix(f"{path}: ").removeprefix(f"{split_frame(path)[0]}: ")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                image.load()
    except UnidentifiedImageError:
        with open(path, "rb") as file:
            start = file.read(8)
        kind = next((kind for signature, kind in IMAGE_SIGNATURES.items() if start.startswith(signature)), None)
        if kind:
            return f"a damaged or truncated {kind} file (it starts like one, but cannot be decoded)"
        return "not an image (or in a format PIL cannot read)"
    except OSError as cause:
        text = str(cause).splitlines()[0][:200] if str(cause) else type(cause).__name__
        return f"truncated: the file ends early ({text})" if "truncated" in text.lower() else f"unreadable ({text})"
    except Exception as cause:  # PIL raises others on malformed files: ValueError, SyntaxError, ...
        return f"damaged ({type(cause).__name__}: {str(cause)[:200]})"
    return f"cannot be converted ({type(error).__name__}: {str(error).splitlines()[0][:200]})"


def read_some(dataset: ReadableDataset, count: int) -> tuple[list[dict], list[str]]:
    """The first `count` readable items of `dataset`, and why each unreadable one before them was skipped."""
    readable, skipped = [], []
    for index in range(len(dataset)):
        if len(readable) == count:
            break
        item = dataset[index]
        if item["error"]:  # the item's image is the blank stand-in: name the file it came from
            skipped.append(f"{dataset.data[index]['image']}: {item['error']}")
        else:
            readable.append(item)
    return readable, skipped

