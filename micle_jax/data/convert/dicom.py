"""DICOM images for the converter: header checks and display pixels (pydicom).

A grayscale image goes through the DICOM grayscale pipeline (PS3.4 N.2.1.1):
stored values -> Modality LUT or RescaleSlope/Intercept -> VOI LUT or
WindowCenter/Width (the first by default; any, or none, by --dicom_voi) ->
inverted if MONOCHROME1, and the result, in [0, 1], becomes 8-bit or 16-bit
pixels. Without a VOI the modality values are scaled as 16-bit PNGs are
(--sixteen_bit): each image's own range ('min_max') or the range its bits and
rescale can hold ('full_range'). 8-bit RGB and YBR images (YBR converted to RGB
by pydicom) are kept as RGB.

Compressed transfer syntaxes are decoded by pydicom's plugins: pylibjpeg with
pylibjpeg-libjpeg (JPEG baseline, extended, lossless, JPEG-LS) and
pylibjpeg-openjpeg (JPEG 2000); RLE by pydicom itself.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom import pixels
from pydicom.errors import InvalidDicomError

GRAY = ("MONOCHROME1", "MONOCHROME2")
COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
# The tags read to compute pixels (for the de-identification report).
PIXEL_TAGS = (
    "PhotometricInterpretation SamplesPerPixel Rows Columns BitsAllocated BitsStored "
    "PixelRepresentation NumberOfFrames ModalityLUTSequence RescaleSlope RescaleIntercept "
    "VOILUTSequence WindowCenter WindowWidth VOILUTFunction PixelData"
).split()
DEFER_BYTES = 1024  # header reads leave larger values (pixel data, LUTs) on disk


class DicomProblem(ValueError):
    """A DICOM file the converter cannot use; the message says why."""


def read_header(path: str) -> pydicom.Dataset:
    """The file's data set without loading its pixel data.

    Raises:
      DicomProblem: not a DICOM file, or its header cannot be parsed.
    """
    try:
        return pydicom.dcmread(path, defer_size=DEFER_BYTES)
    except InvalidDicomError:
        raise DicomProblem(
            "not a DICOM file (no 'DICM' at byte 128); leave it out of the input"
        ) from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad file to report
        raise DicomProblem(f"cannot read the DICOM header ({type(e).__name__}: {e})") from e


def header_problem(ds: pydicom.Dataset) -> str | None:
    """Why the converter cannot use this data set's image, or None.

    Checks what the header tells: pixel data present, one frame, a supported
    photometric interpretation, and a transfer syntax a plugin decodes.
    """
    if "PixelData" not in ds:
        kind = "float pixel data" if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds else ""
        sop = getattr(ds.get("SOPClassUID"), "name", "") or "not an image"
        return f"no pixel data ({kind or sop}); only images can be converted"
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        return (
            f"multi-frame image ({frames} frames); the converter reads single-frame images: "
            "export one frame per file"
        )
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in GRAY + COLOR:
        return (
            f"photometric interpretation {photometric!r} is not supported; the converter "
            f"reads {', '.join(GRAY)}, and 8-bit {', '.join(COLOR)}"
        )
    if photometric in COLOR and ds.get("BitsStored") != 8:
        return f"{ds.get('BitsStored')}-bit {photometric} is not supported; colour must be 8-bit"
    syntax = getattr(ds.get("file_meta"), "TransferSyntaxUID", None)
    if syntax is not None and not syntax.is_transfer_syntax:
        return f"transfer syntax {syntax} is unknown to pydicom, which cannot decode it"
    if syntax is None or not syntax.is_compressed:
        return None
    try:
        decoder = pixels.get_decoder(syntax)
    except NotImplementedError:
        return f"compressed as {syntax.name or syntax}, which pydicom cannot decode"
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        return (
            f"compressed as {syntax.name}, but no decoder is installed ({needs}); install "
            "the DICOM decoders with pip install -e '.[dicom]'"
        )
    return None


def parse_voi(text: str) -> int | None:
    """--dicom_voi: 'none' -> None, '0', '1', ... -> that index.

    Raises:
      ValueError: any other text.
    """
    if text == "none":
        return None
    if text.isdigit():
        return int(text)
    raise ValueError(f"--dicom_voi={text!r}: give an index (0 = first window/LUT) or 'none'")


def _lut(values: np.ndarray, item: pydicom.Dataset, little_endian: bool) -> tuple[np.ndarray, int]:
    """(LUT output, its bits) of a Modality or VOI LUT item (PS3.3 C.11.1, C.11.2).

    Written out rather than pydicom's apply_voi, which (3.0.2) wraps the indices
    of an 8-bit LUT with more than 256 entries (e.g. 4096 for 12-bit CR).
    """
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    data = item.LUTData
    if isinstance(data, bytes):  # VR OW
        packed = np.uint8 if len(data) == entries else ("<u2" if little_endian else ">u2")
        table = np.frombuffer(data, packed)[:entries].astype(np.int64)
    else:
        table = np.asarray(data if isinstance(data, list | tuple) else [data], np.int64)
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, len(table) - 1)
    return table[index], bits


def _modality(arr: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, tuple[float, float]]:
    """(modality values float64, the (low, high) they can take) (PS3.3 C.11.1)."""
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)):
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        low, high = 0, 2**bits - 1
    values = arr.astype(np.float64)
    if ds.get("ModalityLUTSequence"):
        table, lut_bits = _lut(values, ds.ModalityLUTSequence[0], _little_endian(ds))
        return table.astype(np.float64), (0.0, 2.0**lut_bits - 1)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return values * slope + intercept, (ends[0], ends[1])


def _little_endian(ds: pydicom.Dataset) -> bool:
    syntax = getattr(ds.get("file_meta"), "TransferSyntaxUID", None)
    return syntax.is_little_endian if syntax is not None else ds.original_encoding[1]


def window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """The VOI window of PS3.3 C.11.2.1.2 (and .3 for SIGMOID), output in [0, 1].

    Args:
      values: modality values, any shape.
      function: VOILUTFunction, 'LINEAR' (also when blank), 'LINEAR_EXACT' or 'SIGMOID'.

    Raises:
      DicomProblem: an unknown function or a width it does not allow.
    """
    function = function or "LINEAR"
    if function == "LINEAR":
        if width < 1:
            raise DicomProblem(f"WindowWidth {width} < 1, which a LINEAR window does not allow")
        if width == 1:  # a threshold (C.11.2.1.2.1)
            return (values > center - 0.5).astype(np.float64)
        return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    if width <= 0:
        raise DicomProblem(f"WindowWidth {width} <= 0, which a {function} window does not allow")
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    raise DicomProblem(f"VOILUTFunction {function!r} is not LINEAR, LINEAR_EXACT or SIGMOID")


def _voi(values, ds, voi: int | None, scaling: str, value_range) -> np.ndarray:
    """Modality values -> [0, 1] by the VOI LUT or window `voi`, else by `scaling`."""
    luts, centers = ds.get("VOILUTSequence") or [], ds.get("WindowCenter")
    if voi is not None and luts:
        if voi >= len(luts):
            raise DicomProblem(f"--dicom_voi={voi}, but the file has {len(luts)} VOI LUT(s)")
        table, bits = _lut(values, luts[voi], _little_endian(ds))
        return table / (2.0**bits - 1)
    if voi is not None and centers is not None and ds.get("WindowWidth") is not None:
        centers, widths = np.atleast_1d(centers), np.atleast_1d(ds.WindowWidth)
        if voi >= min(len(centers), len(widths)):
            raise DicomProblem(f"--dicom_voi={voi}, but the file has {len(centers)} window(s)")
        function = str(ds.get("VOILUTFunction", "")).strip().upper()
        return window(values, float(centers[voi]), float(widths[voi]), function)
    low, high = (values.min(), values.max()) if scaling == "min_max" else value_range
    return np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)


def display_pixels(path: str, voi: int | None, scaling: str, bit_depth: int) -> np.ndarray:
    """The image of a DICOM file as displayed: uint8/uint16 [h, w], or uint8 [h, w, 3].

    Args:
      path: a single-frame DICOM file.
      voi: index of the VOI LUT (if the file has a VOILUTSequence) or window to
        apply; None applies none.
      scaling: 'min_max' or 'full_range', for images without the VOI (see module doc).
      bit_depth: 8 or 16, the depth of grayscale output (colour stays 8-bit).

    Raises:
      DicomProblem: the file cannot be used or its pixel data cannot be decoded.
    """
    ds = read_header(path)
    problem = header_problem(ds)
    if problem:
        raise DicomProblem(problem)
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - every decoder failure is a bad file to report
        message = " ".join(str(e).split())
        raise DicomProblem(f"cannot decode the pixel data ({type(e).__name__}: {message})") from e
    if ds.PhotometricInterpretation in COLOR:
        return arr.astype(np.uint8)  # pydicom has converted YBR to RGB
    values, value_range = _modality(arr, ds)
    shown = _voi(values, ds, voi, scaling, value_range)
    if ds.PhotometricInterpretation == "MONOCHROME1":  # low values are white
        shown = 1.0 - shown
    top = 2**bit_depth - 1
    return np.round(shown * top).astype(np.uint16 if bit_depth == 16 else np.uint8)
