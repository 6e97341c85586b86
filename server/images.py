"""Safe image decoding and normalisation to 8-bit RGB.

Images come from folders the user pointed us at, but their bytes are still
untrusted: a file can lie about its type, be truncated, or be a decompression
bomb. load_image reads each file once (through a no-follow descriptor), pins the
decoder to the format its extension promises, and turns every failure into an
ImageRejected with a short machine-readable reason.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from .filters import exif_taken
from .paths import open_beneath

MAX_FILE_BYTES = 256 * 1024 * 1024


def _formats_by_extension() -> dict[str, tuple[str, ...]]:
    # An explicit allow-list: EPS/PS/PDF are never here because Pillow hands EPS
    # to Ghostscript, an external interpreter we must not run on untrusted files.
    table: dict[str, tuple[str, ...]] = {
        ".jpg": ("JPEG",),
        ".jpeg": ("JPEG",),
        ".png": ("PNG",),
        ".gif": ("GIF",),
        ".bmp": ("BMP",),
        ".webp": ("WEBP",),
        ".tif": ("TIFF",),
        ".tiff": ("TIFF",),
    }
    try:
        has_avif = bool(features.check_module("avif"))
    except ValueError:  # Pillow too old to know the module at all
        has_avif = False
    if has_avif:
        table[".avif"] = ("AVIF",)
    return table


IMAGE_FORMATS_BY_EXTENSION: dict[str, tuple[str, ...]] = _formats_by_extension()
IMAGE_EXTENSIONS: frozenset[str] = frozenset(IMAGE_FORMATS_BY_EXTENSION)

_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# Pillow's plugins signal malformed data with a zoo of exception types besides OSError.
_DECODE_ERRORS = (ValueError, SyntaxError, EOFError, MemoryError, struct.error, ZeroDivisionError, IndexError)


class ImageRejected(Exception):
    """A file that cannot be used as an image; ``reason`` is stable, ``detail`` is for humans."""

    REASONS = frozenset({"too_large", "unsupported_format", "corrupt", "truncated", "unreadable", "not_a_file"})

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in self.REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class LoadedImage:
    image: Image.Image  # RGB, 8-bit, EXIF-rotated, first frame
    width: int  # after EXIF rotation
    height: int
    format: str
    size_bytes: int
    mtime_ns: int
    content_hash: str  # hex blake2b(digest_size=16) of the file bytes
    taken: int | None = None  # EXIF capture date (filters.py's wall-clock seconds), if it has one


def _read_file(path: Path, roots: Sequence[Path] | None) -> tuple[bytes, os.stat_result]:
    # O_NOFOLLOW: the walker/policy checked the real path earlier; if the file was swapped
    # for a symlink since, refuse rather than follow it somewhere unchecked. With `roots`, no
    # folder on the way may be a symlink either (open_beneath).
    # O_NONBLOCK: opening a FIFO must not hang; fstat then rejects it as not_a_file.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags) if roots is None else open_beneath(roots, path, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR):
            raise ImageRejected("unreadable", "a symlink took the place of the file or a folder above it") from None
        raise ImageRejected("unreadable", exc.strerror or type(exc).__name__) from None
    try:
        # fstat the descriptor we opened (not the path) so the checks describe what we read.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageRejected("not_a_file", "not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageRejected("too_large", f"{st.st_size} bytes > {MAX_FILE_BYTES}")
        with os.fdopen(fd, "rb") as fh:
            fd = -1  # now owned (and closed) by fh
            # Ask for the size fstat gave, plus one byte: read(MAX + 1) would allocate the
            # whole limit (256 MiB) for every file, and a file that grew since fstat shows.
            want = st.st_size + 1
            data = fh.read(want)
            if len(data) == want:  # it grew: read on, still one byte past the limit at most
                data += fh.read(MAX_FILE_BYTES + 1 - len(data))
    except OSError as exc:
        raise ImageRejected("unreadable", exc.strerror or type(exc).__name__) from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise ImageRejected("too_large", f"more than {MAX_FILE_BYTES} bytes")
    return data, st


@dataclass
class RawImageFile:
    """The bytes of an image file, read once, with what fstat said and their hash."""

    path: Path
    data: bytes
    formats: tuple[str, ...]  # the decoders its extension allows
    size_bytes: int
    mtime_ns: int
    content_hash: str  # hex blake2b(digest_size=16) of the bytes


def read_image_file(path: Path, roots: Sequence[Path] | None = None) -> RawImageFile:
    """Read (without following a swapped-in symlink) and hash a file whose extension is an image's.
    With `roots` (the allowed folders), `path` must be a real path inside one of them, and no
    folder between that root and the file may have become a symlink since it was checked."""
    path = Path(path)
    formats = IMAGE_FORMATS_BY_EXTENSION.get(path.suffix.lower())
    if formats is None:
        raise ImageRejected("unsupported_format", f"extension {path.suffix or '(none)'!r} is not supported")
    data, st = _read_file(path, roots)
    if not data:
        raise ImageRejected("truncated", "file is empty")
    return RawImageFile(
        path=path,
        data=data,
        formats=formats,
        size_bytes=len(data),
        mtime_ns=st.st_mtime_ns,
        content_hash=hashlib.blake2b(data, digest_size=16).hexdigest(),
    )


def load_image(path: Path, *, draft: tuple[int, int] | None = None, roots: Sequence[Path] | None = None) -> LoadedImage:
    """Read and decode one image file; see read_image_file for `roots`, decode_image for `draft`."""
    return decode_image(read_image_file(path, roots), draft=draft)


def decode_image(raw: RawImageFile, *, draft: tuple[int, int] | None = None) -> LoadedImage:
    """Decode to 8-bit RGB. With `draft` (width, height), a JPEG may be decoded at 1/2, 1/4 or
    1/8 scale as long as both sides stay at least that big: far cheaper for large photos, whose
    pixels are about to be shrunk to the model's input anyway. width/height stay the file's own."""
    formats = raw.formats
    # ImageFile.LOAD_TRUNCATED_IMAGES is deliberately left False (Pillow's default): with it
    # True, a truncated file would decode "successfully" with grey filler and be indexed.
    try:
        # Pillow warns (not raises) between MAX_IMAGE_PIXELS and twice that; make the warning
        # an error here only, leaving the process-wide filters alone.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # formats= pins the decoder to the extension: a TIFF named .png, or an EPS named
            # .jpg, is refused instead of being sniffed and decoded as what it really is.
            with Image.open(io.BytesIO(raw.data), formats=formats) as opened:
                fmt = opened.format or formats[0]
                full_size = opened.size
                _check_jpeg_has_data_for(fmt, full_size, len(raw.data))
                opened.seek(0)  # first frame of animations
                if draft is not None and fmt == "JPEG":
                    opened.draft(None, draft)
                decoded_size = opened.size
                opened.load()  # open() is lazy; decode now, inside the try
                # After load(): a PNG's getexif() loads the image itself, and exif_taken
                # swallows errors, so before load() a corrupt file would pass as whole.
                taken = exif_taken(opened)
                rotated = ImageOps.exif_transpose(opened)
                rgb = to_rgb(rotated)
                if rgb is opened:
                    rgb = rgb.copy()  # detach from the file object being closed
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("too_large", str(exc)[:200]) from None
    except UnidentifiedImageError:
        raise ImageRejected("unsupported_format", f"not a {'/'.join(formats)} image") from None
    except OSError as exc:
        msg = str(exc)
        reason = "truncated" if "truncated" in msg.lower() else "corrupt"
        raise ImageRejected(reason, msg[:200] or type(exc).__name__) from None
    except _DECODE_ERRORS as exc:
        reason = "truncated" if isinstance(exc, EOFError) else "corrupt"
        raise ImageRejected(reason, f"{type(exc).__name__}: {str(exc)[:200]}") from None
    except Exception as exc:  # last resort: a decoder bug must not take down an indexing run
        raise ImageRejected("corrupt", f"{type(exc).__name__}: {str(exc)[:200]}") from None

    width, height = full_size
    if (rgb.width, rgb.height) != decoded_size:  # EXIF rotated by 90 or 270 degrees
        width, height = height, width
    return LoadedImage(
        image=rgb,
        width=width,
        height=height,
        format=fmt,
        size_bytes=raw.size_bytes,
        mtime_ns=raw.mtime_ns,
        content_hash=raw.content_hash,
        taken=taken,
    )


def read_taken(raw: RawImageFile) -> int | None:
    """The EXIF capture date of a file already read, from its header alone (no decoding)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw.data), formats=raw.formats) as opened:
                return exif_taken(opened)
    except Exception:  # not readable as its format: the index run reports that, not this
        return None


