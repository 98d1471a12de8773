"""DICOM in: ultrasound as hospitals store it, read frame by frame as 8-bit grayscale with its physical pixel size.

A DICOM file holds one image or a cine loop of many frames (multi-frame), in grayscale (MONOCHROME1/2), colour
(RGB, YBR_FULL, YBR_FULL_422, a palette), uncompressed or JPEG-compressed. `inspect_dicom` reads only its header
(nothing is decoded): how many frames, their size, the size of a pixel in millimetres, or why the file is not an
image to segment (a structured report, a DICOMDIR, a segmentation, no pixel data, a compression no decoder here
reads, a file that ends early). `read_dicom_frame` decodes one frame (never the whole loop) as 8-bit grayscale,
the way nerveseg/images.py converts other images: colours by luminance, more than 8 bits stretched or windowed.

The size of a pixel comes from the Sequence of Ultrasound Regions (PhysicalDeltaX/Y, in cm, of the largest
two-dimensional tissue region), else from Pixel Spacing (mm); areas are then reported in mm² too.

pydicom, pylibjpeg and pylibjpeg-libjpeg are the optional extra `dicom` (pip install "nerveseg[dicom]"); without
them a DICOM input is refused with a message that names it.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

from nerveseg.errors import UserError
from nerveseg.images import MAX_IMAGE_PIXELS, GrayImage, UnreadableImage, check_regular_file

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
MAGIC_OFFSET, MAGIC = 128, b"DICM"  # a DICOM file (Part 10) starts with a 128-byte preamble and "DICM"
CENTIMETRES = 3  # PhysicalUnitsX/YDirection: 3 means cm
TISSUE = 1  # RegionSpatialFormat 1: a two-dimensional (B-mode) region
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
DICOMDIR = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage


def require_pydicom() -> ModuleType:
    """pydicom, or a UserError naming the extra to install."""
    try:
        import pydicom
    except ImportError:
        raise UserError('reading DICOM needs the "dicom" extra: pip install "nerveseg[dicom]" '
                        "(pydicom, pylibjpeg, pylibjpeg-libjpeg)") from None
    return pydicom


def is_dicom_file(path: str | Path) -> bool:
    """A DICOM file by its name (.dcm, .dicom, .dic), or, with no suffix (IM0001, DICOMDIR), by "DICM" after its
    preamble."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix or not path.is_file():
        return False
    try:
        with open(path, "rb") as file:
            file.seek(MAGIC_OFFSET)
            return file.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class DicomFile:
    """What a DICOM file's header says: its frames and their size, the size of a pixel in mm (row step, column
    step) where known, the time between frames in seconds (0 when not given), and its SOP Instance UID."""

    path: str
    frames: int
    height: int
    width: int
    pixel_size_mm: tuple[float, float] | None
    frame_seconds: float
    instance_uid: str


