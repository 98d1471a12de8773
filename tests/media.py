"""Synthetic DICOM files (pydicom writes them) and videos (PyAV writes them) from the synthetic generator's frames,
with the nerve's truth: what the DICOM and video tests read, and what predict.py's tests segment."""

import io
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from nerveseg.cleaning import synthetic
from nerveseg.cleaning.synthetic_video import sweep_frames

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def nerve_frames(count: int, *, subject: int = 1, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` synthetic frames of one subject (580 x 420, uint8) with their nerve masks (bool)."""
    return [synthetic._picture(seed, 1, subject, frame, True) for frame in range(1, count + 1)]


def moving_nerve(count: int, *, subject: int = 1, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """A probe sweep of `count` frames: the nerve slides out of the field and back, with its true masks
    (nerveseg.cleaning.synthetic_video)."""
    return sweep_frames(count, subject=subject, seed=seed)


def dicom_dataset(frames: Sequence[np.ndarray], *, photometric: str = "MONOCHROME2", jpeg: bool = False,
                  pixel_size_cm: tuple[float, float] | None = (0.01, 0.012), pixel_spacing: bool = False,
                  sop_class: str = "") -> "pydicom.Dataset":  # noqa: F821
    """A DICOM ultrasound image of `frames` (uint8, (H, W) gray or (H, W, 3) RGB), stored as `photometric`
    (MONOCHROME2, RGB, YBR_FULL, YBR_FULL_422), uncompressed or JPEG baseline, with a Sequence of Ultrasound
    Regions giving (PhysicalDeltaY, PhysicalDeltaX) in cm, or Pixel Spacing in mm instead."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.pixels import convert_color_space
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    height, width = frames[0].shape[:2]
    colour = frames[0].ndim == 3
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class or (US_MULTIFRAME if len(frames) > 1 else US_IMAGE)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "US", "Synthetic^Nerve", "SYN001"
    ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber, ds.ReferringPhysicianName = "", "O", "", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.StudyDate, ds.StudyTime, ds.Manufacturer = "20261207", "120000", "nerveseg tests"
    ds.Rows, ds.Columns = height, width
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if colour:
        ds.PlanarConfiguration = 0
    if len(frames) > 1:
        ds.NumberOfFrames, ds.FrameTime = len(frames), 1000 / 30
        ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
    if pixel_size_cm and not pixel_spacing:
        region = Dataset()
        region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0
        region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
        region.RegionLocationMaxX1, region.RegionLocationMaxY1 = width - 1, height - 1
        region.PhysicalUnitsXDirection, region.PhysicalUnitsYDirection = 3, 3
        region.PhysicalDeltaY, region.PhysicalDeltaX = pixel_size_cm
        ds.SequenceOfUltrasoundRegions = [region]
    elif pixel_size_cm:
        ds.PixelSpacing = [pixel_size_cm[0] * 10, pixel_size_cm[1] * 10]
    if jpeg:
        ds.PixelData = encapsulate([jpeg_bytes(frame) for frame in frames])
        ds["PixelData"].VR = "OB"
        if colour:
            ds.PhotometricInterpretation = "YBR_FULL_422"  # what a JPEG baseline colour image is stored as
    else:
        stored = [np.asarray(frame, np.uint8) for frame in frames]
        if photometric in ("YBR_FULL", "YBR_FULL_422"):
            stored = [convert_color_space(frame, "RGB", "YBR_FULL") for frame in stored]
        if photometric == "YBR_FULL_422":
            stored = [subsample_422(frame) for frame in stored]
        ds.PixelData = b"".join(frame.tobytes() for frame in stored)
    return ds


def jpeg_bytes(frame: np.ndarray) -> bytes:
    """A frame as a baseline JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def subsample_422(ybr: np.ndarray) -> np.ndarray:
    """YBR_FULL pixels stored as YBR_FULL_422: Y1 Y2 Cb Cr for each pair of pixels of a row."""
    y, cb, cr = ybr[..., 0], ybr[..., 1], ybr[..., 2]
    pairs = np.stack([y[:, 0::2], y[:, 1::2], cb[:, 0::2], cr[:, 0::2]], -1)
    return pairs.astype(np.uint8)


def write_dicom(path: Path, frames: Sequence[np.ndarray], **options: object) -> Path:
    """Write dicom_dataset(frames, **options) to `path`."""
    dataset = dicom_dataset(frames, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def write_structured_report(path: Path) -> Path:
    """A DICOM Basic Text SR: a DICOM file with no pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = BASIC_TEXT_SR, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = BASIC_TEXT_SR, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "SR", "SYN001"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_video(path: Path, frames: Sequence[np.ndarray], *, fps: int = 30, codec: str = "libx264") -> Path:
    """Write 8-bit grayscale frames as a video (H.264 in mp4 or mov; mpeg4 or mjpeg in avi); the moov atom
    first in mp4, so that a truncated file keeps its header."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape
    options = {"movflags": "faststart"} if path.suffix in (".mp4", ".mov") else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="gray")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_jpeg_video(path: Path, frames: Sequence[np.ndarray], *, fps: int = 30,
                     corrupt: Sequence[int] = ()) -> Path:
    """An avi of JPEG frames muxed one by one (so frames may differ in size), the frames at the indices in
    `corrupt` (0 = the first) damaged."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=fps)
        stream.height, stream.width = frames[0].shape
        stream.pix_fmt = "yuvj420p"
        for index, frame in enumerate(frames):
            data = jpeg_bytes(frame)
            if index in corrupt:
                data = data[:200] + b"\0" * 50 + data[250:600]
            packet = av.Packet(data)
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, index, index, Fraction(1, fps)
            container.mux(packet)
    return path
