"""Decodes, checks and re-encodes the converter's images (PIL; DICOM by dicom.py).

8-bit grayscale or RGB PNG/JPEG files are copied byte for byte; everything else
(16-bit PNG, palette, alpha, CMYK, arrays, DICOM, an image to be resized, or an
RGB image to be stored as grayscale) is re-encoded as an 8-bit grayscale or RGB
PNG (or JPEG with `image_format='jpeg'`), the two layouts every decoder
downstream (tf.io.decode_image) reads alike. With `bit_depth=16`, 16-bit
grayscale inputs (PNG, arrays, DICOM) become 16-bit grayscale PNGs instead;
tf.io.decode_image(dtype=uint8) reads those as their 8 high bits, and
decode_png(dtype=uint16) in full.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re

import numpy as np
import tensorflow as tf
from PIL import Image

from micle_jax.data import records
from micle_jax.data.convert import dicom
from micle_jax.data.convert.inputs import ConversionError, ImageSpec, Problem

SIXTEEN_BIT = ("min_max", "full_range")
BIT_DEPTHS = (8, 16)


@dataclasses.dataclass
class ImageOptions:
    """How images are re-encoded.

    resize_longer_side: 0 keeps the size, else shrink to this longer side.
    sixteen_bit: 16-bit to 8-bit scaling, one of SIXTEEN_BIT.
    image_format: 'png' or 'jpeg', the format of re-encoded images (files kept
      byte for byte keep theirs).
    jpeg_quality: libjpeg quality 1..100 of re-encoded JPEGs.
    grayscale: store 8-bit single-channel images (ITU-R 601-2 luma of RGB
      inputs), e.g. for X-rays saved as RGB.
    bit_depth: 8, or 16 to store 16-bit grayscale inputs as 16-bit PNGs
      (`sixteen_bit` then scales to 0..65535).
    dicom_voi: the VOI LUT or window of DICOM images, an index ('0' = the first)
      or 'none' (dicom.parse_voi).
    """

    resize_longer_side: int = 0
    sixteen_bit: str = "min_max"
    image_format: str = "png"
    jpeg_quality: int = 90
    grayscale: bool = False
    bit_depth: int = 8
    dicom_voi: str = "0"

    def check(self) -> None:
        """Raises ConversionError if an option is out of range."""
        try:
            dicom.parse_voi(self.dicom_voi)
        except ValueError as e:
            raise ConversionError(str(e)) from None
        if self.bit_depth == 16 and self.image_format != "png":
            raise ConversionError("--bit_depth=16 needs --image_format=png (JPEG is 8-bit)")
        if (
            self.bit_depth not in BIT_DEPTHS
            or self.sixteen_bit not in SIXTEEN_BIT
            or self.resize_longer_side < 0
            or self.image_format not in records.IMAGE_FORMATS
            or not 1 <= self.jpeg_quality <= 100
        ):
            raise ConversionError(
                f"bad image options {self}: bit_depth in {BIT_DEPTHS}, sixteen_bit in "
                f"{SIXTEEN_BIT}, resize_longer_side >= 0, image_format in "
                f"{records.IMAGE_FORMATS}, jpeg_quality in 1..100"
            )

    def as_args(self) -> dict:
        """The options as recorded in dataset_info.json's converter args."""
        args = dataclasses.asdict(self)
        # Options added after converter 1.0.0 are listed only when they change the
        # output, so datasets converted before them keep identical info files.
        if self.image_format == "png":
            del args["image_format"], args["jpeg_quality"]
        if not self.grayscale:
            del args["grayscale"]
        if self.bit_depth == 8:
            del args["bit_depth"]
        if self.dicom_voi == "0":
            del args["dicom_voi"]
        return args


def _read_image(spec: ImageSpec, options: ImageOptions) -> tuple[bytes | None, Image.Image]:
    """(the file's bytes or None for an array or DICOM, the decoded image)."""
    if spec.dicom:
        voi = dicom.parse_voi(options.dicom_voi)
        pixels = dicom.display_pixels(spec.file, voi, options.sixteen_bit, options.bit_depth)
        return None, Image.fromarray(pixels)
    if spec.array is not None:
        array = spec.array
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.dtype not in (np.uint8, np.uint16) or not (
            array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)
        ):
            raise ValueError(
                f"array image of shape {array.shape} and dtype {array.dtype}: expected "
                "uint8 or uint16 [h, w], [h, w, 1] or [h, w, 3]"
            )
        return None, Image.fromarray(array)
    with open(spec.file, "rb") as f:
        data = f.read()
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every pixel: truncated or corrupt files fail here
    return data, image


