"""Decoder fuzzing with Hypothesis.

Small valid images of every allowed format are mutated (bit flips, truncation, splices, header
field overwrites) and fed to read_image_file, decode_image and the preprocessing: only
ImageRejected may come out, each example quickly and in bounded memory. The MCP tools are fuzzed
in tests/test_fuzz_tools.py.

CLIPLENS_FUZZ_EXAMPLES=N runs N examples per image format instead of the CI default; `pytest -s`
prints how many ran.
"""

from __future__ import annotations

import io
import re
import resource
import sys
import time
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from cliplens.server.images import IMAGE_FORMATS_BY_EXTENSION, ImageRejected, decode_image, read_image_file
from cliplens.server.preprocess import FastPreprocessor

from .fuzz_support import DECODE_EXAMPLES, _hypothesis

# --- decoder fuzzing ---------------------------------------------------------------------------


def _encoded(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _seed_images() -> dict[str, list[bytes]]:
    """A few small valid files of each allowed format, in the modes and variants that take
    different decoder paths (alpha, palette, 16-bit, float, progressive, animated, EXIF)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), "RGB")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (12, 16), dtype=np.uint8), "L"))
    grey16 = Image.fromarray(rng.integers(0, 65536, (12, 16), dtype=np.uint16))  # I;16
    palette = rgb.convert("P")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated 90 degrees
    frames = [palette, rgb.rotate(90).convert("P")]
    return {
        ".png": [
            _encoded(rgb, "PNG"),
            _encoded(rgba, "PNG"),
            _encoded(palette, "PNG", transparency=0),
            _encoded(grey16, "PNG"),
        ],
        ".jpg": [
            _encoded(rgb, "JPEG", quality=90),
            _encoded(rgb, "JPEG", progressive=True),
            _encoded(rgb.convert("CMYK"), "JPEG"),
            _encoded(rgb, "JPEG", exif=exif),
        ],
        ".gif": [_encoded(palette, "GIF"), _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0)],
        ".bmp": [_encoded(rgb, "BMP"), _encoded(palette, "BMP"), _encoded(rgb.convert("1"), "BMP")],
        ".webp": [_encoded(rgb, "WEBP", quality=80), _encoded(rgba, "WEBP", lossless=True)],
        ".tiff": [
            _encoded(rgb, "TIFF"),
            _encoded(rgb, "TIFF", compression="tiff_lzw"),
            _encoded(rgb.convert("F"), "TIFF"),
            _encoded(grey16, "TIFF"),
            _encoded(rgb, "TIFF", save_all=True, append_images=[rgba]),
        ],
    }


SEEDS = _seed_images()
ALL_SEEDS = [data for group in SEEDS.values() for data in group]
EXTREMES = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
# Sizes a header may claim that Pillow's pixel limit lets through and that still cost real memory.
BIG_BUT_ALLOWED = [3000, 4096, 6000, 8191, 9000]
# The CLIP image processor's arithmetic, done the way the encoder does it for every image.
PREPROCESS = FastPreprocessor(
    shortest_edge=224,
    resize_to=None,
    crop=(224, 224),
    resample=Image.Resampling.BICUBIC,
    scale=(1 / 255 / np.array([0.26862954, 0.26130258, 0.27577711])).astype(np.float32),
    offset=(-np.array([0.48145466, 0.4578275, 0.40821073]) / np.array([0.26862954, 0.26130258, 0.27577711])).astype(
        np.float32
    ),
)


def _put(data: bytearray, pos: int, value: int, width: int, order: str) -> None:
    data[pos : pos + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, order)


@st.composite
def mutated_image(draw: st.DrawFn, ext: str, big: bool = False) -> tuple[bytes, str]:
    """A seed of `ext` with 1 to 4 mutations, and the extension to store it under (now and
    then another format's, which the decoder must refuse rather than sniff)."""
    data = bytearray(draw(st.sampled_from(SEEDS[ext])))
    values = st.one_of(st.sampled_from(EXTREMES), st.integers(0, 2**32 - 1))
    ops = ["flip", "byte", "truncate", "splice", "repeat", "field", "size"]
    if big:
        values = st.one_of(st.sampled_from(BIG_BUT_ALLOWED), values)
        ops += ["size"] * 6
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        op = draw(st.sampled_from(ops))
        # Mostly past the signature: a file whose magic bytes are gone is refused before any
        # decoder runs, which a few examples show and the rest need not repeat.
        lo = min(draw(st.sampled_from([0, 12, 12, 12])), len(data) - 1)
        pos = draw(st.integers(lo, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            donor = draw(st.sampled_from(ALL_SEEDS))
            start = draw(st.integers(0, len(donor)))
            piece = donor[start : start + draw(st.integers(0, 256))]
            data[pos : pos + draw(st.integers(0, 64))] = piece
        elif op == "repeat":
            chunk = bytes(data[pos : pos + draw(st.integers(1, 64))])
            data[pos:pos] = chunk * draw(st.integers(1, 16))
        elif op == "field":  # a header integer: width, height, offset, count, length...
            pos = draw(st.integers(0, min(len(data), 256) - 1))
            _put(data, pos, draw(values), draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from(["little", "big"])))
        else:  # the image size, where the format keeps it, with checksums made right again
            _overwrite_size(data, draw(values), draw(values))
    target = draw(st.sampled_from([ext] * 12 + sorted(SEEDS)))
    return bytes(data), target


def _overwrite_size(data: bytearray, width: int, height: int) -> None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 33 and data[12:16] == b"IHDR":
        _put(data, 16, width, 4, "big")
        _put(data, 20, height, 4, "big")
        _put(data, 29, zlib.crc32(bytes(data[12:29])), 4, "big")  # else the CRC check hides the size
    elif data[:2] == b"\xff\xd8":
        sof = re.search(rb"\xff[\xc0-\xc2]", bytes(data[2:]))
        if sof and sof.start() + 2 + 9 <= len(data):
            at = sof.start() + 2
            _put(data, at + 5, height, 2, "big")
            _put(data, at + 7, width, 2, "big")
    elif data[:3] == b"GIF" and len(data) >= 10:
        _put(data, 6, width, 2, "little")  # the logical screen; frames keep theirs
        _put(data, 8, height, 2, "little")
    elif data[:2] == b"BM" and len(data) >= 26:
        _put(data, 18, width, 4, "little")
        _put(data, 22, height, 4, "little")
    elif data[:4] == b"RIFF" and data[12:16] == b"VP8L" and len(data) >= 25:
        bits = ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
        _put(data, 21, bits | (data[24] & 0xF0) << 24, 4, "little")
    elif data[:2] in (b"II", b"MM") and len(data) >= 8:
        order = "little" if data[:2] == b"II" else "big"
        ifd = int.from_bytes(data[4:8], order)
        if ifd + 2 <= len(data):
            for i in range(int.from_bytes(data[ifd : ifd + 2], order)):
                entry = ifd + 2 + 12 * i
                if entry + 12 > len(data):
                    break
                tag = int.from_bytes(data[entry : entry + 2], order)
                if tag in (256, 257):  # ImageWidth, ImageLength, as LONG
                    _put(data, entry + 2, 4, 2, order)
                    _put(data, entry + 4, 1, 4, order)
                    _put(data, entry + 8, width if tag == 256 else height, 4, order)


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise LookupError(field_name)


def _reset_peak() -> bool:
    """Restart the kernel's peak-RSS count (VmHWM); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _claimed_pixels(data: bytes, suffix: str) -> int:
    """Width x height as the header says, 0 when the header cannot be read or is over the limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS_BY_EXTENSION[suffix]) as img:
                return min(img.width * img.height, Image.MAX_IMAGE_PIXELS or 0)
    except Exception:  # whatever the header's problem, decode_image must refuse the file itself
        return 0


@dataclass
class DecodeStats:
    examples: int = 0
    decoded: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    slowest: float = 0.0
    peak_growth_mib: float = 0.0


def decode_fuzz(tmp_path: Path, ext: str, examples: int, big: bool, max_seconds: float) -> DecodeStats:
    stats = DecodeStats()
    precise = sys.platform == "linux" and _reset_peak()
    start_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @_hypothesis(examples)
    @given(mutated_image(ext, big), st.booleans())
    def one_file(example: tuple[bytes, str], draft: bool) -> None:
        data, suffix = example
        path = tmp_path / f"fuzz{suffix}"
        path.write_bytes(data)
        stats.examples += 1
        if precise:
            _reset_peak()
            before = _rss_kib("VmRSS")
        started = time.perf_counter()
        pixels = _claimed_pixels(data, suffix)
        try:
            loaded = decode_image(read_image_file(path), draft=(224, 224) if draft else None)
            tensor = PREPROCESS(loaded.image)
            decoded = loaded.width * loaded.height
            assert loaded.image.mode == "RGB" and loaded.image.width * loaded.image.height <= decoded
            assert 0 < decoded <= (Image.MAX_IMAGE_PIXELS or 0)
            pixels = max(pixels, decoded)
            assert tensor.shape == (3, 224, 224) and np.isfinite(tensor).all()
            stats.decoded += 1
        except ImageRejected as exc:
            assert len(exc.detail) <= 300, exc.detail
            stats.reasons[exc.reason] += 1
        elapsed = time.perf_counter() - started
        stats.slowest = max(stats.slowest, elapsed)
        assert elapsed <= max_seconds, f"{elapsed:.1f} s for {len(data)} bytes as {suffix}"
        if precise:
            growth = (_rss_kib("VmHWM") - before) * 1024
            stats.peak_growth_mib = max(stats.peak_growth_mib, growth / 2**20)
            # What an image of the size its header claims needs (decoders allocate the whole
            # canvas before they find the data short; then a few RGBA copies while converting
            # and resizing), plus a fixed allowance. Pillow's pixel limit caps the claim.
            budget = 64 * 2**20 + 24 * pixels
            assert growth <= budget, f"peak RSS grew {growth / 2**20:.0f} MiB for {pixels} pixels"

    one_file()
    if not precise:  # no per-example peak here: the whole run's peak must stay in bounds instead
        growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_peak) * 1024
        assert growth <= 64 * 2**20 + 24 * (Image.MAX_IMAGE_PIXELS or 0), growth
    return stats


def _report(ext: str, stats: DecodeStats) -> None:
    print(
        f"\nfuzz decode {ext}: {stats.examples} examples, {stats.decoded} decoded, rejected {dict(stats.reasons)}, "
        f"slowest {stats.slowest * 1000:.0f} ms, peak RSS growth {stats.peak_growth_mib:.0f} MiB"
    )


# Pillow warns about the corrupt TIFF/EXIF tags it skips; what matters here is what decode_image raises.
SKIPPED_TAG_WARNINGS = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")


@SKIPPED_TAG_WARNINGS
@pytest.mark.parametrize("ext", sorted(SEEDS))
def test_mutated_images_decode_or_are_rejected(tmp_path: Path, ext: str) -> None:
    for name, data in ((f"seed{i}{ext}", d) for i, d in enumerate(SEEDS[ext])):
        (tmp_path / name).write_bytes(data)  # the seeds themselves must decode: else the fuzz proves little
        assert decode_image(read_image_file(tmp_path / name)).image.mode == "RGB"
    stats = decode_fuzz(tmp_path, ext, DECODE_EXAMPLES, big=False, max_seconds=10.0)
    _report(ext, stats)
    assert stats.examples >= min(DECODE_EXAMPLES, 10)
    assert stats.reasons, "no mutation was rejected: the mutations are too tame"


@pytest.mark.slow
@SKIPPED_TAG_WARNINGS
@pytest.mark.parametrize("ext", sorted(SEEDS))
def test_mutated_images_claiming_large_sizes_stay_within_memory(tmp_path: Path, ext: str) -> None:
    # Sizes below Pillow's pixel limit but up to 81 megapixels: the costly decodes.
    stats = decode_fuzz(tmp_path, ext, max(DECODE_EXAMPLES // 2, 10), big=True, max_seconds=60.0)
    _report(ext, stats)
