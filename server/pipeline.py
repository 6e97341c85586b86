"""The indexing pipeline: read, decode and prepare images in worker threads while the model
runs on the previous batch and the store writes the one before that.

    paths ─▶ [workers] read + hash ─▶ reuse by content hash? ─▶ [workers] decode (JPEG draft)
          ─▶ resize/crop/normalise ─▶ [caller] model, one batch ─▶ [writer] Chroma upsert

Pillow, hashlib and NumPy release the GIL for the heavy parts, so worker threads use real
cores. At most `prefetch` batches wait for the model, one is written while one more waits,
so memory stays bounded however large the folder, and a crash loses at most the three
batches in flight (the model's and the writer's two). A file whose bytes are already stored
under another path (moved or copied) gets that embedding instead of a pass through the model.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .encoder import ClipEncoder
from .images import ImageRejected, RawImageFile, decode_image, read_image_file
from .store import ImageRecord, ImageStore, StoredImage

PREFETCH_BATCHES = 2


@dataclass
class Prepared:
    """One file, ready for the model (`pixels` or `image`), already embedded (`reused`), or skipped."""

    path: Path
    stored: StoredImage | None = None
    pixels: np.ndarray | None = None  # (3, H, W) from the encoder's fast preprocessing
    image: Image.Image | None = None  # for models that need their own processor
    reused: np.ndarray | None = None  # the stored embedding of a file with the same bytes
    skip: tuple[str, str] | None = None  # (reason, detail)


@dataclass
class BatchDone:
    """What one batch did: the records written and the files skipped."""

    written: list[StoredImage] = field(default_factory=list)
    reused: int = 0
    skipped: list[tuple[Path, str, str]] = field(default_factory=list)
    attempted: int = 0


def default_workers(device_type: str) -> int:
    # On a GPU the model is rarely the bottleneck: decode with every core. On a CPU the model
    # shares the cores, and more threads than cores only add switching.
    cores = os.cpu_count() or 2
    return max(2, cores if device_type == "cuda" else min(cores, 8))


def _read(path: Path, roots: Sequence[Path] | None) -> RawImageFile | Prepared:
    try:
        return read_image_file(path, roots)
    except ImageRejected as exc:
        return Prepared(path, skip=(exc.reason, exc.detail))


def _decode(raw: RawImageFile, encoder: ClipEncoder, gate: CpuGate) -> Prepared:
    with gate.decoding():
        return _decode_now(raw, encoder)


def _decode_now(raw: RawImageFile, encoder: ClipEncoder) -> Prepared:
    path = raw.path
    try:
        loaded = decode_image(raw, draft=encoder.draft_size)
        st = path.stat()
    except ImageRejected as exc:
        return Prepared(path, skip=(exc.reason, exc.detail))
    except OSError as exc:
        return Prepared(path, skip=("unreadable", exc.strerror or type(exc).__name__))
    if (st.st_size, st.st_mtime_ns) != (raw.size_bytes, raw.mtime_ns):
        # Rewritten while we read it: the next run sees the settled file.
        return Prepared(path, skip=("changed_during_indexing", ""))
    stored = StoredImage(
        str(path),
        raw.size_bytes,
        raw.mtime_ns,
        raw.content_hash,
        loaded.width,
        loaded.height,
        loaded.taken,
        "exif" if loaded.taken is not None else "mtime",
    )
    if encoder.fast is not None:
        return Prepared(path, stored, pixels=encoder.preprocess(loaded.image))
    return Prepared(path, stored, image=loaded.image)


class CpuGate:
    """Lets decoding and the model take turns on the CPU instead of fighting over it.

    On a CPU-only machine the model already uses every core; a decode thread that takes one
    of them stalls all the model's threads at their next barrier, which costs more than it
    overlaps (measured: 0.55x of the encoder-only rate with free overlap on 2 cores). So the
    model runs exclusively, decoders run together in between, and a waiting model goes first.
    With a GPU the gate is open: decoding overlaps the GPU's work.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._cond = threading.Condition()
        self._decoders = 0
        self._model_running = False
        self._model_waiting = 0

    @contextmanager
    def decoding(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        with self._cond:
            while self._model_running or self._model_waiting:
                self._cond.wait()
            self._decoders += 1
        try:
            yield
        finally:
            with self._cond:
                self._decoders -= 1
                self._cond.notify_all()

    @contextmanager
    def model(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        with self._cond:
            self._model_waiting += 1
            while self._decoders or self._model_running:
                self._cond.wait()
            self._model_waiting -= 1
            self._model_running = True
        try:
            yield
        finally:
            with self._cond:
                self._model_running = False
                self._cond.notify_all()


class IndexPipeline:
    """Embeds files into `store`, overlapping I/O, decoding, the model and the writes."""

    def __init__(
        self,
        encoder: ClipEncoder,
        store: ImageStore,
        *,
        workers: int | None = None,
        batch_size: int | None = None,
        prefetch: int = PREFETCH_BATCHES,
        roots: Sequence[Path] | None = None,
    ) -> None:
        if workers is not None and not 1 <= workers <= 256:
            raise ValueError(f"workers must be 1 to 256, not {workers}")
        if batch_size is not None and not 1 <= batch_size <= 4096:
            raise ValueError(f"batch_size must be 1 to 4096, not {batch_size}")
        self.encoder = encoder
        self.store = store
        self.roots = roots  # the allowed folders: files are opened beneath them, never through a link
        self.workers = workers or default_workers(encoder.device.type)
        self.batch_size = batch_size or encoder.batch_size
        self.prefetch = max(1, prefetch)
        self.gate = CpuGate(enabled=encoder.device.type == "cpu")

    def describe(self) -> str:
        decode = "JPEG draft decoding" if self.encoder.draft_size else "full decoding"
        turns = ", taking turns with the model" if self.gate.enabled else ", overlapping the model"
        return (
            f"{self.workers} decode threads ({decode}{turns}), batches of {self.batch_size}, "
            f"{self.encoder.precision} on {self.encoder.device.type}"
        )

    def run(
        self,
        paths: Sequence[Path],
        *,
        on_batch: Callable[[BatchDone], None] | None = None,
        cancelled: Callable[[], None] | None = None,
    ) -> None:
        """Embed and store `paths`. `on_batch` runs in the calling thread after each batch is
        embedded; `cancelled` runs between batches and raises to stop. Whatever was embedded
        before the stop is still written; the error then propagates."""
        stop = threading.Event()
        ready: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        # One batch waiting while one is written: a crash loses at most those two and the one
        # in the model, all of which the next (incremental) run embeds again.
        writes: queue.Queue[Any] = queue.Queue(maxsize=1)
        write_error: list[BaseException] = []
        with ThreadPoolExecutor(self.workers, thread_name_prefix="cliplens-decode") as pool:
            feeder = threading.Thread(
                target=self._feed, args=(paths, pool, ready, stop), name="cliplens-feed", daemon=True
            )
            writer = threading.Thread(
                target=self._write, args=(writes, write_error), name="cliplens-write", daemon=True
            )
            feeder.start()
            writer.start()
            try:
                for items in self._batches(ready):
                    if cancelled:
                        cancelled()
                    if write_error:
                        raise write_error[0]
                    done, records = self._embed(items)
                    _put(writes, records, stop=None)
                    if on_batch:
                        on_batch(done)
            finally:
                stop.set()
                _put(writes, None, stop=None)  # the writer drains what it holds, then ends
                writer.join()
                feeder.join()
                for fut in _drain(ready):
                    fut.cancel()
            if write_error:
                raise write_error[0]

    # -- stages ----------------------------------------------------------------------------

    def _feed(
        self, paths: Sequence[Path], pool: ThreadPoolExecutor, ready: queue.Queue[Any], stop: threading.Event
    ) -> None:
        try:
            for start in range(0, len(paths), self.batch_size):
                if stop.is_set():
                    return
                batch = paths[start : start + self.batch_size]
                reads = [r.result() for r in [pool.submit(_read, p, self.roots) for p in batch]]
                raws = [r for r in reads if isinstance(r, RawImageFile)]
                known = self.store.embeddings_by_hash([r.content_hash for r in raws])
                items: list[Future[Prepared] | Prepared] = []
                for item in reads:
                    if isinstance(item, Prepared):
                        items.append(item)
                    elif item.content_hash in known:
                        items.append(_reuse(item, known[item.content_hash]))
                    else:
                        items.append(pool.submit(_decode, item, self.encoder, self.gate))
                _put(ready, items, stop=stop)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            _put(ready, exc, stop=stop)
        finally:
            _put(ready, None, stop=stop)

    @staticmethod
    def _batches(ready: queue.Queue[Any]) -> Iterator[list[Prepared]]:
        while True:
            got = ready.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield [f.result() if isinstance(f, Future) else f for f in got]

    def _embed(self, items: list[Prepared]) -> tuple[BatchDone, list[ImageRecord]]:
        done = BatchDone(attempted=len(items))
        records: list[ImageRecord] = []
        fresh = [p for p in items if p.stored is not None and p.reused is None]
        if fresh:
            with self.gate.model():
                if self.encoder.fast is not None:
                    vectors = self.encoder.embed_pixels(np.stack([p.pixels for p in fresh if p.pixels is not None]))
                else:
                    vectors = self.encoder.embed_images([p.image for p in fresh if p.image is not None])
            records += [ImageRecord(p.stored, v) for p, v in zip(fresh, vectors, strict=True) if p.stored]
        for p in items:
            if p.skip is not None:
                done.skipped.append((p.path, *p.skip))
            elif p.reused is not None and p.stored is not None:
                records.append(ImageRecord(p.stored, p.reused))
                done.reused += 1
        done.written = [r.image for r in records]
        return done, records

    def _write(self, writes: queue.Queue[Any], errors: list[BaseException]) -> None:
        while True:
            records = writes.get()
            if records is None:
                return
            if errors or not records:
                continue  # after a failure, keep draining so the producer never blocks
            try:
                with self.gate.decoding():  # CPU work like decoding: not while the model runs
                    self.store.upsert(records)
            except BaseException as exc:
                errors.append(exc)


def _reuse(raw: RawImageFile, hit: tuple[StoredImage, np.ndarray]) -> Prepared:
    # Same bytes, so the same pixels and the same embedding; only the path and mtime are new.
    source, vector = hit
    # The same bytes hold the same EXIF date; a date from the mtime is the new file's own.
    stored = replace(source, path=str(raw.path), size=raw.size_bytes, mtime_ns=raw.mtime_ns)
    if source.taken_from != "exif":
        stored = replace(stored, taken=None, taken_from="mtime")
    return Prepared(raw.path, stored, reused=vector)


def _put(q: queue.Queue[Any], item: Any, *, stop: threading.Event | None) -> None:
    """A put that gives up once `stop` is set, so no thread blocks on a consumer that left."""
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if stop is not None and stop.is_set():
                return


def _drain(q: queue.Queue[Any]) -> Iterator[Future[Prepared]]:
    while True:
        try:
            got = q.get_nowait()
        except queue.Empty:
            return
        if isinstance(got, list):
            yield from (f for f in got if isinstance(f, Future))
