from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import subprocess
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from cliplens.server import images
from cliplens.server.images import (
    IMAGE_EXTENSIONS,
    IMAGE_FORMATS_BY_EXTENSION,
    ImageRejected,
    load_image,
    thumbnail_jpeg,
    to_rgb,
)


def noisy_rgb(w: int = 128, h: int = 96, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def png_header_only(width: int, height: int) -> bytes:
    """A valid-looking 1-bit greyscale PNG claiming width x height, with one tiny IDAT.

    Pillow checks the pixel count when it reads IHDR, so the missing pixel data never matters.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + (width + 7) // 8), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rejected(path: Path) -> ImageRejected:
    with pytest.raises(ImageRejected) as exc:
        load_image(path)
    assert str(exc.value) == f"{exc.value.reason}: {exc.value.detail}"
    return exc.value


# --- tables -----------------------------------------------------------------


def test_extension_table() -> None:
    assert IMAGE_FORMATS_BY_EXTENSION[".jpg"] == ("JPEG",)
    assert IMAGE_FORMATS_BY_EXTENSION[".tiff"] == ("TIFF",)
    assert frozenset(IMAGE_FORMATS_BY_EXTENSION) == IMAGE_EXTENSIONS
    all_formats = {f for fs in IMAGE_FORMATS_BY_EXTENSION.values() for f in fs}
    assert not all_formats & {"EPS", "PS", "PDF"}
    assert not {".eps", ".ps", ".pdf"} & IMAGE_EXTENSIONS
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


# --- rejection --------------------------------------------------------------


def test_png_bomb_too_large(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(20000, 20000))
    assert path.stat().st_size < 10_000
    assert rejected(path).reason == "too_large"


def test_png_between_limit_and_twice_limit_too_large(tmp_path: Path) -> None:
    """Pillow only *warns* in this zone; load_image must turn that into a rejection
    without changing the process-wide warning filters."""
    side = int((Image.MAX_IMAGE_PIXELS or 0) ** 0.5) + 100
    assert side * side < 2 * (Image.MAX_IMAGE_PIXELS or 0)
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(side, side))
    before = list(warnings.filters)
    assert rejected(path).reason == "too_large"
    assert list(warnings.filters) == before


def test_truncated_jpeg(tmp_path: Path) -> None:
    buf = io.BytesIO()
    noisy_rgb(256, 256).save(buf, "JPEG", quality=95)
    path = tmp_path / "half.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert rejected(path).reason in {"truncated", "corrupt"}


def test_truncated_png(tmp_path: Path) -> None:
    buf = io.BytesIO()
    noisy_rgb(256, 256).save(buf, "PNG")
    path = tmp_path / "half.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert rejected(path).reason in {"truncated", "corrupt"}


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    rejected(path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(random.Random(1).randbytes(4096))
    assert rejected(path).reason in {"unsupported_format", "corrupt"}


def test_tiff_named_png(tmp_path: Path) -> None:
    path = tmp_path / "really_tiff.png"
    noisy_rgb().save(path, format="TIFF")
    assert rejected(path).reason == "unsupported_format"


def test_eps_named_jpg_never_runs_ghostscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    def boom(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise AssertionError("Ghostscript must never run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", boom)
    monkeypatch.setattr(subprocess, "Popen", boom)
    monkeypatch.setattr(subprocess, "check_call", boom)
    path = tmp_path / "doc.jpg"
    path.write_bytes(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n"
        b"newpath 0 0 moveto 100 100 lineto stroke\nshowpage\n%%EOF\n"
    )
    assert rejected(path).reason == "unsupported_format"
    assert calls == []


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "doc.eps"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n")
    assert rejected(path).reason == "unsupported_format"


def test_symlink_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.png"
    noisy_rgb().save(real)
    link = tmp_path / "link.png"
    link.symlink_to(real)
    assert rejected(link).reason == "unreadable"


def test_missing_file_unreadable(tmp_path: Path) -> None:
    assert rejected(tmp_path / "gone.png").reason == "unreadable"


def test_directory_and_fifo_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    assert rejected(tmp_path / "dir.png").reason in {"not_a_file", "unreadable"}
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.png")
        assert rejected(tmp_path / "pipe.png").reason == "not_a_file"  # and did not block


def test_file_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.png"
    noisy_rgb().save(path)
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 100)
    assert rejected(path).reason == "too_large"


# --- successful loads -------------------------------------------------------


def test_basic_load_metadata(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    noisy_rgb(40, 30).save(path)
    data = path.read_bytes()
    loaded = load_image(path)
    assert (loaded.width, loaded.height, loaded.format) == (40, 30, "PNG")
    assert loaded.image.mode == "RGB" and loaded.image.size == (40, 30)
    assert loaded.size_bytes == len(data)
    assert loaded.mtime_ns == path.stat().st_mtime_ns
    assert loaded.content_hash == hashlib.blake2b(data, digest_size=16).hexdigest()


def test_content_hash_changes_with_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    noisy_rgb(seed=1).save(path)
    first = load_image(path).content_hash
    assert load_image(path).content_hash == first
    noisy_rgb(seed=2).save(path)
    assert load_image(path).content_hash != first


def test_exif_orientation_6(tmp_path: Path) -> None:
    # Left half red, right half blue: rotation is obvious and JPEG-friendly.
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, :40] = (255, 0, 0)
    arr[:, 40:] = (0, 0, 255)
    img = Image.fromarray(arr, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    tagged = tmp_path / "tagged.jpg"
    img.save(tagged, quality=95, exif=exif.tobytes())
    upright = tmp_path / "upright.jpg"
    img.transpose(Image.Transpose.ROTATE_270).save(upright, quality=95)

    a, b = load_image(tagged), load_image(upright)
    assert (a.width, a.height) == (40, 80)
    assert a.image.size == b.image.size
    diff = np.abs(np.asarray(a.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16))
    assert diff.mean() < 3
    # Top of the displayed image is red (the former left half).
    r, _g, bl = a.image.getpixel((20, 5))  # type: ignore[misc]
    assert r > 200 and bl < 60


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    loaded = load_image(path)
    assert loaded.image.mode == "RGB"
    r, g, b = loaded.image.getpixel((16, 16))  # type: ignore[misc]
    assert r > 200 and g < 60 and b < 60


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    img.putpixel((0, 0), 1)
    path = tmp_path / "p.png"
    img.save(path, transparency=0)  # index 0 (black) is transparent
    out = load_image(path).image
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (255, 0, 0)


def test_rgba_transparent_is_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (0, 0, 0, 128))
    out = to_rgb(img)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert all(120 <= c <= 135 for c in out.getpixel((1, 0)))  # type: ignore[union-attr]
    path = tmp_path / "rgba.png"
    img.save(path)
    assert load_image(path).image.getpixel((0, 0)) == (255, 255, 255)


def test_i16_gradient_keeps_levels(tmp_path: Path) -> None:
    grad = np.linspace(0, 65535, 512 * 4, dtype=np.float64).astype(np.uint16).reshape(4, 512)
    img = Image.fromarray(grad)
    assert img.mode.startswith("I;16")
    assert len(np.unique(np.asarray(to_rgb(img))[..., 0])) > 200
    path = tmp_path / "g16.png"
    img.save(path)
    out = np.asarray(load_image(path).image)[..., 0]
    assert len(np.unique(out)) > 200
    assert out.min() == 0 and out.max() == 255


def test_mode_i_and_f() -> None:
    i_img = Image.fromarray(np.array([[-5, 0, 65535, 100000]], dtype=np.int32), "I")
    assert list(np.asarray(to_rgb(i_img))[0, :, 0]) == [0, 0, 255, 255]
    f_img = Image.fromarray(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32), "F")
    assert list(np.asarray(to_rgb(f_img))[0, :, 0]) == [0, 128, 255]
    flat = Image.fromarray(np.full((2, 2), 7.0, dtype=np.float32), "F")
    assert to_rgb(flat).mode == "RGB"


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "LA", "La", "PA", "RGBa", "I;16B"])
def test_to_rgb_modes(mode: str) -> None:
    out = to_rgb(Image.new(mode, (3, 2)))
    assert out.mode == "RGB" and out.size == (3, 2)


def test_to_rgb_rgb_unchanged_and_la_white() -> None:
    rgb = noisy_rgb(4, 4)
    assert to_rgb(rgb) is rgb
    assert to_rgb(Image.new("LA", (1, 1), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("La", (1, 1), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    grey = Image.new("L", (2, 1), 0)
    grey.putpixel((1, 0), 50)
    grey.info["transparency"] = 0
    assert to_rgb(grey).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(grey).getpixel((1, 0)) == (50, 50, 50)


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 3
    loaded = load_image(path)
    assert loaded.format == "GIF"
    assert loaded.image.getpixel((8, 8)) == (255, 0, 0)


def test_other_formats_load(tmp_path: Path) -> None:
    for ext, fmt in ((".bmp", "BMP"), (".webp", "WEBP"), (".tif", "TIFF"), (".jpeg", "JPEG")):
        path = tmp_path / f"x{ext}"
        noisy_rgb(20, 10).save(path, format=fmt)
        loaded = load_image(path)
        assert (loaded.format, loaded.width, loaded.height) == (fmt, 20, 10)


# --- thumbnails -------------------------------------------------------------


def test_thumbnail_jpeg() -> None:
    src = noisy_rgb(1000, 500)
    data = thumbnail_jpeg(src)
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.format == "JPEG"
        assert max(thumb.size) <= 256 and thumb.size == (256, 128)
    assert src.size == (1000, 500)  # the original is untouched


def test_thumbnail_never_upscales() -> None:
    data = thumbnail_jpeg(noisy_rgb(100, 50), max_side=256)
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.size == (100, 50)


def test_thumbnail_from_rgba() -> None:
    data = thumbnail_jpeg(Image.new("RGBA", (600, 600), (0, 0, 0, 0)), max_side=64)
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.size == (64, 64)
        assert thumb.convert("RGB").getpixel((32, 32)) == (255, 255, 255)


def test_a_jpeg_too_small_for_the_size_it_claims_is_truncated(tmp_path: Path) -> None:
    # libjpeg fills a scan that ends early with grey and reports success: without the check this
    # 780-byte file decodes to 243 MB of grey "picture".
    data = bytearray(encoded_jpeg(noisy_rgb(16, 16)))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 9000, 9000)
    path = tmp_path / "claims_big.jpg"
    path.write_bytes(bytes(data))
    rejection = rejected(path)
    assert rejection.reason == "truncated" and "9000x9000" in rejection.detail
    # A real flat-grey JPEG, the most compressible kind, is far above the floor.
    flat = tmp_path / "flat.jpg"
    Image.new("RGB", (3000, 2000), (128, 128, 128)).save(flat, quality=10)
    assert load_image(flat).width == 3000
    assert flat.stat().st_size > 6 * images.MIN_JPEG_BYTES_PER_MEGAPIXEL * 3


def encoded_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()
