"""When a picture was taken, and the filters a search can apply to what the store records.

A photo's date is its EXIF DateTimeOriginal (else DateTimeDigitized, else DateTime), and a
file without one is dated by its mtime. EXIF dates carry no time zone, so every date here is
wall-clock time written as seconds since 1970 as if it were UTC: the mtime is converted to
local wall-clock time the same way, and a filter's dates are compared in that same frame.
"""

from __future__ import annotations

import calendar
import datetime as dt
import time
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, Field, model_validator

TakenFrom = Literal["exif", "mtime"]

_EXIF_IFD = 0x8769
_DATE_TAGS = (0x9003, 0x9004)  # DateTimeOriginal, DateTimeDigitized (in the Exif IFD)
_DATETIME = 0x0132  # DateTime (in IFD0): when the file was last changed by software
_EARLIEST = calendar.timegm((1826, 1, 1, 0, 0, 0))  # the oldest surviving photograph


def _parse_exif_date(value: object) -> int | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    text = value.strip().rstrip("\x00").strip()
    try:
        # "YYYY:MM:DD HH:MM:SS"; unknown parts are spaces or zeros ("0000:00:00 00:00:00").
        parsed = dt.datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    seconds = calendar.timegm(parsed.timetuple())
    return seconds if seconds >= _EARLIEST else None


def exif_taken(image: Image.Image) -> int | None:
    """The EXIF capture date of an opened (not necessarily decoded) image, or None."""
    try:
        exif = image.getexif()
        sub = exif.get_ifd(_EXIF_IFD)
        for tag in _DATE_TAGS:
            if (seconds := _parse_exif_date(sub.get(tag))) is not None:
                return seconds
        return _parse_exif_date(exif.get(_DATETIME))
    except Exception:  # a malformed EXIF block leaves the file dated by its mtime, nothing worse
        return None


def mtime_wall_clock(mtime_ns: int) -> int:
    """An mtime as local wall-clock seconds, in the same frame as EXIF dates."""
    local = time.localtime(mtime_ns // 1_000_000_000)
    return calendar.timegm(local)


def day_start(day: dt.date) -> int:
    return calendar.timegm((day.year, day.month, day.day, 0, 0, 0))


def show_day(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


Day = Annotated[dt.date | None, Field(description="A calendar date, YYYY-MM-DD (inclusive)")]
Count = Annotated[int | None, Field(ge=0, le=10**12)]


class Filters(BaseModel):
    """What a search keeps, besides its folder: capture date, pixel size and file size."""

    taken_after: Day = None
    taken_before: Day = None
    min_width: Annotated[Count, Field(description="Pixels, after EXIF rotation")] = None
    min_height: Annotated[Count, Field(description="Pixels, after EXIF rotation")] = None
    min_bytes: Annotated[Count, Field(description="File size in bytes")] = None
    max_bytes: Annotated[Count, Field(description="File size in bytes")] = None

    @model_validator(mode="after")
    def _ranges(self) -> Filters:
        if self.taken_after and self.taken_before and self.taken_after > self.taken_before:
            raise ValueError(
                f"taken_after {self.taken_after.isoformat()} is later than taken_before "
                f"{self.taken_before.isoformat()}: no date can be in that range"
            )
        if self.min_bytes is not None and self.max_bytes is not None and self.min_bytes > self.max_bytes:
            raise ValueError(f"min_bytes {self.min_bytes} is more than max_bytes {self.max_bytes}")
        return self

    def bounds(self) -> dict[str, tuple[int | None, int | None]]:
        """Per metadata field: (lowest, highest) allowed, inclusive; None = open."""
        after = day_start(self.taken_after) if self.taken_after else None
        before = day_start(self.taken_before) + 86_399 if self.taken_before else None
        found = {
            "taken": (after, before),
            "width": (self.min_width, None),
            "height": (self.min_height, None),
            "size": (self.min_bytes, self.max_bytes),
        }
        return {k: v for k, v in found.items() if v != (None, None)}

    def active(self) -> bool:
        return bool(self.bounds())

    def where(self) -> dict[str, Any] | None:
        """The same test as a Chroma metadata filter."""
        clauses: list[dict[str, Any]] = []
        for field, (lo, hi) in self.bounds().items():
            if lo is not None:
                clauses.append({field: {"$gte": lo}})
            if hi is not None:
                clauses.append({field: {"$lte": hi}})
        if not clauses:
            return None
        return clauses[0] if len(clauses) == 1 else {"$and": clauses}

    def matches(self, record: object) -> bool:
        """Whether a record (with attributes named as the metadata fields: taken, width,
        height, size) passes; one without a field fails a bound on it, as it does in Chroma."""
        for field, (lo, hi) in self.bounds().items():
            value = getattr(record, field, None)
            if value is None or (lo is not None and value < lo) or (hi is not None and value > hi):
                return False
        return True

    def describe(self) -> str:
        parts = []
        if self.taken_after:
            parts.append(f"taken on or after {self.taken_after.isoformat()}")
        if self.taken_before:
            parts.append(f"taken on or before {self.taken_before.isoformat()}")
        if self.min_width:
            parts.append(f"at least {self.min_width} px wide")
        if self.min_height:
            parts.append(f"at least {self.min_height} px high")
        if self.min_bytes is not None:
            parts.append(f"at least {self.min_bytes} bytes")
        if self.max_bytes is not None:
            parts.append(f"at most {self.max_bytes} bytes")
        return ", ".join(parts)
