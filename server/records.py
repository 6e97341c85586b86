"""What one image's record in the store holds, and how paths become ids and folder filters.

Each image is one record whose id is a hash of its absolute path, whose document is that
path (so folder filters are a prefix regex on it), and whose metadata holds the size,
mtime, content hash, pixel size and capture date.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .filters import TakenFrom, mtime_wall_clock

# Rust's regex crate (Chroma's $regex) treats these as meta characters.
_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


@dataclass(frozen=True)
class StoredImage:
    path: str
    size: int
    mtime_ns: int
    content_hash: str
    width: int
    height: int
    taken: int | None = None  # capture date (filters.py); None: not recorded, or to be dated by mtime
    taken_from: TakenFrom | None = None


@dataclass(frozen=True)
class ImageRecord:
    image: StoredImage
    embedding: np.ndarray  # (D,) float32, unit length


def path_id(path: str) -> str:
    return hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def prefix_regex(folder: Path) -> str:
    """A regex matching every path strictly under `folder`, component-wise."""
    text = str(folder)
    if not text.endswith(os.sep):
        text += os.sep
    return "^" + "".join("\\" + ch if ch in _REGEX_META else ch for ch in text)


def to_stored(doc: str, meta: dict[str, Any]) -> StoredImage:
    return StoredImage(
        path=doc,
        size=int(meta["size"]),
        # Chroma keeps ints as i64: mtime_ns fits.
        mtime_ns=int(meta["mtime_ns"]),
        content_hash=str(meta["content_hash"]),
        width=int(meta["width"]),
        height=int(meta["height"]),
        # Records written before dates were kept have neither: index_folder adds them.
        taken=int(meta["taken"]) if "taken" in meta else None,
        taken_from="exif" if meta.get("taken_from") == "exif" else "mtime" if "taken" in meta else None,
    )


def metadata(image: StoredImage) -> dict[str, Any]:
    dated = image.taken is not None and image.taken_from == "exif"
    return {
        "size": image.size,
        "mtime_ns": image.mtime_ns,
        "content_hash": image.content_hash,
        "width": image.width,
        "height": image.height,
        "taken": image.taken if dated else mtime_wall_clock(image.mtime_ns),
        "taken_from": "exif" if dated else "mtime",
    }
