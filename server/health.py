"""Is the vector index whole? Checks run when a store opens, before anything searches it.

What Chroma 1.5.9 does with a damaged embedded store (observed; see tests/test_crash.py):

* Records (ids, documents, metadata) live in chroma.sqlite3; every write first goes to its
  `embeddings_queue` (the log). The HNSW index lives in `<db>/<vector segment id>/`:
  header.bin, data_level0.bin, length.bin, link_lists.bin and index_metadata.pickle (the
  id <-> label map). It is written in place, without fsync, every `sync_threshold` records;
  SQLite's `max_seq_id` then says how far the files go and the log is purged up to there.
  On open, Chroma loads the files and replays the log past that point.
* A missing or torn header, data or link file, or a torn pickle, fails every call,
  count and get included, with "Error loading hnsw index" or a pickle error: loud, and
  the store is unusable. The pickle is rewritten in place at each save, so SIGKILL during
  one can leave it empty: about 1 in 6 kills timed to a save did, in our runs.
* Silent, though: a zeroed or short data_level0.bin (queries answer with wrong neighbours,
  count still right), a zeroed length.bin (get returns wrong embeddings), a deleted pickle
  or segment folder, or files older than SQLite says (queries see only the log's tail).
* Fatal: a short header.bin or a zeroed link_lists.bin crashes the process (SIGSEGV) at
  the first query. So the files are checked here, in Python, before Chroma loads them.

Below `sync_threshold` records the files hold nothing Chroma relies on: the whole index is
replayed from the log, and damage to the files is harmless.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import sqlite3
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SQLITE_FILE = "chroma.sqlite3"
VECTOR_SEGMENT = "urn:chroma:segment/vector/hnsw-local-persisted"
METADATA_SEGMENT = "urn:chroma:segment/metadata/sqlite"
DOCUMENT_KEY = "chroma:document"
# hnswlib's persisted header (chroma-core/hnswlib persistHeader): version, offsetLevel0,
# max_elements, cur_element_count, size_data_per_element, label_offset, offsetData,
# maxlevel, enterpoint_node, maxM, maxM0, M, mult, ef_construction.
HEADER = struct.Struct("<iQQQQQQiIQQQdQ")
PERSISTENCE_VERSION = 1
DELETED_FLAG = 0x01  # byte 2 of an element's level-0 link header
# Chroma's Operation values in the log.
OP_ADD, OP_UPDATE, OP_UPSERT, OP_DELETE = 0, 1, 2, 3
UNIT_TOLERANCE = 1e-3  # stored vectors are unit length; float32 round-off is far smaller
CHUNK = 16_384  # elements per numpy pass over data_level0.bin, to bound memory
SAMPLE = 8  # records checked to be their own nearest neighbour
MAX_LISTED = 3  # example ids in a problem's text


@dataclass
class DiskReport:
    """What the files say. `records` are the ids Chroma serves once it has replayed its log."""

    problems: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)


class _DataOnly(pickle.Unpickler):
    """index_metadata.pickle holds dicts, strings and ints: anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _connect(db_dir: Path) -> contextlib.closing[sqlite3.Connection]:
    # Read-only: a check must never change the store, and Chroma may hold it open.
    uri = (db_dir / SQLITE_FILE).absolute().as_uri() + "?mode=ro"
    return contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10))


def _segments(db: sqlite3.Connection, collection_id: str) -> dict[str, str]:
    rows = db.execute("SELECT type, id FROM segments WHERE collection = ?", (collection_id,)).fetchall()
    return {kind: seg for kind, seg in rows}


def _seq(db: sqlite3.Connection, segment: str) -> int:
    row = db.execute("SELECT seq_id FROM max_seq_id WHERE segment_id = ?", (segment,)).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _log_after(db: sqlite3.Connection, collection_id: str, seq: int) -> list[tuple[int, str, str | None]]:
    """(operation, id, metadata JSON) of the log entries past `seq`, oldest first."""
    rows = db.execute(
        "SELECT operation, id, metadata FROM embeddings_queue WHERE topic LIKE ? AND seq_id > ? ORDER BY seq_id",
        ("%/" + collection_id, seq),
    ).fetchall()
    return [(int(op), str(rid), meta) for op, rid, meta in rows]


