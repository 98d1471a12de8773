"""DICOM in: every frame of single- and multi-frame files, in grayscale, RGB and YBR, uncompressed and JPEG, with
its pixel size; files that are not images, truncated or in an unsupported compression refused with a reason."""

import sys

import numpy as np
import pytest
from PIL import Image

from nerveseg import dicom
from nerveseg.errors import UserError
from nerveseg.images import UnreadableImage
from tests import media

pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Three synthetic nerve frames (580 x 420)."""
    return [image for image, _ in media.nerve_frames(3)]


def luminance(rgb: np.ndarray) -> np.ndarray:
    """What nerveseg.images.to_grayscale makes of an RGB picture."""
    return np.asarray(Image.fromarray(rgb).convert("L")).astype(int)


@pytest.mark.parametrize(("photometric", "jpeg", "tolerance"), [
    ("MONOCHROME2", False, 0), ("RGB", False, 0), ("YBR_FULL", False, 1), ("YBR_FULL_422", False, 1),
    ("MONOCHROME2", True, 3), ("RGB", True, 4),
])
def test_every_frame_reads_as_the_grey_picture(tmp_path, frames, photometric, jpeg, tolerance):
    colour = photometric != "MONOCHROME2"
    stored = [np.stack([frame, frame // 2, 255 - frame], -1) for frame in frames] if colour else frames
    path = media.write_dicom(tmp_path / "cine.dcm", stored, photometric=photometric, jpeg=jpeg)
    info = dicom.inspect_dicom(path)
    assert (info.frames, info.height, info.width) == (3, 420, 580)
    assert info.frame_seconds == pytest.approx(1 / 30)
    for number, picture in enumerate(stored, start=1):
        gray = dicom.read_dicom_frame(path, number).pixels
        expected = luminance(picture) if colour else picture.astype(int)
        assert gray.shape == (420, 580) and gray.dtype == np.uint8
        assert np.abs(gray.astype(int) - expected).mean() <= tolerance


def test_single_frame_file_and_pixel_sizes(tmp_path, frames):
    regions = media.write_dicom(tmp_path / "one.dcm", frames[:1], pixel_size_cm=(0.01, 0.012))
    spacing = media.write_dicom(tmp_path / "spacing.dcm", frames[:1], pixel_size_cm=(0.02, 0.02), pixel_spacing=True)
    unknown = media.write_dicom(tmp_path / "unknown.dcm", frames[:1], pixel_size_cm=None)
    assert dicom.inspect_dicom(regions).frames == 1
    assert dicom.inspect_dicom(regions).pixel_size_mm == pytest.approx((0.1, 0.12))  # cm -> mm, (row, column)
    assert dicom.inspect_dicom(spacing).pixel_size_mm == pytest.approx((0.2, 0.2))
    assert dicom.inspect_dicom(unknown).pixel_size_mm is None
    assert np.array_equal(dicom.read_dicom_frame(regions).pixels, frames[0])


def test_a_file_without_suffix_is_known_by_its_marker(tmp_path, frames):
    path = media.write_dicom(tmp_path / "IM0001", frames[:1])
    assert dicom.is_dicom_file(path) and dicom.is_dicom_file(tmp_path / "x.DCM")
    (tmp_path / "README").write_text("not a DICOM file")
    assert not dicom.is_dicom_file(tmp_path / "README") and not dicom.is_dicom_file(tmp_path / "x.png")


def test_a_structured_report_has_no_pixels(tmp_path):
    path = media.write_structured_report(tmp_path / "report.dcm")
    with pytest.raises(UnreadableImage, match="Basic Text SR Storage without pixel data, not an image"):
        dicom.inspect_dicom(path)


def test_a_dicomdir_is_named(tmp_path):
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = dicom.DICOMDIR, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    index = Dataset()
    index.file_meta = meta
    index.FileSetID, index.DirectoryRecordSequence = "DISC", pydicom.Sequence()
    index.save_as(tmp_path / "DICOMDIR", enforce_file_format=True)
    assert dicom.is_dicom_file(tmp_path / "DICOMDIR")
    with pytest.raises(UnreadableImage, match="a DICOMDIR"):
        dicom.inspect_dicom(tmp_path / "DICOMDIR")


def test_a_truncated_file_is_refused_with_its_reason(tmp_path, frames):
    whole = media.write_dicom(tmp_path / "whole.dcm", frames).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UnreadableImage, match="a truncated DICOM file"):
        dicom.read_dicom_frame(tmp_path / "cut.dcm", 3)
    (tmp_path / "header.dcm").write_bytes(whole[:300])  # cut inside the header
    with pytest.raises(UnreadableImage, match="header.dcm: "):
        dicom.inspect_dicom(tmp_path / "header.dcm")


def test_a_truncated_jpeg_file_is_refused_with_its_reason(tmp_path, frames):
    whole = media.write_dicom(tmp_path / "whole.dcm", frames, jpeg=True).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(whole[: len(whole) * 2 // 3])
    reason = r"truncated or damaged DICOM file \(Ultrasound Multi-frame Image Storage\): its pixel data is missing"
    with pytest.raises(UnreadableImage, match=reason):
        dicom.read_dicom_frame(tmp_path / "cut.dcm", 3)


def test_a_damaged_jpeg_frame_is_named(tmp_path, frames):
    path = media.write_dicom(tmp_path / "cine.dcm", frames, jpeg=True)
    data = bytearray(path.read_bytes())
    start = data.rfind(b"\xff\xd8")  # the last frame's JPEG: its entropy-coded data overwritten
    data[start + 2 : start + 600] = bytes(598)
    path.write_bytes(bytes(data))
    assert dicom.read_dicom_frame(path, 1).pixels.shape == (420, 580)
    with pytest.raises(UnreadableImage, match="frame 3 cannot be decoded"):
        dicom.read_dicom_frame(path, 3)


def test_an_unsupported_compression_is_named(tmp_path, frames):
    from pydicom.encaps import encapsulate

    dataset = media.dicom_dataset(frames[:1])
    dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    dataset.PixelData = encapsulate([b"\0\0\1\xb3" + bytes(100)])
    dataset.save_as(tmp_path / "mpeg.dcm", enforce_file_format=True)
    with pytest.raises(UnreadableImage, match="MPEG2 .* is not one this pipeline decodes"):
        dicom.inspect_dicom(tmp_path / "mpeg.dcm")


def test_other_refusals(tmp_path, frames):
    path = media.write_dicom(tmp_path / "cine.dcm", frames)
    with pytest.raises(UnreadableImage, match="has 3 frames, not a frame 4"):
        dicom.read_dicom_frame(path, 4)
    with pytest.raises(UnreadableImage, match="million allowed"):
        dicom.inspect_dicom(path, max_pixels=1000)
    (tmp_path / "text.dcm").write_text("hello")
    with pytest.raises(UnreadableImage, match="not a DICOM file"):
        dicom.inspect_dicom(tmp_path / "text.dcm")


def test_a_mask_given_as_dicom_keeps_its_values(tmp_path):
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 5:25] = 255
    path = media.write_dicom(tmp_path / "mask.dcm", [mask, mask // 255])
    assert np.array_equal(dicom.read_dicom_labels(path, 1), mask.astype(np.int64))
    assert np.array_equal(dicom.read_dicom_labels(path, 2), (mask // 255).astype(np.int64))


def test_without_pydicom_the_message_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(UserError, match=r'pip install "nerveseg\[dicom\]"'):
        dicom.require_pydicom()