def _to_8bit(image: Image.Image, sixteen_bit: str, grayscale: bool) -> Image.Image:
    """Grayscale 'L' or 'RGB', the two layouts every decoder downstream handles."""
    if image.mode.startswith("I") or image.mode == "F":
        # 16-bit PNG (CR/DX exports): 'min_max' stretches each image's own range to
        # 0..255 because 12-bit data in a 16-bit file would otherwise be nearly black;
        # 'full_range' maps 0..65535 linearly, keeping intensities comparable.
        pixels = np.asarray(image, np.float64)
        low, high = (pixels.min(), pixels.max()) if sixteen_bit == "min_max" else (0.0, 65535.0)
        scaled = (pixels - low) * (255.0 / max(high - low, 1e-12))
        return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8))
    if grayscale:
        # ITU-R 601-2 luma of RGB; alpha is dropped, not composited.
        return image if image.mode == "L" else image.convert("L")
    if image.mode in ("L", "RGB"):
        return image
    # Palette, alpha, 1-bit, CMYK, ...: alpha is dropped, not composited.
    return image.convert("L" if image.mode in ("1", "LA", "La") else "RGB")


def _to_16bit(image: Image.Image, sixteen_bit: str) -> Image.Image:
    """16-bit grayscale 'I;16', scaled by `sixteen_bit` as _to_8bit does, to 0..65535."""
    pixels = np.asarray(image, np.float64)
    low, high = (pixels.min(), pixels.max()) if sixteen_bit == "min_max" else (0.0, 65535.0)
    scaled = (pixels - low) * (65535.0 / max(high - low, 1e-12))
    return Image.fromarray(np.clip(np.round(scaled), 0, 65535).astype(np.uint16))


def _to_stored_mode(spec: ImageSpec, image: Image.Image, options: ImageOptions) -> Image.Image:
    """The image in the mode it is stored in: 'L', 'RGB', or 'I;16' with bit_depth 16."""
    if spec.dicom:  # display pixels, at their final depth already
        return image.convert("L") if options.grayscale and image.mode == "RGB" else image
    if options.bit_depth == 16 and (image.mode.startswith("I") or image.mode == "F"):
        return _to_16bit(image, options.sixteen_bit)
    return _to_8bit(image, options.sixteen_bit, options.grayscale)


def _kept_format(data: bytes | None, image: Image.Image, options: ImageOptions) -> str | None:
    """The file's format if its bytes can be stored unchanged, else None."""
    file_format = {"PNG": "png", "JPEG": "jpeg"}.get(image.format or "")
    limit = options.resize_longer_side
    fits = not limit or max(image.size) <= limit  # never upscales
    modes = ("L",) if options.grayscale else ("L", "RGB")
    if data is not None and file_format and image.mode in modes and fits:
        return file_format
    return None


def encode_image(spec: ImageSpec, options: ImageOptions) -> tuple[bytes, str]:
    """(encoded bytes, 'png' | 'jpeg') of one image, as stored in image/encoded.

    An 8-bit grayscale (or, unless `options.grayscale`, RGB) PNG/JPEG that needs
    no resizing keeps its file's bytes; anything else (16-bit, palette, alpha,
    arrays, resized, RGB to grayscale) is re-encoded as `options.image_format`.
    Re-encoding is deterministic: the same input and options give the same bytes
    (with the same PIL and libjpeg build).
    """
    data, image = _read_image(spec, options)
    limit = options.resize_longer_side
    kept = _kept_format(data, image, options)
    if kept:
        return data, kept
    image = _to_stored_mode(spec, image, options)
    if limit and max(image.size) > limit:
        scale = limit / max(image.size)
        size = tuple(max(1, round(s * scale)) for s in image.size)
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)  # antialiased
    buffer = io.BytesIO()
    if options.image_format == "jpeg":
        # Baseline, not optimized or progressive: the plain libjpeg path, the same
        # bytes every run. PIL's default 4:2:0 chroma subsampling for RGB.
        image.save(buffer, format="JPEG", quality=options.jpeg_quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue(), options.image_format


def check_image(spec: ImageSpec, options: ImageOptions) -> Problem | None:
    """Decodes the image fully; a Problem if its file is missing or undecodable."""
    where = dict(image_id=spec.image_id, file=spec.file, line=spec.line)
    if spec.array is None and not os.path.isfile(spec.file):
        return Problem("image file not found", **where)
    try:
        data, image = _read_image(spec, options)
        if _kept_format(data, image, options):
            # Bytes stored unchanged are decoded in training by TensorFlow, which is
            # stricter than PIL (it rejects a PNG cut short after its pixel data).
            tf.io.decode_image(data, expand_animations=False)
    except dicom.DicomProblem as e:
        return Problem(str(e), **where)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image to report
        # TensorFlow wraps its message in '{{function_node ...}} ... [Op:DecodeImage]'.
        message = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:\w+\]", "", str(e)).strip()
        return Problem(f"cannot decode image ({type(e).__name__}: {message})", **where)
    return None
