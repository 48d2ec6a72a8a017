"""Tests of DICOM input to the converter (convert/dicom.py, dicom_cases.py, deidentify.py).

Real pixels: DICOM files made here from the Hannover chest X-ray PNGs
(../shared/data) the way modalities store them (12- and 16-bit, MONOCHROME1
and 2, windows, VOI and modality LUTs, signed with a rescale, compressed) are
converted, decoded back from the records and compared pixel for pixel with the
PNG. pydicom's own test files are used only where they ship inside its wheel
(get_testdata_file(download=False); nothing is downloaded).
"""

import csv
import hashlib
import hmac
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import tensorflow as tf
from PIL import Image
from pydicom import pixels as pydicom_pixels
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, RLELossless, generate_uid

from micle_jax.data import records, shards
from micle_jax.data.augment import policies
from micle_jax.data.convert import deidentify, dicom
from micle_jax.data.convert.dicom_cases import (
    DicomSource,
    cases_from_dicom_csv,
    cases_from_dicom_dir,
)
from micle_jax.data.convert.images import ImageOptions
from micle_jax.data.convert.inputs import ConversionError
from micle_jax.data.convert.write import convert
from micle_jax.data.sources import image_table

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = b"5f0c3a9e1d7b4e2f8a6c0b1d3e5f7a9c"  # 32 characters, as a key file holds
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
JPEG_XL = "1.2.840.10008.1.2.4.110"  # JPEG XL Lossless (2024), unknown to pydicom 3.0
MPEG2 = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile / Main Level


def _bundled(name):
    """A pydicom test file that ships in the wheel; fails rather than downloading."""
    path = get_testdata_file(name, download=False)
    assert path and os.path.isfile(path), f"{name} is not bundled with pydicom"
    return path


def _hannover(root, count=3):
    """[{patient, image, sex, projection, pixels uint8 [h, w]}]: a patient's 2 images, 1 more."""
    with open(root / "data.csv") as f:
        rows = list(csv.DictReader(f))
    by_patient = {}
    for row in rows:
        by_patient.setdefault(row["patient_id"], []).append(row)
    pairs = sorted(p for p, r in by_patient.items() if len(r) >= 2)
    chosen = by_patient[pairs[0]][:2] + [by_patient[p][0] for p in pairs[1 : count - 1]]
    return [
        dict(
            patient=r["patient_id"],
            image=r["image_id"],
            sex=r["sex"].upper(),
            projection=r["projection"].upper(),
            pixels=np.asarray(Image.open(root / "png" / f"{r['image_id']}.png")),
        )
        for r in chosen[:count]
    ]


@pytest.fixture(scope="module")
def hannover(shared_data):
    return _hannover(shared_data / "hannover-covid-cxr")


def _tags(source):
    """The identifying and meta tags of one Hannover image (names made up from its ids)."""
    return dict(
        PatientID=source["patient"],
        PatientName=f"Doe^{source['patient']}",
        PatientBirthDate="19500101",
        StudyInstanceUID=generate_uid(entropy_srcs=[source["patient"], "study"]),
        SOPInstanceUID=generate_uid(entropy_srcs=[source["image"]]),
        PatientSex=source["sex"],
        PatientAge="067Y",
        ViewPosition=source["projection"],
        Manufacturer="Hannover Medical School",
        InstitutionName="MHH",
        BurnedInAnnotation="NO",
    )