def inspect_dicom(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> DicomFile:
    """Read a DICOM file's header (no pixel is decoded); UnreadableImage says why it is not an image to segment."""
    header = read_header(path, max_pixels=max_pixels)
    frame_time = header.get("FrameTime")
    return DicomFile(str(path), int(header.get("NumberOfFrames", 1) or 1), int(header.Rows), int(header.Columns),
                     pixel_size_mm(header), float(frame_time) / 1000 if frame_time else 0.0,
                     str(header.get("SOPInstanceUID", "")))


def read_header(path: str | Path, *, max_pixels: int) -> "pydicom.Dataset":  # noqa: F821
    """The header of a DICOM image to segment (its pixel data is not read); UnreadableImage otherwise."""
    pydicom = require_pydicom()
    check_regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = pydicom.dcmread(path, defer_size=4096)  # large values (the pixels) are not read
    except pydicom.errors.InvalidDicomError:
        raise UnreadableImage(f"{path}: not a DICOM file (no DICM marker after the preamble)") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError) as error:  # pydicom's errors on a damaged header
        raise UnreadableImage(f"{path}: a damaged or truncated DICOM file ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:160] if str(error) else 'no detail'})") from None
    kind = str(header.get("SOPClassUID", "") or getattr(header.get("file_meta", None), "MediaStorageSOPClassUID", ""))
    if kind == DICOMDIR or "DirectoryRecordSequence" in header:
        raise UnreadableImage(f"{path}: a DICOMDIR (the index of a DICOM disc), not an image; "
                              "predict its image files instead")
    if kind == SEGMENTATION_STORAGE:
        raise UnreadableImage(f"{path}: a DICOM Segmentation (a mask), not an image to segment")
    if "PixelData" not in header:
        name = pydicom.uid.UID(kind).name if kind else "object"
        if "Image" in name:  # an image class: its pixel data was cut off (pydicom drops an unfinished one)
            raise UnreadableImage(f"{path}: a truncated or damaged DICOM file ({name}): its pixel data is missing "
                                  "or cut")
        raise UnreadableImage(f"{path}: a DICOM {name} without pixel data, not an image")
    check_decodable(path, header)
    height, width = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
    if height < 1 or width < 1 or "BitsAllocated" not in header or "SamplesPerPixel" not in header:
        raise UnreadableImage(f"{path}: a DICOM image without its Rows, Columns, Bits Allocated or Samples per "
                              "Pixel (a damaged header)")
    if height * width > max_pixels:
        raise UnreadableImage(f"{path}: {width}x{height} is {width * height / 1e6:.4g} million pixels a frame, more "
                              f"than the {max_pixels / 1e6:g} million allowed (--max-image-pixels)")
    check_complete(path, header)
    return header


def check_decodable(path: str | Path, header: object) -> None:
    """Refuse a transfer syntax that no installed decoder reads (JPEG 2000 without its plugin, MPEG video, ...)."""
    pydicom = require_pydicom()
    syntax = header.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_compressed:
        return
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except NotImplementedError:
        raise UnreadableImage(f"{path}: its compression, {syntax.name}, is not one this pipeline decodes; export it "
                              "uncompressed or as JPEG") from None
    if not decoder.is_available:
        raise UnreadableImage(f'{path}: its compression, {syntax.name}, needs a decoder that is not installed '
                              f'(pip install "nerveseg[dicom]")')


def check_complete(path: str | Path, header: object) -> None:
    """Refuse an uncompressed file that ends before the pixel data its header announces (a truncated copy);
    a compressed one, whose frames have no set length, fails when the missing frame is decoded."""
    from pydicom.pixels.utils import get_expected_length

    element = header["PixelData"]
    if element.is_undefined_length or element.file_tell is None:
        return
    end, size = element.file_tell + get_expected_length(header), Path(path).stat().st_size
    if end > size:
        raise UnreadableImage(f"{path}: a truncated DICOM file: it ends at byte {size}, its pixel data should end "
                              f"at byte {end}")


def pixel_size_mm(header: object) -> tuple[float, float] | None:
    """(row step, column step) of a pixel in mm: from the largest 2-D tissue region in cm of the Sequence of
    Ultrasound Regions, else Pixel Spacing; None where neither says."""
    regions = []
    for region in header.get("SequenceOfUltrasoundRegions", []) or []:
        units = (region.get("PhysicalUnitsXDirection"), region.get("PhysicalUnitsYDirection"))
        deltas = (region.get("PhysicalDeltaY"), region.get("PhysicalDeltaX"))
        if units == (CENTIMETRES, CENTIMETRES) and all(deltas) and region.get("RegionSpatialFormat", TISSUE) == TISSUE:
            extent = ((int(region.get("RegionLocationMaxX1", 0)) - int(region.get("RegionLocationMinX0", 0)))
                      * (int(region.get("RegionLocationMaxY1", 0)) - int(region.get("RegionLocationMinY0", 0))))
            regions.append((extent, (abs(float(deltas[0])) * 10, abs(float(deltas[1])) * 10)))
    if regions:
        return max(regions, key=lambda region: region[0])[1]
    spacing = header.get("PixelSpacing")
    if spacing and len(spacing) == 2 and all(float(step) > 0 for step in spacing):
        return float(spacing[0]), float(spacing[1])
    return None