def _replay(ids: set[str], entries: Iterable[tuple[int, str, str | None]]) -> set[str]:
    for op, rid, _ in entries:
        if op in (OP_ADD, OP_UPSERT):
            ids.add(rid)
        elif op == OP_DELETE:
            ids.discard(rid)
    return ids


def recorded_paths(db_dir: Path, collection_id: str) -> list[str]:
    """Every image path the collection records, read from SQLite (which survives a broken
    vector index, while Chroma then refuses even `get`), the log's unapplied tail included."""
    with _connect(db_dir) as db:
        meta = _segments(db, collection_id).get(METADATA_SEGMENT)
        if meta is None:
            return []
        rows = db.execute(
            "SELECT e.embedding_id, m.string_value FROM embeddings e JOIN embedding_metadata m "
            "ON m.id = e.id AND m.key = ? WHERE e.segment_id = ?",
            (DOCUMENT_KEY, meta),
        ).fetchall()
        paths: dict[str, str] = {rid: doc for rid, doc in rows if doc}
        for op, rid, metadata in _log_after(db, collection_id, _seq(db, meta)):
            if op == OP_DELETE:
                paths.pop(rid, None)
                continue
            doc = json.loads(metadata).get(DOCUMENT_KEY) if metadata else None
            if doc and (op != OP_UPDATE or rid in paths):
                paths[rid] = doc
    return sorted(set(paths.values()))


def segment_dir(db_dir: Path, collection_id: str) -> Path | None:
    """The vector index's folder of this collection, from SQLite."""
    with _connect(db_dir) as db:
        seg = _segments(db, collection_id).get(VECTOR_SEGMENT)
    return None if seg is None else db_dir / seg


def inspect_files(db_dir: Path, collection_id: str, dim: int) -> DiskReport | None:
    """Check the persisted HNSW index against SQLite; None when this layout is not Chroma
    1.5's (then only the query check runs)."""
    report = DiskReport()
    try:
        with _connect(db_dir) as db:
            segs = _segments(db, collection_id)
            vec, meta = segs.get(VECTOR_SEGMENT), segs.get(METADATA_SEGMENT)
            if vec is None or meta is None:
                return None
            records = {
                str(r) for (r,) in db.execute("SELECT embedding_id FROM embeddings WHERE segment_id = ?", (meta,))
            }
            records = _replay(records, _log_after(db, collection_id, _seq(db, meta)))
            vec_seq = _seq(db, vec)
            tail = _log_after(db, collection_id, vec_seq)
    except sqlite3.Error as exc:
        log.info("cannot read Chroma's SQLite tables (%s): checking the index by queries only", exc)
        return None
    report.records = sorted(records)
    folder = db_dir / vec
    pickled = folder / "index_metadata.pickle"
    if not pickled.is_file():
        # Chroma then starts from an empty index and replays the log: right only while
        # nothing was persisted (vec_seq 0) and the log still holds every write.
        indexed: set[str] = set()
        if vec_seq > 0:
            report.problems.append(
                f"{pickled.name} is missing, but SQLite says the index was saved up to write {vec_seq}"
            )
    else:
        try:
            indexed = _check_hnsw(folder, pickled, dim, report.problems)
        except (OSError, ValueError, struct.error) as exc:
            report.problems.append(f"unreadable index files: {type(exc).__name__}: {exc}")
            indexed = set()
    if not report.problems:
        served = _replay(indexed, tail)
        missing, extra = records - served, served - records
        if missing or extra:
            report.problems.append(
                f"the vector index holds {len(served)} vectors for {len(records)} records "
                f"({len(missing)} records without a vector, e.g. {sorted(missing)[:MAX_LISTED]}; "
                f"{len(extra)} vectors without a record)"
            )
    return report