def _write_dicom(path, stored, photometric="MONOCHROME2", bits_stored=12, syntax=None, **tags):
    """Writes one DICOM file of `stored` [h, w] (or [frames, h, w]) pixels and `tags`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = DX_STORAGE
    ds.Modality = "DX"
    ds.set_pixel_data(stored, photometric, bits_stored)
    for keyword, value in tags.items():
        if value is None:
            ds.pop(keyword, None)
        elif keyword in ("VOILUTSequence", "ModalityLUTSequence"):
            setattr(ds, keyword, [value])
        else:
            setattr(ds, keyword, value)
    if syntax == JPEGLosslessSV1:  # pydicom has no encoder for it
        ds.PixelData = encapsulate([_encode_jpeg_lossless(stored, bits_stored)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    elif syntax is not None:
        ds.compress(syntax, generate_instance_uid=False)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _encode_jpeg_lossless(image, precision):
    """ITU-T T.81 lossless JPEG (process 14, first-order prediction), one gray frame.

    A fixed canonical Huffman table of the 17 difference categories (lengths
    with Kraft sum < 1, so no all-ones code); differences modulo 2**16 (H.1.2.1).
    """
    rows, cols = image.shape
    x = image.astype(np.int64)
    prediction = np.empty_like(x)
    prediction[0, 0] = 1 << (precision - 1)
    prediction[0, 1:], prediction[1:, 0], prediction[1:, 1:] = x[0, :-1], x[:-1, 0], x[1:, :-1]
    diff = (x - prediction).ravel()
    diff = (diff + 32768) % 65536 - 32768
    category = np.where(diff == 0, 0, np.floor(np.log2(np.maximum(np.abs(diff), 1))) + 1)
    category = np.where(diff == -32768, 16, category).astype(np.int64)
    extra_bits = np.where(category == 16, 0, category)
    extra = np.where(diff < 0, diff + (1 << extra_bits) - 1, diff) * (category < 16)
    lengths = np.array([2, 3, 3, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])
    codes, code = np.zeros(17, np.int64), 0
    for symbol in range(17):  # lengths ascend with the symbol: canonical order
        code <<= lengths[symbol] - lengths[symbol - 1] if symbol else 0
        codes[symbol], code = code, code + 1
    value = (codes[category] << extra_bits) | extra
    length = lengths[category] + extra_bits
    ends = np.cumsum(length)
    owner = np.repeat(np.arange(len(length)), length)
    bits = (value[owner] >> (ends[owner] - 1 - np.arange(ends[-1]))) & 1
    bits = np.concatenate([bits, np.ones(-ends[-1] % 8, np.int64)]).astype(np.uint8)
    data = np.packbits(bits)
    data = np.insert(data, np.flatnonzero(data == 0xFF) + 1, 0).tobytes()  # byte stuffing

    def segment(marker, payload):
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    frame = bytes([precision, *rows.to_bytes(2, "big"), *cols.to_bytes(2, "big"), 1, 1, 0x11, 0])
    table = bytes([0, *[int((lengths == n).sum()) for n in range(1, 17)], *range(17)])
    scan = bytes([1, 1, 0, 1, 0, 0])  # one component, predictor 1, no point transform
    return (
        b"\xff\xd8" + segment(0xC3, frame) + segment(0xC4, table) + segment(0xDA, scan)
        + data + b"\xff\xd9"
    )  # fmt: skip


def _lut_item(entries_bits, table, vr="US"):
    item = Dataset()
    item.LUTDescriptor = [len(table) % 65536, 0, entries_bits]
    if vr == "OW":
        item.add_new("LUTData", "OW", np.asarray(table, "<u2").tobytes())
    else:
        item.add_new("LUTData", "US", [int(v) for v in table])
    return item


# Each variant stores the 8-bit PNG p as a modality would, such that the DICOM
# display pipeline gives p back exactly: (stored pixels, photometric, bits
# stored, extra tags, image options).
def _variant(name, p, rng):
    p16 = p.astype(np.int64)
    noise = rng.integers(0, 16, p.shape)  # low bits a 12-bit detector has and p lacks
    exact = dict(WindowCenter=2047.5, WindowWidth=4080, VOILUTFunction="LINEAR_EXACT")
    if name == "12-bit MONOCHROME2, LINEAR_EXACT window":
        return 16 * p16 + noise, "MONOCHROME2", 12, exact, {}
    if name == "12-bit MONOCHROME2, narrow LINEAR window":
        # LINEAR (C.11.2.1.2.1) maps c - 0.5 +- (w - 1) / 2; LINEAR_EXACT would be off by 1.
        return p16 + 1000, "MONOCHROME2", 12, dict(WindowCenter=1128, WindowWidth=256), {}
    if name == "12-bit MONOCHROME1, window":
        return 16 * (255 - p16) + 15 - noise, "MONOCHROME1", 12, exact, {}
    if name == "12-bit, first of two windows (the default)":
        windows = dict(WindowCenter=[2047.5, 300], WindowWidth=[4080, 50])
        return 16 * p16 + noise, "MONOCHROME2", 12, dict(exact, **windows), {}
    if name == "12-bit, second of two windows (--dicom_voi=1)":
        windows = dict(WindowCenter=[300, 2047.5], WindowWidth=[50, 4080])
        return 16 * p16 + noise, "MONOCHROME2", 12, dict(exact, **windows), dict(dicom_voi="1")
    if name == "12-bit, 8-bit VOI LUT of 4096 entries (before the window)":
        lut = _lut_item(8, np.arange(4096) // 16)
        tags = dict(VOILUTSequence=lut, WindowCenter=300, WindowWidth=50)
        return 16 * p16 + noise, "MONOCHROME2", 12, tags, {}
    if name == "12-bit, 16-bit VOI LUT as OW":
        q = np.arange(4096) // 16  # 257 q +- 100: not symmetric in its two bytes
        lut = _lut_item(16, 257 * q + np.where(q < 128, 100, -100), vr="OW")
        return 16 * p16 + noise, "MONOCHROME2", 12, dict(VOILUTSequence=lut), {}
    if name == "12-bit, modality LUT then window":
        lut = _lut_item(12, 4095 - np.arange(4096))
        return 4095 - 16 * p16 - noise, "MONOCHROME2", 12, dict(exact, ModalityLUTSequence=lut), {}
    if name == "16-bit signed, rescale slope 2 intercept 2048, window":
        tags = dict(exact, RescaleSlope=2, RescaleIntercept=2048, WindowCenter=2040)
        return (8 * p16 - 1024).astype(np.int16), "MONOCHROME2", 16, tags, {}
    if name == "16-bit, no window, full_range":
        return 257 * p16, "MONOCHROME2", 16, {}, dict(sixteen_bit="full_range")
    if name == "16-bit, window ignored (--dicom_voi=none), full_range":
        return 257 * p16, "MONOCHROME2", 16, exact, dict(sixteen_bit="full_range", dicom_voi="none")
    raise ValueError(name)


VARIANTS = [
    "12-bit MONOCHROME2, LINEAR_EXACT window",
    "12-bit MONOCHROME2, narrow LINEAR window",
    "12-bit MONOCHROME1, window",
    "12-bit, first of two windows (the default)",
    "12-bit, second of two windows (--dicom_voi=1)",
    "12-bit, 8-bit VOI LUT of 4096 entries (before the window)",
    "12-bit, 16-bit VOI LUT as OW",
    "12-bit, modality LUT then window",
    "16-bit signed, rescale slope 2 intercept 2048, window",
    "16-bit, no window, full_range",
    "16-bit, window ignored (--dicom_voi=none), full_range",
]


def _convert(folder, out, options=None, key=KEY, **source):
    plan = cases_from_dicom_dir(str(folder), DicomSource(key, **source))
    return convert(plan, str(out), options=options)


def _records(out, dtype=tf.uint8):
    """{image id: (pixels [h, w(, c)], meta, case id)} of a converted dataset."""
    info = records.load_info(str(out))
    found = {}
    for split in info.splits:
        for serialized in tf.data.TFRecordDataset(shards.shard_paths(str(out), split)):
            case = records.parse_case(serialized, info.num_classes, info.label_type)
            for i, image_id in enumerate(case["image_ids"].numpy()):
                pixels = tf.io.decode_png(case["images"][i], dtype=dtype).numpy()
                meta = json.loads(case["meta"][i].numpy())
                found[image_id.decode()] = (pixels, meta, case["case_id"].numpy().decode())
    return found


def _image_id(source, key=KEY):
    return deidentify.keyed_id(key, _tags(source)["SOPInstanceUID"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_dicom_made_from_hannover_converts_back_pixel_for_pixel(tmp_path, hannover, variant):
    rng = np.random.default_rng(0)
    for i, source in enumerate(hannover):
        stored, photometric, bits, tags, options = _variant(variant, source["pixels"], rng)
        dtype = np.int16 if stored.dtype == np.int16 else np.uint16
        _write_dicom(
            str(tmp_path / "in" / f"IM{i}"), stored.astype(dtype), photometric, bits,
            **_tags(source), **tags,
        )  # fmt: skip
    _convert(tmp_path / "in", tmp_path / "out", ImageOptions(**options))
    written = _records(tmp_path / "out")
    assert len(written) == len(hannover)
    for source in hannover:
        pixels, _, _ = written[_image_id(source)]
        np.testing.assert_array_equal(pixels[..., 0], source["pixels"], err_msg=variant)


@pytest.mark.parametrize(
    "syntax",
    [RLELossless, JPEG2000Lossless, JPEGLosslessSV1],
    ids=["RLE lossless", "JPEG 2000 lossless", "JPEG lossless SV1"],
)
def test_compressed_dicom_converts_back_pixel_for_pixel(tmp_path, hannover, syntax):
    rng = np.random.default_rng(1)
    for i, source in enumerate(hannover[:2]):
        stored, photometric, bits, tags, _ = _variant(VARIANTS[0], source["pixels"], rng)
        path = _write_dicom(
            str(tmp_path / "in" / f"IM{i}"), stored.astype(np.uint16), photometric, bits,
            syntax=syntax, **_tags(source), **tags,
        )  # fmt: skip
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == syntax
        np.testing.assert_array_equal(ds.pixel_array, stored)  # lossless
    _convert(tmp_path / "in", tmp_path / "out")
    written = _records(tmp_path / "out")
    for source in hannover[:2]:
        np.testing.assert_array_equal(written[_image_id(source)][0][..., 0], source["pixels"])


def test_sixteen_bit_output_keeps_the_depth_and_the_pipeline_reads_it(tmp_path, hannover):
    rng = np.random.default_rng(2)
    source = hannover[0]
    stored, _, _, tags, _ = _variant(VARIANTS[0], source["pixels"], rng)
    path = _write_dicom(
        str(tmp_path / "in" / "IM0"), stored.astype(np.uint16), **_tags(source), **tags
    )
    info = _convert(tmp_path / "in", tmp_path / "out", ImageOptions(bit_depth=16))
    assert info.converter["args"]["bit_depth"] == 16
    ((pixels, _, _),) = _records(tmp_path / "out", tf.uint16).values()
    # pydicom's LINEAR_EXACT window (output 0..4095 for 12-bit) over 0..65535: the
    # detector's low bits survive, which 8 bits would round away.
    ds = pydicom.dcmread(path)
    shown = pydicom_pixels.apply_voi_lut(ds.pixel_array, ds) / 4095
    expected = np.round(shown * 65535).astype(np.uint16)
    np.testing.assert_array_equal(pixels[..., 0], expected)
    assert len(np.unique(pixels % 257)) > 8  # not just 257 * an 8-bit image
    # What training reads: the pipeline decodes to uint8, the 8 high bits
    # (TensorFlow's conversion); eval_transform takes the uint16 too.
    dataset = tf.data.TFRecordDataset(shards.shard_paths(str(tmp_path / "out"), "train"))
    encoded = records.parse_case(next(iter(dataset)), 0, "none")["images"][0]
    np.testing.assert_array_equal(image_table.decode_image(encoded)[..., 0], expected >> 8)
    deep = tf.io.decode_png(encoded, dtype=tf.uint16)
    unit = tf.constant(expected[..., None] / 65535, tf.float32)
    np.testing.assert_allclose(
        policies.eval_transform(deep, 64).numpy(),
        policies.eval_transform(unit, 64).numpy(),
        atol=1e-6,
    )


def test_window_matches_pydicom():
    values = np.arange(-3000, 5000, 7).astype(np.float64)
    ds = Dataset()
    ds.BitsStored, ds.PixelRepresentation, ds.PhotometricInterpretation = 16, 1, "MONOCHROME2"
    low, high = -(2**15), 2**15 - 1  # pydicom's output range for signed 16-bit
    for function, center, width in [
        ("LINEAR", 40, 400), ("LINEAR", 1000.5, 1), ("LINEAR", -100, 2),
        ("LINEAR_EXACT", 40, 400), ("LINEAR_EXACT", 2047.5, 4080), ("SIGMOID", 300, 1500),
    ]:  # fmt: skip
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
        reference = (pydicom_pixels.apply_windowing(values, ds) - low) / (high - low)
        ours = dicom.window(values, center, width, function)
        np.testing.assert_allclose(ours, reference, atol=1e-9, err_msg=function)
    with pytest.raises(dicom.DicomProblem, match="WindowWidth 0.5 < 1"):
        dicom.window(values, 0, 0.5, "LINEAR")


@pytest.mark.parametrize("scaling", ["min_max", "full_range"])
def test_bundled_ct_without_window_is_scaled_like_16_bit_png(tmp_path, scaling):
    (tmp_path / "in").mkdir()
    shutil.copy(_bundled("CT_small.dcm"), tmp_path / "in")  # signed, rescale, no window
    _convert(tmp_path / "in", tmp_path / "out", ImageOptions(sixteen_bit=scaling))
    ((pixels, _, _),) = _records(tmp_path / "out").values()
    ds = pydicom.dcmread(_bundled("CT_small.dcm"))
    hu = pydicom_pixels.apply_modality_lut(ds.pixel_array, ds)  # pydicom's rescale
    low, high = (hu.min(), hu.max()) if scaling == "min_max" else (-32768 - 1024, 32767 - 1024)
    expected = np.round((hu - low) / (high - low) * 255)
    np.testing.assert_array_equal(pixels[..., 0], expected.astype(np.uint8))


def test_bundled_compressed_files_convert_like_their_uncompressed_twin(tmp_path):
    # pydicom ships MR_small.dcm in four transfer syntaxes; the window is 600 / 1600.
    names = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"]
    names.append("MR_small_jpeg_ls_lossless.dcm")
    outputs = []
    for i, name in enumerate(names):
        folder = tmp_path / f"in{i}"
        folder.mkdir()
        shutil.copy(_bundled(name), folder / name)
        _convert(folder, tmp_path / f"out{i}")
        ((pixels, _, _),) = _records(tmp_path / f"out{i}").values()
        outputs.append(pixels[..., 0])
    ds = pydicom.dcmread(_bundled("MR_small.dcm"))
    shown = pydicom_pixels.apply_voi_lut(ds.pixel_array, ds)  # pydicom's LINEAR window
    expected = np.round((shown + 2**15) / (2**16 - 1) * 255).astype(np.uint8)
    for name, pixels in zip(names, outputs, strict=True):
        np.testing.assert_array_equal(pixels, expected, err_msg=name)


def test_bundled_color_images_are_kept_rgb(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ["SC_rgb_rle.dcm", "SC_ybr_full_422_uncompressed.dcm"]:
        shutil.copy(_bundled(name), tmp_path / "in")
    _convert(tmp_path / "in", tmp_path / "out")
    written = _records(tmp_path / "out")
    for name in ["SC_rgb_rle.dcm", "SC_ybr_full_422_uncompressed.dcm"]:
        ds = pydicom.dcmread(_bundled(name))
        pixels, _, _ = written[deidentify.keyed_id(KEY, ds.SOPInstanceUID)]
        np.testing.assert_array_equal(pixels, ds.pixel_array)  # YBR converted to RGB


def _bad_folder(tmp_path, hannover):
    """Two good Hannover DICOMs and one bad file of each kind: {file name: message}."""
    folder = tmp_path / "in"
    good = [dict(_tags(s), PatientID=f"P{i}") for i, s in enumerate(hannover[:2])]
    small = [s["pixels"][:64, :64] for s in hannover[:2]]
    for i in range(2):
        _write_dicom(str(folder / f"good{i}"), small[i], bits_stored=8, **good[i])
    shutil.copy(folder / "good0", folder / "good0_copy")
    shutil.copy(_bundled("rtplan.dcm"), folder / "rtplan.dcm")
    shutil.copy(_bundled("examples_palette.dcm"), folder / "palette.dcm")
    shutil.copy(_bundled("JPEG-lossy.dcm"), folder / "jpeg_lossy.dcm")
    shutil.copy(_bundled("MR_truncated.dcm"), folder / "truncated.dcm")
    Image.fromarray(small[0]).save(folder / "image.png")
    fresh = {k: v for k, v in good[0].items() if k != "SOPInstanceUID"}  # a new uid each
    _write_dicom(str(folder / "frames"), np.stack(small), bits_stored=8, **fresh)
    _write_dicom(str(folder / "no_patient"), small[0], bits_stored=8, **dict(fresh, PatientID=None))
    path = _write_dicom(
        str(folder / "cut_j2k"), small[0], bits_stored=8, syntax=JPEG2000Lossless, **fresh
    )
    ds = pydicom.dcmread(path)
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    ds.save_as(path)
    path = _write_dicom(str(folder / "mpeg2"), small[0], bits_stored=8, syntax=RLELossless, **fresh)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG2  # a video syntax: no image decoder
    ds.save_as(path)
    return {
        "image.png": "not a DICOM file (no 'DICM' at byte 128)",
        "rtplan.dcm": "no pixel data (RT Plan Storage); only images can be converted",
        "palette.dcm": "photometric interpretation 'PALETTE COLOR' is not supported",
        "frames": "multi-frame image (2 frames); the converter reads single-frame images",
        "no_patient": "no PatientID (the --case_tag) in this file",
        "good0_copy": "a second copy of an image (the same SOPInstanceUID)",
        "mpeg2": "compressed as MPEG2 Main Profile / Main Level, which pydicom cannot decode",
        "jpeg_lossy.dcm": "cannot decode the pixel data (RuntimeError: Unable to decode",
        "cut_j2k": "cannot decode the pixel data (RuntimeError",
        "truncated.dcm": "cannot decode the pixel data (ValueError: The number of bytes of pixel "
        "data is less than expected",
    }


def test_bad_dicom_is_reported_by_file_before_anything_is_written(tmp_path, hannover):
    expected = _bad_folder(tmp_path, hannover)
    with pytest.raises(ConversionError) as error:
        _convert(tmp_path / "in", tmp_path / "out")
    message = str(error.value)
    # + 'case has no usable images' for the two bundled files' patients
    assert f"{len(expected) + 2} problem(s) in the input; nothing was written" in message
    for name, problem in expected.items():
        line = next((x for x in message.splitlines() if f"'{tmp_path / 'in' / name}'" in x), "")
        assert problem in line, (name, message)
    assert not (tmp_path / "out").exists()
    assert not [n for n in os.listdir(tmp_path) if ".incomplete" in n]


def test_header_problem_names_a_transfer_syntax_pydicom_does_not_know():
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEG_XL  # pydicom cannot even write such a file
    ds.PhotometricInterpretation, ds.PixelData = "MONOCHROME2", b"\0\0"
    assert dicom.header_problem(ds) == (
        f"transfer syntax {JPEG_XL} is unknown to pydicom, which cannot decode it"
    )


def test_bad_dicom_is_skipped_and_listed_without_file_paths(tmp_path, hannover):
    expected = _bad_folder(tmp_path, hannover)
    plan = cases_from_dicom_dir(str(tmp_path / "in"), DicomSource(KEY))
    info = convert(plan, str(tmp_path / "out"), on_error="skip")
    written = _records(tmp_path / "out")
    assert {case for _, _, case in written.values()} == {
        deidentify.keyed_id(KEY, p) for p in ("P0", "P1")
    }
    assert len(info.skipped) == len(expected) + 2  # + two cases left without images
    assert all(s["file"] == "" for s in info.skipped)  # paths may name patients
    problems = sorted(s["problem"] for s in info.skipped)
    for problem in expected.values():
        assert any(p.startswith(problem) for p in problems), (problem, problems)
    assert f"{tmp_path / 'in'}/" not in (tmp_path / "out" / records.INFO_FILE).read_text()


def test_ids_are_keyed_hashes_and_no_identifier_is_written(tmp_path, hannover):
    for i, source in enumerate(hannover):
        _write_dicom(
            str(tmp_path / "in" / f"IM{i}"),
            source["pixels"][:32, :32],
            bits_stored=8,
            **_tags(source),
        )
    # The five metadata tags; InstitutionName (the site) is kept in clear.
    meta_tags = ["PatientSex", "PatientAge", "ViewPosition", "Manufacturer", "InstitutionName"]
    _convert(tmp_path / "in", tmp_path / "out", meta_tags=meta_tags)
    written = _records(tmp_path / "out")
    identifiers = set()
    for source in hannover:
        tags = _tags(source)
        _, meta, case = written[_image_id(source)]
        assert case == deidentify.keyed_id(KEY, source["patient"])
        # HMAC-SHA256 with the key (RFC 2104), as deidentify.py documents: ids stay the
        # same across versions, so an --exclude_cases list keeps finding its patients.
        hmac_hex = hmac.new(KEY, source["patient"].encode(), hashlib.sha256).hexdigest()
        assert case == hmac_hex[:16]
        assert meta == {k: tags[k] for k in meta_tags}
        identifiers |= {tags[k] for k in ("PatientID", "PatientName", "StudyInstanceUID")}
        identifiers |= {tags["SOPInstanceUID"], tags["PatientBirthDate"]}
    assert len({case for _, _, case in written.values()}) == 2
    for name in os.listdir(tmp_path / "out"):
        data = (tmp_path / "out" / name).read_bytes()
        assert not [i for i in identifiers if i.encode() in data], name
    # The same key gives the same ids (and bytes); another key other ids.
    _convert(tmp_path / "in", tmp_path / "again", meta_tags=meta_tags)
    for name in os.listdir(tmp_path / "out"):
        if name != records.INFO_FILE:  # which names the dataset after its folder
            assert (tmp_path / "again" / name).read_bytes() == (
                tmp_path / "out" / name
            ).read_bytes()
    _convert(tmp_path / "in", tmp_path / "other", key=b"another secret key of 32 chars!!")
    assert not set(_records(tmp_path / "other")) & set(written)


def test_study_level_cases_by_study_instance_uid(tmp_path, hannover):
    studies = []
    for i, source in enumerate(hannover):  # the first patient's two images: two studies
        tags = dict(_tags(source), StudyInstanceUID=generate_uid(entropy_srcs=[str(i)]))
        studies.append(tags["StudyInstanceUID"])
        _write_dicom(
            str(tmp_path / "in" / f"IM{i}"), source["pixels"][:32, :32], bits_stored=8, **tags
        )
    by_patient = {c for _, _, c in _records_of(tmp_path, "patients").values()}
    by_study = _records_of(tmp_path, "studies", case_tag="StudyInstanceUID")
    assert len(by_patient) == 2 and len(by_study) == 3
    assert {c for _, _, c in by_study.values()} == {deidentify.keyed_id(KEY, s) for s in studies}


def _records_of(tmp_path, name, **source):
    _convert(tmp_path / "in", tmp_path / name, **source)
    return _records(tmp_path / name)


def test_meta_tags_refuse_identifiers_and_group_the_oldest_ages(tmp_path, hannover):
    for keyword in [
        "PatientName",
        "PatientBirthDate",
        "PatientID",
        "StudyInstanceUID",
        "StudyDate",
    ]:
        with pytest.raises(ConversionError, match=f"--meta_tags: {keyword} is .*image/meta"):
            cases_from_dicom_dir(str(tmp_path), DicomSource(KEY, meta_tags=[keyword]))
    with pytest.raises(ConversionError, match="'PatientSx' is not a DICOM keyword"):
        cases_from_dicom_dir(str(tmp_path), DicomSource(KEY, meta_tags=["PatientSx"]))
    ages = ["089Y", "095Y", "006M"]
    for i, (source, age) in enumerate(zip(hannover, ages, strict=True)):
        tags = dict(_tags(source), PatientAge=age)
        _write_dicom(
            str(tmp_path / "in" / f"IM{i}"), source["pixels"][:32, :32], bits_stored=8, **tags
        )
    plan = cases_from_dicom_dir(str(tmp_path / "in"), DicomSource(KEY, meta_tags=["PatientAge"]))
    assert plan.deidentify.generalized_ages == 1
    convert(plan, str(tmp_path / "out"))
    written = _records(tmp_path / "out")
    stored = [written[_image_id(s)][1]["PatientAge"] for s in hannover]
    assert stored == ["089Y", "090Y+", "006M"]


def test_burned_in_annotation_is_reported_and_can_be_left_out(tmp_path, hannover, capsys):
    flags = ["YES", None, "NO"]  # None: the tag is absent
    for i, (source, flag) in enumerate(zip(hannover, flags, strict=True)):
        tags = dict(_tags(source), BurnedInAnnotation=flag)
        _write_dicom(
            str(tmp_path / "in" / f"IM{i}"), source["pixels"][:32, :32], bits_stored=8, **tags
        )
    _convert(tmp_path / "in", tmp_path / "out", meta_tags=["ViewPosition"])
    printed = capsys.readouterr().out
    assert "BurnedInAnnotation: YES in 1 image(s) (kept: check them), absent in 1" in printed
    assert f"    {tmp_path / 'in' / 'IM0'}\n" in printed
    report = json.loads((tmp_path / "out" / deidentify.REPORT_FILE).read_text())
    assert report["burned_in"] == [_image_id(hannover[0])]
    assert report["burned_in_unknown"] == 1 and report["num_files"] == 3
    assert report["hashed"] == ["PatientID", "SOPInstanceUID"]
    assert report["in_clear"] == ["ViewPosition"]
    assert set(report["tags_read"]) == {
        "PatientID", "SOPInstanceUID", "ViewPosition", *dicom.PIXEL_TAGS,
        "SOPClassUID", "TransferSyntaxUID", "BurnedInAnnotation",
    }  # fmt: skip
    assert str(tmp_path) not in json.dumps(report)
    assert _image_id(hannover[0]) in _records(tmp_path / "out")
    _convert(tmp_path / "in", tmp_path / "clean", skip_burned_in=True)
    assert set(_records(tmp_path / "clean")) == {_image_id(s) for s in hannover[1:]}


def test_key_file(tmp_path):
    path = str(tmp_path / "secrets" / "cxr.key")
    with pytest.raises(ConversionError, match="needs --key_file.*--create_key_file"):
        deidentify.load_key(None)
    with pytest.raises(ConversionError, match=r"(?s)does not exist.*--create_key_file.*token_hex"):
        deidentify.load_key(path)
    key = deidentify.load_key(path, create=True)
    assert re.fullmatch(rb"[0-9a-f]{64}", key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert deidentify.load_key(path, create=True) == key  # an existing key is kept
    with pytest.raises(ConversionError, match="inside --out"):
        deidentify.load_key(path, out=str(tmp_path / "secrets"))
    (tmp_path / "short.key").write_text("password\n")
    with pytest.raises(ConversionError, match="holds 8 characters; a key needs at least 32"):
        deidentify.load_key(str(tmp_path / "short.key"))


def test_csv_of_dicom_paths_with_labels(tmp_path, hannover):
    rows = []
    for i, source in enumerate(hannover):
        _write_dicom(
            str(tmp_path / "dcm" / f"IM{i}.dcm"),
            source["pixels"][:32, :32],
            bits_stored=8,
            **_tags(source),
        )
        rows.append(dict(file=f"dcm/IM{i}.dcm", finding=("normal", "covid")[i % 2], ward="icu"))
    rows.append(dict(file="dcm/missing.dcm", finding="normal", ward="icu"))
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    dicom_source = DicomSource(KEY, meta_tags=["ViewPosition"])
    plan = cases_from_dicom_csv(
        str(tmp_path / "labels.csv"), dicom_source, image_root=str(tmp_path), image_column="file",
        meta_columns=["ward"], label_column="finding",
    )  # fmt: skip
    assert [(p.line, p.problem) for p in plan.problems] == [(5, "image file not found")]
    full_range = ImageOptions(sixteen_bit="full_range")  # 8-bit, no window: kept as stored
    info = convert(plan, str(tmp_path / "out"), options=full_range, on_error="skip")
    assert info.class_names == ["covid", "normal"]
    assert info.converter["args"]["case_tag"] == "PatientID"
    written = _records(tmp_path / "out")
    for source in hannover:
        pixels, meta, case = written[_image_id(source)]
        assert case == deidentify.keyed_id(KEY, source["patient"])  # the tag's, hashed
        assert meta == {"ward": "icu", "ViewPosition": source["projection"]}
        np.testing.assert_array_equal(pixels[..., 0], source["pixels"][:32, :32])
    # A CSV case column is hashed too; its tag is then not read.
    plan = cases_from_dicom_csv(
        str(tmp_path / "labels.csv"), dicom_source, case_column="ward", image_root=str(tmp_path),
        image_column="file",
    )  # fmt: skip
    assert {c.case_id for c in plan.cases} == {deidentify.keyed_id(KEY, "icu")}
    assert plan.deidentify.hashed == ["SOPInstanceUID"]
    assert plan.deidentify.hashed_columns == ["ward"]


@pytest.mark.slow
def test_command_line_dicom_dir(tmp_path, hannover):
    for i, source in enumerate(hannover):
        _write_dicom(
            str(tmp_path / "in" / f"IM{i}"),
            source["pixels"][:64, :64],
            bits_stored=8,
            **_tags(source),
        )
    (tmp_path / "exclude.txt").write_text(hannover[-1]["patient"] + "\n")
    command = [sys.executable, "-m", "micle_jax.data.convert", f"--dicom_dir={tmp_path / 'in'}"]
    command += [f"--key_file={tmp_path / 'cxr.key'}", "--meta_tags=PatientSex,ViewPosition"]
    command += [f"--exclude_cases={tmp_path / 'exclude.txt'}", f"--out={tmp_path / 'out'}"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "--create_key_file" in done.stderr, done.stderr
    done = subprocess.run(
        command + ["--create_key_file", "--bit_depth=16", "--sixteen_bit=full_range"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "hashed with the key: PatientID, SOPInstanceUID" in done.stdout, done.stdout
    assert "stored in clear (image/meta): PatientSex, ViewPosition" in done.stdout
    assert "excluded 1 cases (1 listed); 1 cases to check" in done.stdout
    assert re.search(r"train +1 +2 +2:1", done.stdout), done.stdout
    key = (tmp_path / "cxr.key").read_bytes().strip()
    written = _records(tmp_path / "out", tf.uint16)
    assert set(written) == {_image_id(s, key) for s in hannover[:2]}
    for source in hannover[:2]:
        expected = source["pixels"][:64, :64].astype(np.uint16) * 257
        np.testing.assert_array_equal(written[_image_id(source, key)][0][..., 0], expected)


def _files(root):
    """{relative path: bytes} of every file under `root`."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


