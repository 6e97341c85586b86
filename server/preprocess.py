"""The image side of a model's processor, done by us so that it can run in worker threads.

Hugging Face image processors take a list of images and return one batch; they are built for
convenience rather than for a pipeline that decodes and prepares images in parallel while the
model runs. `FastPreprocessor` does the same arithmetic as the PIL backend of CLIP's and
SigLIP's processors (resize, centre crop, rescale, normalise) on one image at a time, releasing
the GIL in Pillow and NumPy, and tells the decoder how small a JPEG may be drafted.

Processors whose output is not one fixed-size pixel tensor (SigLIP2's variable patches) have
no fast path: `FastPreprocessor.for_processor` returns None and callers use the processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# Beyond this many crop-widths (aspect 16:1), resizing by the short side makes pixels the crop
# mostly throws away: those images take a cheaper, slightly inexact path.
EXTREME_ASPECT = 16
# Pillow's resampling filters by the numbers that processor configs store.
_RESAMPLE = {int(f): f for f in Image.Resampling}


@dataclass(frozen=True)
class FastPreprocessor:
    """Resize (by shortest edge, or to a fixed size), centre crop, rescale and normalise."""

    shortest_edge: int | None  # resize so the short side is this long, keeping the aspect
    resize_to: tuple[int, int] | None  # or resize to exactly (width, height)
    crop: tuple[int, int] | None  # centre crop (width, height), or None
    resample: Image.Resampling
    scale: np.ndarray  # (3,) float32: rescale_factor / std, folded together
    offset: np.ndarray  # (3,) float32: -mean / std

    @property
    def draft_size(self) -> tuple[int, int]:
        """The smallest (width, height) a JPEG may be DCT-scaled to before our resize.

        JPEG decoders can produce 1/2, 1/4 or 1/8 scale images for a fraction of the cost;
        Pillow picks the largest reduction that keeps both sides at least this big.
        """
        if self.shortest_edge is not None:
            return (self.shortest_edge, self.shortest_edge)
        assert self.resize_to is not None
        return self.resize_to

    @classmethod
    def for_processor(cls, image_processor: Any) -> FastPreprocessor | None:
        """The fast equivalent of a CLIP- or SigLIP-style image processor, or None."""
        ip = image_processor
        names = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize")
        if not all(hasattr(ip, n) for n in names) or not (ip.do_resize and ip.do_rescale and ip.do_normalize):
            return None
        if getattr(ip, "do_pad", False) or hasattr(ip, "max_num_patches"):
            return None
        size = dict(ip.size or {})
        shortest = size.get("shortest_edge")
        fixed = (size.get("width"), size.get("height"))
        if shortest and not size.get("longest_edge"):
            resize_to = None
        elif fixed[0] and fixed[1] and not shortest:
            resize_to = (int(fixed[0]), int(fixed[1]))
        else:
            return None
        crop = None
        if getattr(ip, "do_center_crop", False):
            cs = dict(ip.crop_size or {})
            if not (cs.get("width") and cs.get("height")):
                return None
            crop = (int(cs["width"]), int(cs["height"]))
            # A crop larger than the resized image would need padding: leave that to the processor.
            if shortest and min(crop) > shortest:
                return None
        elif resize_to is None:
            return None
        try:
            resample = _RESAMPLE[int(ip.resample)]
        except (KeyError, TypeError, ValueError):
            return None
        mean = np.asarray(ip.image_mean, np.float64).reshape(-1)
        std = np.asarray(ip.image_std, np.float64).reshape(-1)
        if mean.size == 1:
            mean = np.repeat(mean, 3)
        if std.size == 1:
            std = np.repeat(std, 3)
        if mean.size != 3 or std.size != 3:
            return None
        factor = float(ip.rescale_factor)
        return cls(
            shortest_edge=int(shortest) if shortest else None,
            resize_to=resize_to,
            crop=crop,
            resample=resample,
            scale=(factor / std).astype(np.float32),
            offset=(-mean / std).astype(np.float32),
        )

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        if self.resize_to is not None:
            return self.resize_to
        assert self.shortest_edge is not None
        # The same rounding as transformers' get_resize_output_image_size (int(), not round()).
        if width <= height:
            return self.shortest_edge, int(self.shortest_edge * height / width)
        return int(self.shortest_edge * width / height), self.shortest_edge

    def __call__(self, image: Image.Image) -> np.ndarray:
        """(3, H, W) float32 pixels, ready for the model, from an RGB image."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        target = self.resized_size(*image.size)
        if self.crop is not None and max(target) > EXTREME_ASPECT * max(self.crop):
            return self._normalise(np.asarray(self._resize_crop_window(image, target)))
        if image.size != target:
            image = image.resize(target, resample=self.resample)
        arr = np.asarray(image)  # (H, W, 3) uint8
        if self.crop is not None:
            cw, ch = self.crop
            h, w = arr.shape[:2]
            top, left = (h - ch) // 2, (w - cw) // 2
            arr = arr[top : top + ch, left : left + cw]
        return self._normalise(arr)

    def _resize_crop_window(self, image: Image.Image, target: tuple[int, int]) -> Image.Image:
        # A 1x20000 sliver resized by its short side would be 224 x 4,480,000 pixels (3 GB)
        # only to keep its centre: resample just the source window that lands in the crop.
        assert self.crop is not None
        cw, ch = self.crop
        tw, th = target
        left, top = (tw - cw) // 2, (th - ch) // 2
        sx, sy = image.width / tw, image.height / th
        box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
        return image.resize((cw, ch), resample=self.resample, box=box)

    def _normalise(self, arr: np.ndarray) -> np.ndarray:
        # Channels first while still uint8, then scale whole planes: broadcasting over a last
        # axis of length 3 is more than twice as slow.
        out = np.ascontiguousarray(arr.transpose(2, 0, 1)).astype(np.float32)  # (3, H, W)
        out *= self.scale[:, None, None]
        out += self.offset[:, None, None]
        return out