def _check_hnsw(folder: Path, pickled: Path, dim: int, problems: list[str]) -> set[str]:
    """Problems of the persisted index files; the ids the files hold."""
    with pickled.open("rb") as f:
        try:
            id_map = _DataOnly(f).load()
        except Exception as exc:  # garbage makes pickle raise nearly anything: all of it means a torn file
            problems.append(f"{pickled.name} is unreadable: {type(exc).__name__}: {exc}")
            return set()
        if f.read(1):  # Chroma's reader refuses trailing bytes too
            problems.append(f"{pickled.name} has bytes after its end")
            return set()
    if not isinstance(id_map, dict) or not isinstance(id_map.get("id_to_label"), dict):
        problems.append(f"{pickled.name} does not hold Chroma's id map")
        return set()
    id_to_label: dict[str, int] = id_map["id_to_label"]
    label_to_id: dict[int, str] = id_map.get("label_to_id") or {}
    if id_map.get("dimensionality") not in (None, dim):
        problems.append(f"{pickled.name} is for {id_map.get('dimensionality')}-d vectors, not {dim}-d")
    if len(label_to_id) != len(id_to_label) or any(label_to_id.get(lb) != i for i, lb in id_to_label.items()):
        problems.append(f"{pickled.name}: its two id maps disagree")
        return set()
    raw = (folder / "header.bin").read_bytes()
    if len(raw) < HEADER.size:
        problems.append(f"header.bin is {len(raw)} bytes, not {HEADER.size}")
        return set()
    (version, off0, max_el, count, size_el, label_off, data_off, max_level, entry, max_m, max_m0, _m, _mult, _ef) = (
        HEADER.unpack_from(raw)
    )
    links0 = max_m0 * 4 + 4
    if (
        version != PERSISTENCE_VERSION
        or off0 != 0
        or count > max_el
        or data_off != links0
        or label_off != data_off + 4 * dim
        or size_el != label_off + 8
        or max_level < -1
        or (count > 0 and (max_level < 0 or entry >= count))
    ):
        problems.append(f"header.bin is inconsistent (version {version}, {count} elements, max level {max_level})")
        return set()
    data, lengths, link_lists = folder / "data_level0.bin", folder / "length.bin", folder / "link_lists.bin"
    for path, need in ((data, count * size_el), (lengths, count * 4)):
        size = path.stat().st_size
        if size < need:
            problems.append(f"{path.name} is {size} bytes; {count} elements need {need}")
    if problems:
        return set()
    levels = _link_levels(link_lists.read_bytes(), count, max_m * 4 + 4, problems)
    if problems:
        return set()
    if count and (levels[entry] != max_level or max(levels) > max_level):
        problems.append(f"link_lists.bin gives the entry point level {levels[entry]}, the header {max_level}")
        return set()
    live_labels = _check_elements(data, lengths, count, size_el, data_off, label_off, max_m0, problems)
    if problems:
        return set()
    mapped = np.array(sorted(label_to_id), np.uint64)
    found = np.sort(live_labels)
    if len(found) != len(mapped) or (found != mapped).any():
        stray = np.setdiff1d(found, mapped)[:MAX_LISTED].tolist()
        problems.append(
            f"data_level0.bin holds {len(found)} live vectors, the id map {len(mapped)} (stray labels {stray})"
        )
        return set()
    return set(id_to_label)


def _link_levels(raw: bytes, count: int, per_level: int, problems: list[str]) -> list[int]:
    """Each element's top level, from link_lists.bin: a u32 byte count and that many bytes."""
    levels = [0] * count
    pos, end = 0, len(raw)
    for i in range(count):
        if pos + 4 > end:
            problems.append(f"link_lists.bin ends after {i} of {count} elements")
            return levels
        (size,) = struct.unpack_from("<I", raw, pos)
        if size % per_level:
            problems.append(f"link_lists.bin: element {i} has {size} link bytes, not a multiple of {per_level}")
            return levels
        levels[i] = size // per_level
        pos += 4 + size
    if pos > end:
        problems.append(f"link_lists.bin is {end} bytes, its entries need {pos}")
    return levels


