"""Capture dates (EXIF, else mtime) recorded at index time, and the store's filters on them."""

from __future__ import annotations

import calendar
import datetime as dt
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from cliplens.server.encoder import load_encoder
from cliplens.server.filters import Filters, exif_taken, mtime_wall_clock
from cliplens.server.paths import PathPolicy
from cliplens.server.store import ImageStore, open_client
from cliplens.tools.index_folder import IndexFolderInput, index_folder

from .conftest import make_image

EXIF_IFD, DATE_TIME_ORIGINAL = 0x8769, 0x9003


def _jpeg_with_date(path: Path, when: str, colour: tuple[int, int, int] = (200, 40, 40)) -> Path:
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[DATE_TIME_ORIGINAL] = when
    Image.new("RGB", (64, 48), colour).save(path, exif=exif)
    return path


def _utc(y: int, m: int, d: int, hh: int = 0, mm: int = 0, ss: int = 0) -> int:
    return calendar.timegm((y, m, d, hh, mm, ss))


def test_exif_dates_parse_and_bad_ones_are_ignored(tmp_path: Path) -> None:
    with Image.open(_jpeg_with_date(tmp_path / "a.jpg", "2019:05:04 10:00:00")) as img:
        assert exif_taken(img) == _utc(2019, 5, 4, 10)
    for bad in ("0000:00:00 00:00:00", "    :  :     :  :  ", "2019-05-04", "1700:01:01 00:00:00"):
        with Image.open(_jpeg_with_date(tmp_path / "b.jpg", bad)) as img:
            assert exif_taken(img) is None, bad
    with Image.open(make_image(tmp_path / "c.png")) as img:
        assert exif_taken(img) is None


def test_filters_validate_ranges_and_name_the_values() -> None:
    with pytest.raises(ValidationError, match=r"2024-05-02.*2024-05-01"):
        Filters(taken_after=dt.date(2024, 5, 2), taken_before=dt.date(2024, 5, 1))
    with pytest.raises(ValidationError, match="min_bytes 10 is more than max_bytes 5"):
        Filters(min_bytes=10, max_bytes=5)
    with pytest.raises(ValidationError):
        Filters(min_width=-1)
    both = Filters(taken_after=dt.date(2024, 5, 1), taken_before=dt.date(2024, 5, 1), min_width=10)
    assert both.where() == {
        "$and": [
            {"taken": {"$gte": _utc(2024, 5, 1)}},
            {"taken": {"$lte": _utc(2024, 5, 1, 23, 59, 59)}},
            {"width": {"$gte": 10}},
        ]
    }
    assert not Filters().active() and Filters().where() is None


def test_index_records_capture_dates_and_the_store_filters_on_them(tmp_path: Path, tiny_clip: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    _jpeg_with_date(root / "exif_2019.jpg", "2019:05:04 10:00:00")
    old = make_image(root / "mtime_2021.png", "green", size=(200, 150))
    new = make_image(root / "mtime_now.png", "blue")
    stamp = _utc(2021, 7, 1, 12) + time.timezone  # roughly local noon: the day survives any zone
    os.utime(old, (stamp, stamp))
    encoder = load_encoder(str(tiny_clip), "cpu", "fp32")
    store = ImageStore(open_client(tmp_path / "db", None), encoder.info, location="test")
    policy = PathPolicy([root])
    index_folder(encoder, store, policy, IndexFolderInput(path=str(root)))

    entries = store.entries_under(root)
    exif = entries[str(root / "exif_2019.jpg")]
    assert (exif.taken, exif.taken_from) == (_utc(2019, 5, 4, 10), "exif")
    dated = entries[str(old)]
    assert dated.taken_from == "mtime" and dated.taken == mtime_wall_clock(old.stat().st_mtime_ns)
    assert dt.datetime.fromtimestamp(dated.taken, dt.UTC).date() == dt.date(2021, 7, 1)

    def found(filters: Filters) -> set[str]:
        query = np.ones(encoder.info.dim, np.float32) / np.sqrt(encoder.info.dim)
        return {Path(s.path).name for s, _ in store.query(query, 10, [root], filters)}

    assert found(Filters(taken_before=dt.date(2020, 1, 1))) == {"exif_2019.jpg"}
    assert found(Filters(taken_after=dt.date(2021, 7, 1), taken_before=dt.date(2021, 7, 1))) == {"mtime_2021.png"}
    assert found(Filters(taken_after=dt.date(2022, 1, 1))) == {new.name}
    assert found(Filters(min_width=100)) == {"mtime_2021.png"}
    size = (root / "exif_2019.jpg").stat().st_size
    assert found(Filters(min_bytes=size, max_bytes=size)) == {"exif_2019.jpg"}
    assert found(Filters()) == {"exif_2019.jpg", "mtime_2021.png", new.name}


def test_records_from_before_dates_were_kept_get_them_at_the_next_index(tmp_path: Path, tiny_clip: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    path = _jpeg_with_date(root / "exif.jpg", "2018:01:02 03:04:05")
    encoder = load_encoder(str(tiny_clip), "cpu", "fp32")
    store = ImageStore(open_client(tmp_path / "db", None), encoder.info, location="test")
    policy = PathPolicy([root])
    index_folder(encoder, store, policy, IndexFolderInput(path=str(root)))
    # What an older cliplens wrote: no date fields (None deletes a key in a Chroma update).
    collection = store.require_writable()
    ids = collection.get()["ids"]
    collection.update(ids=ids, metadatas=[{"taken": None, "taken_from": None}])
    legacy = store.entries_under(root)[str(path)]
    assert (legacy.taken, legacy.taken_from) == (None, None)
    assert store.query(np.ones(encoder.info.dim, np.float32), 5, [root], Filters(taken_after=dt.date(2000, 1, 1))) == []

    again = index_folder(encoder, store, policy, IndexFolderInput(path=str(root)))
    assert again.unchanged == 1 and again.added == again.updated == 0  # dated without re-embedding
    dated = store.entries_under(root)[str(path)]
    assert (dated.taken, dated.taken_from) == (_utc(2018, 1, 2, 3, 4, 5), "exif")
    assert [
        s.path
        for s, _ in store.query(
            np.ones(encoder.info.dim, np.float32), 5, [root], Filters(taken_after=dt.date(2018, 1, 2))
        )
    ] == [str(path)]
