"""Image bytes (one shard sample) to a ``(3, H, W)`` uint8 tensor, or a ``DecodeError`` saying why not.

JPEGs, recognised by their SOI magic rather than an extension, go through simplejpeg (libjpeg-turbo):
identical pixels to PIL and a little faster (1.04-1.10x measured against Pillow 13, which also uses
libjpeg-turbo; docs/benchmarks.md). CMYK and YCCK JPEGs are left to PIL (draft scaling included):
TurboJPEG's CMYK -> RGB differs from PIL's by one level on most pixels; PIL also judges their damage.
Reading the header first refuses decompression bombs and too-small images before anything is allocated,
and ``draft_side`` lets libjpeg-turbo scale by 1/2, 1/4 or 1/8 while decoding, which costs far less than
a full decode plus a resize. Everything else goes through PIL, and so does any JPEG simplejpeg refuses
for a reason other than damage. simplejpeg runs strict, so libjpeg's warnings are errors: lost scan data
("Corrupt JPEG data: bad Huffman code", "premature end of data segment") is reported as ``corrupt``
although PIL would decode it (painting flat blocks); the harmless warnings (such as stray bytes between
segments) are left to PIL, which ignores them.

Colour follows DINOv2's ``Image.open(f).convert("RGB")``: alpha is dropped, not composited; EXIF
orientation is ignored; animated images give their first frame. The exceptions are where PIL's
conversion loses the image: 16-bit grey (``I;16``, ``I``) is scaled by 1/256 where PIL clips to 255, and
float (``F``) is rounded and clipped to 0..255 as PIL would.

PIL itself refuses images above ``2 * Image.MAX_IMAGE_PIXELS`` on open (reported as ``too_large``), so a
``max_pixels`` beyond that also needs ``Image.MAX_IMAGE_PIXELS`` raised; between 1x and 2x it only warns.
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError

REASONS: tuple[str, ...] = ("empty", "not_an_image", "corrupt", "truncated", "too_small", "too_large")
# Extensions of image files and of a shard sample's image members (lower case, no dot), in the order a
# sample with several image members is read: the first present wins.
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

_JPEG_SOI, _JPEG_SOS, _JPEG_EOI = b"\xff\xd8\xff", b"\xff\xda", b"\xff\xd9"
_SIGNATURES = {
    _JPEG_SOI: "jpeg",
    b"\x89PNG\r\n\x1a\n": "png",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
    b"BM": "bmp",
}
Image.init()  # registers every bundled plugin in Image.ID, so _pil_formats() sees them all


class DecodeError(ValueError):
    """An image that cannot be used; ``reason`` is a short stable slug used in metrics names."""

    reason: str

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown decode failure reason {reason!r}; expected one of {REASONS}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[DecodeError], tuple[str, str]]:
        # The default pickling replays ``args`` (one string) into ``__init__``, which takes two.
        return type(self), (self.reason, self.message)


def decode_image(
    data: bytes,
    *,
    min_side: int = 1,
    max_pixels: int = 178_956_970,
    draft_side: int | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Decode ``data`` to a contiguous, writable ``(3, H, W)`` uint8 RGB tensor.

    Raises ``DecodeError`` with ``reason`` in ``REASONS`` and nothing else for bad input: ``too_small``
    when the shorter side is below ``min_side``, ``too_large`` above ``max_pixels`` pixels (both checked
    on the stored size, before decoding). With ``draft_side`` a JPEG may be decoded at 1/2, 1/4 or 1/8
    scale: the smallest of these that keeps ``shorter side // factor >= draft_side``. With
    ``channels_last`` the ``(3, H, W)`` tensor is a view of contiguous ``(H, W, 3)`` memory, as the
    decoders write it (same values, one image-sized copy fewer), for consumers that work channels-last.
    """
    if min_side < 1 or max_pixels < 1 or (draft_side is not None and draft_side < 1):
        raise ValueError(
            f"min_side, max_pixels and draft_side must be >= 1, got {min_side}, {max_pixels}, {draft_side}"
        )
    if not data:
        raise DecodeError("empty", "no bytes")
    note = ""
    try:
        pixels = None
        if data[:3] == _JPEG_SOI:
            pixels, note = _decode_jpeg(data, min_side, max_pixels, draft_side)
        if pixels is None:
            pixels = _decode_pil(data, min_side, max_pixels, draft_side)
        return _to_tensor(pixels, channels_last)
    except DecodeError:
        raise
    except Exception as e:  # anything a decoder throws is a property of the bytes, so it becomes a reason
        raise _classify(data, e, note) from e