def _check_elements(
    data: Path,
    lengths: Path,
    count: int,
    size_el: int,
    data_off: int,
    label_off: int,
    max_m0: int,
    problems: list[str],
) -> np.ndarray:
    """The labels of the live elements; problems with their vectors, lengths or links.
    Strided views of the mapped file: every page is read once, nothing is copied whole."""
    if count == 0:
        return np.zeros(0, np.uint64)
    raw = np.memmap(data, dtype=np.uint8, mode="r", shape=(count * size_el,))
    flags = np.ndarray((count,), np.uint8, buffer=raw, offset=2, strides=(size_el,))
    n_links = np.ndarray((count,), "<u2", buffer=raw, offset=0, strides=(size_el,))
    links = np.ndarray((count, max_m0), "<u4", buffer=raw, offset=4, strides=(size_el, 4))
    dim = (label_off - data_off) // 4
    vectors = np.ndarray((count, dim), "<f4", buffer=raw, offset=data_off, strides=(size_el, 4))
    labels = np.ndarray((count,), "<u8", buffer=raw, offset=label_off, strides=(size_el,))
    stored = np.memmap(lengths, dtype="<f4", mode="r", shape=(count,))
    live = (flags & DELETED_FLAG) == 0
    if (n_links > max_m0).any():
        problems.append(f"data_level0.bin: elements hold more links than allowed ({max_m0})")
        return np.zeros(0, np.uint64)
    bad_links = bad_units = 0
    for start in range(0, count, CHUNK):
        stop = min(count, start + CHUNK)
        slot = np.arange(max_m0)[None, :] < n_links[start:stop, None]
        bad_links += int((links[start:stop][slot] >= count).sum())
        block = vectors[start:stop][live[start:stop]]
        bad_units += int((np.abs(np.einsum("ij,ij->i", block, block) - 1.0) > 2 * UNIT_TOLERANCE).sum())
    if bad_links:
        problems.append(f"data_level0.bin: {bad_links} links lead to elements that do not exist")
    if bad_units:
        problems.append(f"data_level0.bin: {bad_units} of {count} vectors are not unit length")
    kept = np.asarray(stored)[live]
    bad_len = int((~np.isfinite(kept) | (np.abs(kept - 1.0) > 10 * UNIT_TOLERANCE)).sum())
    if bad_len:
        problems.append(f"length.bin: {bad_len} of {count} lengths are wrong")
    return np.zeros(0, np.uint64) if problems else np.asarray(labels[live])


def check_queries(collection: Any, ids: list[str] | None = None) -> str | None:
    """Ask Chroma itself: a few records, spread over the collection, must come back with a
    unit vector and be found as their own nearest neighbour. The problem, or None."""
    try:
        total = int(collection.count())
        if total == 0:
            return None
        k = min(SAMPLE, total)
        if ids:
            picked = [ids[i * len(ids) // k] for i in range(k)]
            got = collection.get(ids=picked, include=["embeddings"])
        else:
            got = {"ids": [], "embeddings": []}
            for i in range(k):
                one = collection.get(limit=1, offset=i * total // k, include=["embeddings"])
                got["ids"] += one["ids"]
                got["embeddings"] += list(one["embeddings"] if one["embeddings"] is not None else [])
        vectors = np.asarray(got["embeddings"], np.float32).reshape(len(got["ids"]), -1)
        if len(got["ids"]) < k:
            return f"only {len(got['ids'])} of {k} sampled records came back from the vector index"
        norms = np.linalg.norm(vectors, axis=1)
        if not np.isfinite(vectors).all() or (np.abs(norms - 1.0) > 10 * UNIT_TOLERANCE).any():
            return "the vector index returns embeddings that are not unit length"
        found = collection.query(query_embeddings=vectors, n_results=min(total, 10), include=["distances"])
    except Exception as exc:  # chromadb raises InternalError and friends: any of them means damage here
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    for rid, hits, dists in zip(got["ids"], found["ids"], found["distances"], strict=True):
        # Copies of one image share a vector: any hit at distance ~0 may come first.
        same = {h for h, d in zip(hits, dists, strict=True) if d <= UNIT_TOLERANCE}
        if rid not in same and len(same) < len(hits):
            return f"record {rid} is not its own nearest neighbour in the vector index"
    return None


def check(collection: Any, *, db_dir: Path | None, dim: int, retries: int = 0, where: str = "") -> str | None:
    """What is wrong with the collection's vector index, or None; logged to stderr.
    `retries`: a process that does not own the store may catch the writer halfway through
    saving the index, so it looks again before calling that damage."""
    report = None
    if db_dir is not None:
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(0.3)
            report = inspect_files(db_dir, str(collection.id), dim)
            if report is None or not report.problems:
                break
        if report is not None and report.problems:
            problem = "; ".join(report.problems)
            log.error("the vector index of %s in %s is damaged: %s", collection.name, where, problem)
            return problem
    problem = check_queries(collection, report.records if report else None)
    if problem is None:
        return None
    if db_dir is None:
        # A Chroma server's index is its own, and may lag its log for a moment: say so, no more.
        log.warning("the Chroma server at %s failed a vector index check: %s", where, problem)
        return None
    log.error("the vector index of %s in %s is damaged: %s", collection.name, where, problem)
    return problem