# Even a flat grey JPEG spends a few bits on every 8x8 block (about 1/170 byte per pixel at
# 4:2:0); far fewer bytes than this per pixel cannot be a complete image.
MIN_JPEG_BYTES_PER_MEGAPIXEL = 256


def _check_jpeg_has_data_for(fmt: str, size: tuple[int, int], n_bytes: int) -> None:
    # libjpeg pads a scan that ends early with grey and calls it decoded: a 780-byte file whose
    # header claims 9000x9000 would cost 243 MB of grey pixels, and be indexed as a picture.
    megapixels = size[0] * size[1] / 1e6
    if fmt in ("JPEG", "MPO") and n_bytes < megapixels * MIN_JPEG_BYTES_PER_MEGAPIXEL:
        raise ImageRejected(
            "truncated", f"{n_bytes} bytes cannot hold the {size[0]}x{size[1]} pixels its header claims"
        )


def load_pictures(paths: Sequence[Path], roots: Sequence[Path] | None = None) -> list[Image.Image]:
    """The RGB pictures of several files; a bad one raises ImageRejected naming its path."""
    pictures = []
    for path in paths:
        try:
            pictures.append(load_image(path, roots=roots).image)
        except ImageRejected as exc:
            raise ImageRejected(exc.reason, f"{path}: {exc.detail}") from None
    return pictures