def read_dicom_frame(path: str | Path, frame: int = 1, *, max_pixels: int = MAX_IMAGE_PIXELS) -> GrayImage:
    """Frame `frame` (1 = the first) of a DICOM file as 8-bit grayscale; only that frame is decoded."""
    image = read_dicom_pixels(path, frame, max_pixels=max_pixels)
    return GrayImage(to_gray8(image.pixels, image.photometric, image.window), image.photometric, "")


def read_dicom_labels(path: str | Path, frame: int = 1, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Frame `frame` of a DICOM mask as its stored values (int64, colours as nerveseg.images.mask_labels gives
    them), for masks given as DICOM."""
    image = read_dicom_pixels(path, frame, max_pixels=max_pixels)
    if image.pixels.ndim == 3:
        from nerveseg.images import mask_labels

        return mask_labels(Image.fromarray(image.pixels.astype(np.uint8), "RGB"))
    return image.pixels.astype(np.int64)


@dataclass
class DicomPixels:
    """A decoded frame as stored (RGB where it was in colour), its photometric interpretation and its window
    (centre, width) when the file gives one."""

    pixels: np.ndarray
    photometric: str
    window: tuple[float, float] | None


def read_dicom_pixels(path: str | Path, frame: int, *, max_pixels: int) -> DicomPixels:
    """One frame decoded (colour spaces converted to RGB, palettes applied); UnreadableImage on any failure."""
    pydicom = require_pydicom()
    header = read_header(path, max_pixels=max_pixels)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if not 1 <= frame <= frames:
        raise UnreadableImage(f"{path}: has {frames} frames, not a frame {frame}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = pydicom.pixels.pixel_array(str(path), index=frame - 1)
            photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2"))
            if photometric == "PALETTE COLOR":
                pixels, photometric = pydicom.pixels.apply_color_lut(pixels, header), "RGB"
    except (ValueError, EOFError, OSError, KeyError, IndexError, RuntimeError, NotImplementedError) as error:
        text = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        ends = isinstance(error, EOFError) or any(word in text for word in ("length", "EOF", "reshape", "ends"))
        cause = "the file ends early" if ends else text
        raise UnreadableImage(f"{path}: frame {frame} cannot be decoded ({cause}); a truncated or damaged "
                              "DICOM file") from None
    centre, width = header.get("WindowCenter"), header.get("WindowWidth")
    window = None
    if centre is not None and width is not None:  # several windows: the first is the default view
        window = tuple(float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)
                       for value in (centre, width))
    return DicomPixels(np.asarray(pixels), "RGB" if pixels.ndim == 3 else photometric, window)


def to_gray8(pixels: np.ndarray, photometric: str, window: tuple[float, float] | None) -> np.ndarray:
    """A decoded frame as 8-bit grayscale: RGB by luminance (as PIL's convert("L")), 8-bit grey as it is, wider
    grey through its window where given, else stretched from its lowest to its highest value; MONOCHROME1 (white
    is zero) inverted."""
    if pixels.ndim == 3:
        return np.asarray(Image.fromarray(pixels.astype(np.uint8), "RGB").convert("L"))
    if pixels.dtype == np.uint8:  # as stored: a window on 8-bit ultrasound only changes what the scanner showed
        gray = pixels
    else:
        values = pixels.astype(np.float64)
        if window is not None and window[1] > 1:
            low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
        else:
            low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        gray = np.round(np.clip(scaled, 0, 255)).astype(np.uint8)
    return 255 - gray if photometric == "MONOCHROME1" else gray
