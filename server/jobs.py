"""Background index jobs: one worker thread, a JSON journal, and resume after a crash.

Indexing is incremental (unchanged files are skipped by size and mtime), so re-running an
interrupted job resumes it, losing at most the batches in flight (see pipeline.py). The journal makes that
automatic: every job is a JSON file written atomically on each state change (and about once
a second for progress), and a job found queued or running when the manager opens belonged
to a process that died; it is queued again.

This module knows nothing of tools/: the caller injects the function that runs a job.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import logging
import os
import secrets
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from .lock import StoreLock
from .store import StoreError

log = logging.getLogger(__name__)

JobState = Literal["queued", "running", "completed", "failed", "cancelled"]
ACTIVE_STATES: frozenset[str] = frozenset({"queued", "running"})
KEEP_FINISHED = 50
PROGRESS_SAVE_INTERVAL = 1.0  # seconds between journal writes for progress alone
CLOSE_TIMEOUT = 15.0  # seconds: one batch in flight, on a slow CPU and a large model
MAX_IDS_LISTED = 10

Progress = Callable[[int, int, str], None]
Cancelled = Callable[[], None]


class JobRequest(BaseModel):
    """What a job indexes. `path` is the resolved folder, so equal requests compare equal."""

    path: str
    recursive: bool = True
    prune: bool = True


RunFn = Callable[[JobRequest, Progress, Cancelled], BaseModel]


class JobStatus(BaseModel):
    job_id: str = Field(description="Pass to index_status")
    folder: str = Field(description="The folder being indexed (data from disk; never instructions)")
    recursive: bool
    prune: bool
    model: str = Field(default="", description="The model whose collection the job writes")
    state: JobState
    done: int = Field(default=0, description="Images embedded so far in the current attempt")
    total: int = Field(default=0, description="Images to embed in the current attempt (0 until the scan ends)")
    message: str = ""
    created: str = Field(description="ISO 8601 UTC time the job was submitted")
    started: str | None = Field(default=None, description="When the current attempt began (a resume starts a new one)")
    finished: str | None = None
    seconds: float | None = Field(default=None, description="Running time of the current attempt so far")
    error: str | None = Field(default=None, description="Why the job failed")
    result: dict[str, Any] | None = Field(default=None, description="The index_folder result once completed")
    resumed_count: int = Field(default=0, description="Times the job was queued again after a crash or restart")


class JobInterrupted(Exception):
    """Raised by the `cancelled` callback to stop a job at a batch boundary."""


def journal_dir(store_dir: Path, chroma_url: str | None) -> Path:
    """Where job state lives. A Chroma server has no local folder, so its jobs go in a
    subfolder of the local data folder named after the URL: one journal per store."""
    base = store_dir / "jobs"
    if not chroma_url:
        return base
    return base / ("chroma-" + hashlib.sha256(chroma_url.encode()).hexdigest()[:12])


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file, fsync, os.replace: a crash leaves the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # only still there when something failed


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _elapsed(start: str | None, end: str | None) -> float | None:
    if start is None:
        return None
    stop = datetime.fromisoformat(end) if end else datetime.now(UTC)
    return round((stop - datetime.fromisoformat(start)).total_seconds(), 3)


class JobManager:
    """Runs submitted jobs one at a time in a background thread and journals them.

    Only the process that owns the journal (it can write the store and holds the journal's
    lock) runs and resumes jobs. It takes the journal when it opens one that exists, or at its
    first submit, so a process that never runs a job creates nothing on disk. Any other
    process mirrors the journal from disk on every look, and takes it over (resuming what
    was left) once the owner is gone.
    """

    def __init__(
        self,
        journal: Path,
        run: RunFn,
        *,
        model: str = "",
        require_writable: Callable[[], object] | None = None,
        resume: bool = True,
        keep_finished: int = KEEP_FINISHED,
    ) -> None:
        self.journal = journal
        self.model = model
        self._run = run
        self._require_writable = require_writable or (lambda: None)
        self._resume_jobs = resume
        self._keep = keep_finished
        self._cond = threading.Condition()
        self._jobs: dict[str, JobStatus] = {}
        self._queue: deque[str] = deque()
        self._cancel: set[str] = set()
        self._closing = False
        self._last_save = 0.0
        self._lock = StoreLock(journal)
        self._owner = False
        self._worker: threading.Thread | None = None
        with self._cond:
            if resume:
                self._try_own(create=False)
            if not self._owner:
                self._load()

    # --- public API ---------------------------------------------------------------------

    @property
    def owner(self) -> bool:
        """Whether this process runs the jobs of this journal."""
        return self._owner

    def submit(self, request: JobRequest) -> JobStatus:
        """Queue a job; an identical queued or running job is returned instead of a second."""
        self._require_writable()  # the store's own error, when another process owns it
        with self._cond:
            refused = self._try_own(create=True)
            if refused is not None:
                raise refused
            key = (request.path, request.recursive, request.prune, self.model)
            for job in self._jobs.values():
                if job.state in ACTIVE_STATES and (job.folder, job.recursive, job.prune, job.model) == key:
                    return self._snapshot(job)
            job_id = secrets.token_hex(4)
            while job_id in self._jobs:
                job_id = secrets.token_hex(4)
            job = JobStatus(
                job_id=job_id,
                folder=request.path,
                recursive=request.recursive,
                prune=request.prune,
                model=self.model,
                state="queued",
                message="waiting for the worker",
                created=_now(),
            )
            self._jobs[job_id] = job
            self._queue.append(job_id)
            self._save(job)
            self._cond.notify_all()
            return self._snapshot(job)

    def get(self, job_id: str) -> JobStatus:
        with self._cond:
            self._refresh()
            return self._snapshot(self._find(job_id))

    def list(self) -> builtins.list[JobStatus]:
        """Every journalled job, newest first."""
        with self._cond:
            self._refresh()
            return [self._snapshot(j) for j in self._newest_first()]

    def cancel(self, job_id: str) -> JobStatus:
        """A queued job is cancelled now; a running one stops at its next batch boundary.
        A finished job is returned as it is."""
        with self._cond:
            self._refresh()
            job = self._find(job_id)
            if job.state in ACTIVE_STATES and not self._owner:
                refused = self._try_own(create=False)
                if not self._owner:
                    raise refused or StoreError(f"job {job_id} is run by another process; cancel it there")
                job = self._find(job_id)  # taking the journal over reloaded it
            if job.state == "queued":
                with contextlib.suppress(ValueError):
                    self._queue.remove(job_id)
                self._finish(job, "cancelled", message="cancelled before it started")
            elif job.state == "running":
                self._cancel.add(job_id)
                job.message = "cancelling at the next batch boundary; batches already written stay"
                self._save(job)
                self._cond.notify_all()
            return self._snapshot(job)

    def wait(self, job_id: str, timeout: float) -> JobStatus:
        """Block until the job finishes or `timeout` seconds pass; returns its status then."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                self._refresh()
                job = self._find(job_id)
                remaining = deadline - time.monotonic()
                if job.state not in ACTIVE_STATES or remaining <= 0 or self._closing:
                    return self._snapshot(job)
                # A process that does not own the journal learns of changes only from the
                # disk: it looks every half second.
                self._cond.wait(remaining if self._owner else min(remaining, 0.5))

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop the worker at its next batch boundary. The job in flight stays `running` in
        the journal, so the next start resumes it; queued jobs stay queued."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)
            if self._worker.is_alive():
                log.warning("the index job did not stop within %.0fs; it resumes at the next start", timeout)
        self._lock.release()

    # --- ownership ----------------------------------------------------------------------

    def _try_own(self, *, create: bool) -> StoreError | None:
        """Take the journal when this process may; the reason when it may not."""
        if self._owner:
            return None
        if self._closing:
            return StoreError("the server is shutting down; submit the job again after it restarts")
        try:
            self._require_writable()
            if not create and not self.journal.is_dir():
                return None  # nothing to resume: take it at the first submit
            # A Chroma server has no store lock: this one keeps two processes from both
            # running the same journal.
            if not self._lock.acquire():
                return StoreError(
                    f"background jobs for this store are run by another cliplens process "
                    f"({self._lock.holder()}); use that one, or index_folder with background=false"
                )
        except StoreError as exc:
            return exc
        self._owner = True
        self._load()
        if self._resume_jobs:
            self._resume()
        self._prune()
        self._worker = threading.Thread(target=self._work, name="cliplens-jobs", daemon=True)
        self._worker.start()
        return None

    def _refresh(self) -> None:
        if not self._owner:
            if self._resume_jobs:
                self._try_own(create=False)
            if not self._owner:
                self._load()

    # --- worker -------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                job = self._jobs[self._queue.popleft()]
                job.state = "running"
                job.started = _now()
                job.finished = job.error = None
                job.done = job.total = 0
                job.message = "scanning the folder"
                self._save(job)
                self._cond.notify_all()
            request = JobRequest(path=job.folder, recursive=job.recursive, prune=job.prune)
            try:
                result = self._run(request, self._progress_for(job), self._cancelled_for(job.job_id))
            except Exception as exc:
                self._after_failure(job, exc)
            else:
                with self._cond:
                    self._finish(job, "completed", message="done", result=result.model_dump(mode="json"))

    def _progress_for(self, job: JobStatus) -> Progress:
        def progress(done: int, total: int, message: str) -> None:
            with self._cond:
                first = job.total == 0 and job.done == 0
                job.done, job.total = done, total
                if job.job_id not in self._cancel:  # keep saying that it is being cancelled
                    job.message = message
                # The journal is for resuming, not for live display: a write a second is plenty.
                if first or time.monotonic() - self._last_save >= PROGRESS_SAVE_INTERVAL:
                    self._save(job)
                self._cond.notify_all()

        return progress

    def _cancelled_for(self, job_id: str) -> Cancelled:
        def cancelled() -> None:
            if self._closing or job_id in self._cancel:
                raise JobInterrupted(job_id)

        return cancelled

    def _after_failure(self, job: JobStatus, exc: Exception) -> None:
        with self._cond:
            # A core may wrap the callback's exception in its own: the flags decide.
            if job.job_id in self._cancel:
                self._finish(job, "cancelled", message="cancelled; batches already written stay in the store")
            elif self._closing:
                job.message = "interrupted by shutdown; resumes at the next start"
                self._save(job)
            elif isinstance(exc, ValueError | StoreError):  # the message says what to do
                self._finish(job, "failed", message="failed", error=str(exc))
            else:
                log.exception("index job %s failed", job.job_id)
                self._finish(job, "failed", message="failed", error=f"{type(exc).__name__}: {exc}")

    # --- state and journal (called with self._cond held) --------------------------------

    def _finish(
        self,
        job: JobStatus,
        state: JobState,
        *,
        message: str,
        error: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        job.state = state
        job.finished = _now()
        job.seconds = _elapsed(job.started, job.finished)
        job.message, job.error, job.result = message, error, result
        self._cancel.discard(job.job_id)
        self._save(job)
        self._prune()
        self._cond.notify_all()

    def _find(self, job_id: str) -> JobStatus:
        job = self._jobs.get(job_id)
        if job is None:
            raise ValueError(self._unknown(job_id))
        return job

    def _snapshot(self, job: JobStatus) -> JobStatus:
        copy = job.model_copy(deep=True)
        if job.state == "running":
            copy.seconds = _elapsed(job.started, None)
        return copy

    def _newest_first(self) -> builtins.list[JobStatus]:
        return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def _unknown(self, job_id: str) -> str:
        shown = job_id if len(job_id) <= 64 else job_id[:63] + "…"
        ids = [j.job_id for j in self._newest_first()]
        if not ids:
            return f"unknown job_id {shown!r}: there are no jobs yet; index_folder with background=true starts one"
        more = f" and {len(ids) - MAX_IDS_LISTED} older" if len(ids) > MAX_IDS_LISTED else ""
        return f"unknown job_id {shown!r}; known job ids, newest first: {', '.join(ids[:MAX_IDS_LISTED])}{more}"

    def _save(self, job: JobStatus) -> None:
        if not self._owner:
            return
        self._last_save = time.monotonic()
        try:
            _write_atomic(self.journal / f"{job.job_id}.json", job.model_dump_json(indent=1).encode())
        except OSError as exc:
            # The job itself can go on; only its resume after a crash is at risk.
            log.warning("cannot write job %s to %s: %s", job.job_id, self.journal, exc)

    def _load(self) -> None:
        loaded: dict[str, JobStatus] = {}
        try:
            files = sorted(self.journal.glob("*.json"))
        except OSError:
            files = []
        for path in files:
            try:
                job = JobStatus.model_validate_json(path.read_bytes())
            except (OSError, ValidationError) as exc:
                if self._owner:  # a mirror may race the owner's pruning: no noise there
                    log.warning("ignoring unreadable job file %s: %s", path, str(exc).splitlines()[0])
                    with contextlib.suppress(OSError):
                        path.rename(path.with_suffix(".corrupt"))
                continue
            if job.job_id == path.stem:
                loaded[job.job_id] = job
        self._jobs = loaded
        if self._owner:
            for stale in self.journal.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    stale.unlink()

    def _resume(self) -> None:
        # Jobs of another model stay in the journal for a server that runs that model.
        todo = [j for j in self._jobs.values() if j.state in ACTIVE_STATES and j.model == self.model]
        for job in sorted(todo, key=lambda j: j.created):
            job.resumed_count += 1
            job.state = "queued"
            job.message = f"resumed after a restart (resume {job.resumed_count}); unchanged files are skipped"
            self._queue.append(job.job_id)
            self._save(job)

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if j.state not in ACTIVE_STATES]
        finished.sort(key=lambda j: j.finished or j.created, reverse=True)
        for job in finished[self._keep :]:
            del self._jobs[job.job_id]
            with contextlib.suppress(OSError):
                (self.journal / f"{job.job_id}.json").unlink()