def _composite_on_white(img: Image.Image) -> Image.Image:
    # CLIP has no notion of transparency; white is the usual background for cut-outs
    # and logos, whereas dropping alpha exposes whatever colour the hidden pixels hold.
    if img.mode == "La":
        # Premultiplied L+alpha has no direct conversion in Pillow; composite by hand:
        # out = L*a (already premultiplied) + 255*(1-a).
        arr = np.asarray(img).astype(np.int32)
        grey = np.clip(arr[..., 0] + (255 - arr[..., 1]), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, _WHITE)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _high_bit_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "I":
        arr = np.clip(arr, 0, 65535)
    wide = arr.astype(np.uint32)
    # Scale the full 16-bit range (value/257, rounded) rather than clipping at 255,
    # which would turn most 16-bit images solid white.
    grey = ((wide + 128) // 257).astype(np.uint8)
    trns = img.info.get("transparency")
    if isinstance(trns, int):
        grey = np.where(arr == trns, np.uint8(255), grey)  # tRNS grey key -> white, like alpha
    return Image.fromarray(grey, "L").convert("RGB")


def _float_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    # A flat image carries no range to stretch: it becomes black.
    scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), "L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Normalise any Pillow mode to 8-bit RGB ("RGB" input is returned unchanged)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _ALPHA_MODES or (mode in ("P", "L", "1") and "transparency" in img.info):
        return _composite_on_white(img)
    if mode in _SIXTEEN_BIT_MODES:
        return _high_bit_to_rgb(img)
    if mode == "F":
        return _float_to_rgb(img)
    # "1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV" and anything else Pillow can convert.
    return img.convert("RGB")


def thumbnail_jpeg(img: Image.Image, max_side: int = 256, quality: int = 80) -> bytes:
    """A JPEG no larger than max_side on either side; never upscales, never modifies img."""
    if max_side < 1:
        raise ValueError("max_side must be >= 1")
    if not 1 <= quality <= 95:
        raise ValueError("quality must be in 1..95")
    thumb = to_rgb(img).copy()  # copy: thumbnail() works in place and to_rgb may return img itself
    thumb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