@pytest.mark.slow
def test_deidentify_reads_the_headers_and_writes_only_the_report(tmp_path, hannover, capsys):
    """--deidentify: the report a conversion would write, the burned-in files printed, no
    records (even with --out given); '-' writes the report to stdout."""
    flags = ["YES", None, "NO"]  # None: the tag is absent
    for i, (source, flag) in enumerate(zip(hannover, flags, strict=True)):
        tags = dict(_tags(source), BurnedInAnnotation=flag)
        _write_dicom(
            str(tmp_path / "in" / f"IM{i}"), source["pixels"][:32, :32], bits_stored=8, **tags
        )
    (tmp_path / "cxr.key").write_bytes(KEY + b"\n")
    meta_tags = ["PatientSex", "InstitutionName"]
    before = _files(tmp_path)
    command = [sys.executable, "-m", "micle_jax.data.convert", f"--dicom_dir={tmp_path / 'in'}"]
    command += [f"--key_file={tmp_path / 'cxr.key'}", f"--meta_tags={','.join(meta_tags)}"]
    command += [f"--out={tmp_path / 'out'}", f"--deidentify={tmp_path / 'review.json'}"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "read 23 tags of 3 files" in done.stdout, done.stdout
    assert "hashed with the key: PatientID, SOPInstanceUID (ids: HMAC-SHA256(key, value)" in (
        done.stdout
    )
    assert "stored in clear (image/meta): PatientSex, InstitutionName" in done.stdout
    assert "BurnedInAnnotation: YES in 1 image(s) (kept: check them), absent in 1" in done.stdout
    assert f"    {tmp_path / 'in' / 'IM0'}\n" in done.stdout
    review = (tmp_path / "review.json").read_text()
    after = _files(tmp_path)
    assert after.pop("review.json") == review.encode()
    assert after == before  # no records, no --out folder, the inputs untouched
    # The report is the one the conversion of the same files with the same key writes.
    _convert(tmp_path / "in", tmp_path / "out", meta_tags=meta_tags)
    assert (tmp_path / "out" / deidentify.REPORT_FILE).read_text() == review
    report = json.loads(review)
    assert report["burned_in"] == [_image_id(hannover[0])] and report["burned_in_unknown"] == 1
    assert report["id_hash"] == "HMAC-SHA256(key, value), its first 16 hex digits"
    # '-': the report to stdout, the summary to stderr.
    capsys.readouterr()
    plan = cases_from_dicom_dir(str(tmp_path / "in"), DicomSource(KEY, meta_tags=meta_tags))
    deidentify.review(plan.deidentify, plan.problems, "-")
    printed = capsys.readouterr()
    assert printed.out == review
    assert "BurnedInAnnotation: YES in 1 image(s)" in printed.err


@pytest.mark.slow
def test_deidentify_of_input_that_is_not_dicom_is_an_error(tmp_path):
    (tmp_path / "labels.csv").write_text("patient,file\np1,a.png\n")
    command = [sys.executable, "-m", "micle_jax.data.convert", f"--csv={tmp_path / 'labels.csv'}"]
    command += ["--case_column=patient", "--image_column=file", "--deidentify=-"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 1
    assert "error: ['deidentify'] are for DICOM input (--dicom_dir, or --csv --dicom)" in (
        done.stderr
    ), done.stderr
    assert done.stdout == "" and sorted(os.listdir(tmp_path)) == ["labels.csv"]