# ---------------------------------------------------------------- decoders
def _check_size(width: int, height: int, min_side: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise DecodeError("too_large", f"{width}x{height} is more than {max_pixels} pixels")
    if min(width, height) < min_side:
        raise DecodeError("too_small", f"{width}x{height} has a side below {min_side}")


def _draft_shift(width: int, height: int, draft_side: int | None) -> int:
    """log2 of the largest JPEG downscale (1, 2, 4 or 8) keeping ``shorter side // factor >= draft_side``."""
    if draft_side is None:
        return 0
    short, shift = min(width, height), 0
    while shift < 3 and short >> (shift + 1) >= draft_side:
        shift += 1
    return shift


def _decode_jpeg(data: bytes, min_side: int, max_pixels: int, draft_side: int | None) -> tuple[np.ndarray | None, str]:
    """simplejpeg's pixels, or ``(None, why)`` to hand the bytes to PIL."""
    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as e:  # TurboJPEG refuses some headers that PIL's libjpeg reads
        return None, str(e)
    _check_size(width, height, min_side, max_pixels)
    if colourspace in ("CMYK", "YCCK"):
        # TurboJPEG's CMYK -> RGB is off by one level from PIL's on most pixels, and no faster than
        # PIL's decode (which keeps draft scaling): PIL decodes these, so pixels match DINOv2's.
        return None, f"{colourspace} is converted to RGB by PIL"
    factor = 1 << _draft_shift(width, height, draft_side)
    try:
        # TurboJPEG picks the smallest of its n/8 scales whose output is at least min_height x min_width;
        # asking for exactly ceil(side / factor) selects 1/factor, the only scales PIL's draft() offers too.
        pixels = simplejpeg.decode_jpeg(
            data,
            colorspace="GRAY" if colourspace == "Gray" else "RGB",
            min_height=-(-height // factor),
            min_width=-(-width // factor),
        )
    except ValueError as e:
        if _looks_truncated(data, "jpeg"):
            raise DecodeError("truncated", f"simplejpeg: {e}") from e
        # libjpeg's "Corrupt JPEG data" warnings mean lost scan data, which PIL would accept and paint as flat
        # blocks; the exception is stray bytes between segments, which cost nothing (and PIL decodes those).
        if str(e).startswith("Corrupt JPEG data") and "extraneous bytes" not in str(e):
            raise DecodeError("corrupt", f"simplejpeg: {e}") from e
        return None, str(e)
    return pixels, ""


def _decode_pil(data: bytes, min_side: int, max_pixels: int, draft_side: int | None) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=_pil_formats()) as image:  # reads the header only
        width, height = image.size
        _check_size(width, height, min_side, max_pixels)
        shift = _draft_shift(width, height, draft_side)
        if shift and image.format in ("JPEG", "MPO"):
            # draft() takes floor(side / requested) as the scale, rounded down to a power of two: side >> shift
            # gives exactly 2**shift.
            image.draft(None, (width >> shift, height >> shift))
        return _pil_to_array(image)


def _pil_formats() -> list[str]:
    """Every format PIL knows (read per call: plugins may register later) except EPS, whose loader runs
    Ghostscript on the untrusted bytes."""
    return [f for f in Image.ID if f != "EPS"]


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """``(H, W)`` grey or ``(H, W, 3)`` RGB uint8, writable (``np.array`` copies PIL's read-only buffer)."""
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        # 16-bit grey (older Pillows open 16-bit PNGs as 32-bit ``I``): the top byte, 65535 -> 255, 256 -> 1.
        # ``I`` holding 8-bit values would come out dark; no common format stores those.
        values = np.asarray(image).astype(np.int32)
        return (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image), nan=0.0, posinf=255.0, neginf=0.0)
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    if mode in ("1", "L"):
        return np.array(image.convert("L"))  # one channel; _to_tensor repeats it
    if mode in ("LA", "La"):
        return np.array(image.getchannel(0))  # grey as stored (premultiplied for La, which PIL cannot convert)
    if mode == "RGB":
        return np.array(image)  # convert("RGB") would copy the image once more before np.array's copy
    return np.array(image.convert("RGB"))  # P (transparency included), RGBA, CMYK, YCbCr, ...


def _to_tensor(pixels: np.ndarray, channels_last: bool = False) -> torch.Tensor:
    image = torch.from_numpy(pixels)
    if image.ndim == 2:
        image = image.unsqueeze(-1)
    if channels_last:  # grey is copied to 3 channels; the decoders' own RGB arrays are used as they are
        hwc = image.expand(-1, -1, 3).contiguous() if image.shape[-1] == 1 else image
        return hwc.permute(2, 0, 1)
    return image.permute(2, 0, 1).expand(3, -1, -1).contiguous()


# ---------------------------------------------------------------- failure reasons
def _sniff(data: bytes) -> str | None:
    """The container format from the magic bytes, for the formats whose truncation we can see."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((fmt for magic, fmt in _SIGNATURES.items() if data.startswith(magic)), None)


def _looks_truncated(data: bytes, fmt: str | None) -> bool:
    """Whether the bytes end before the format's end marker or declared length."""
    if fmt == "jpeg":
        # Entropy-coded data never holds a marker (0xFF is stuffed), so the image's EOI must follow the last
        # SOS; an EXIF thumbnail's own EOI comes before it, and junk after the EOI does not matter.
        eoi = data.rfind(_JPEG_EOI)
        return eoi == -1 or eoi < data.rfind(_JPEG_SOS)
    if fmt == "png":
        return b"IEND" not in data
    if fmt == "gif":
        return not data.rstrip(b"\x00").endswith(b";")
    if fmt == "webp":  # RIFF length counts everything after its first 8 bytes
        return len(data) < 8 + int.from_bytes(data[4:8], "little")
    if fmt == "bmp":
        return len(data) < 6 or len(data) < int.from_bytes(data[2:6], "little")
    return False


def _classify(data: bytes, error: Exception, note: str) -> DecodeError:
    message = f"{type(error).__name__}: {error}" + (f" (simplejpeg: {note})" if note else "")
    if isinstance(error, Image.DecompressionBombError):
        return DecodeError("too_large", message)
    fmt = _sniff(data)
    if isinstance(error, UnidentifiedImageError) and fmt is None:
        return DecodeError("not_an_image", message)
    if _looks_truncated(data, fmt) or isinstance(error, EOFError) or "truncated" in str(error).lower():
        return DecodeError("truncated", message)
    return DecodeError("corrupt", message)
