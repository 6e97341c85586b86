"""Rebuild a damaged vector index from the image files.

The records' paths survive in SQLite (health.recorded_paths); the vectors do not. So the
writer saves a plan (the folders that held records) before it drops the collection, creates
it empty and indexes those folders again: as background jobs in a server, so it answers at
once (searches say that a rebuild runs), or before going on in a one-shot command.

The plan is a JSON file next to the job journal, written atomically. A crash at any point
leaves it behind, and the next writer to open the store goes on: it drops the collection
again if the crash came before that, and indexes the folders not yet done again (the
incremental index skips what is already back). It is removed once every folder is done.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ValidationError

from .jobs import ACTIVE_STATES, Cancelled, JobManager, JobRequest, Progress, RunFn, _write_atomic
from .store import ImageStore, StoreError, collection_name

log = logging.getLogger(__name__)

MAX_REASON = 200
SAVE_INTERVAL = 1.0  # seconds between plan writes for progress alone: a lost mark only costs a rescan


class RebuildPlan(BaseModel):
    collection: str
    source_id: str  # the damaged collection's id: while the store's is the same, it is not dropped yet
    reason: str
    created: str
    folders: list[str]
    done: list[str] = []  # folders indexed again, or given up (gone, or no longer allowed)
    jobs: dict[str, str] = {}  # folder -> background job id


class Rebuild:
    """The rebuild of one collection: `prepare` before the jobs open, then `start`."""

    def __init__(self, store: ImageStore, store_dir: Path) -> None:
        self.store = store
        self.path = store_dir / "rebuild" / f"{collection_name(store.info)}.json"
        self._guard = threading.Lock()
        self._saved = 0.0
        self.plan = self._load()
        store.rebuild_note = self.note

    def prepare(self) -> None:
        """In the writer: when the index is damaged, or a rebuild was cut short before the
        collection was dropped, save the plan and empty the collection. Before any job runs."""
        store, plan = self.store, self.plan
        if store.read_only:
            return
        pending = plan is not None and plan.source_id == store.collection_id
        if store.damage is None and not pending:
            return
        folders = set(plan.folders) if plan else set()
        folders |= {str(Path(p).parent) for p in store.recorded_paths()}
        reason = store.damage or (plan.reason if plan else "")
        self.plan = RebuildPlan(
            collection=collection_name(store.info),
            source_id=str(store.collection_id),
            reason=reason[:MAX_REASON],
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            folders=sorted(folders),
        )
        self._save()
        log.error(
            "rebuilding the vector index of %s from the image files of %d folders (%s)",
            self.plan.collection,
            len(folders),
            self.plan.reason,
        )
        store.reset()

    def tracked(self, run: RunFn) -> RunFn:
        """`run` (the jobs' run function), marking the plan's folders done as jobs index them."""

        def run_and_mark(request: JobRequest, progress: Progress, cancelled: Cancelled) -> BaseModel:
            try:
                result = run(request, progress, cancelled)
            except (ValueError, StoreError) as exc:
                if not request.recursive and self._mark(request.path, given_up=str(exc)):
                    log.warning("could not re-index %s for the rebuild: %s", request.path, exc)
                raise
            self._mark(request.path, recursive=request.recursive)
            return result

        return run_and_mark

    def start(self, jobs: JobManager, index_now: Callable[[str], object] | None = None) -> None:
        """Re-index the folders not done yet: now with `index_now` (a one-shot command, which
        would stop background jobs at once; `tracked` like the jobs), else as background jobs."""
        plan = self.plan
        if plan is None or self.store.read_only:
            return
        todo = [f for f in plan.folders if f not in set(plan.done)]
        if index_now is not None:
            for folder in todo:
                # A folder gone or no longer allowed is given up (`tracked` says so).
                with contextlib.suppress(ValueError, StoreError):
                    index_now(folder)
            self._finish()
            return
        with self._guard:
            for folder in todo:
                job = plan.jobs.get(folder)
                if job is None or _state(jobs, job) not in ACTIVE_STATES:
                    # Only this folder's images: the folders were those that held records.
                    plan.jobs[folder] = jobs.submit(JobRequest(path=folder, recursive=False, prune=False)).job_id
            self._save()
        if not todo:
            self._finish()

    def note(self) -> str | None:
        """What a search should say while the rebuild runs; None once it is done."""
        with self._guard:
            plan = self._load() if self.store.read_only else self.plan
        if plan is None:
            return None
        return (
            f"The vector index was found damaged ({plan.reason}) and is being rebuilt from the image files: "
            f"{len(plan.done)} of {len(plan.folders)} folders re-indexed so far, so images may be missing from "
            "the results until it ends (index_status lists the jobs)."
        )

    # --- internals ----------------------------------------------------------------------

    def _mark(self, path: str, *, recursive: bool = False, given_up: str = "") -> bool:
        """Mark the plan's folders that an index of `path` covered; whether there were any."""
        with self._guard:
            plan = self.plan
            if plan is None:
                return False
            done = set(plan.done)
            covered = [
                f
                for f in plan.folders
                if f not in done and (f == path or (recursive and not given_up and Path(f).is_relative_to(path)))
            ]
            if not covered:
                return False
            plan.done = sorted(done | set(covered))
            last = len(plan.done) == len(plan.folders)
            if not last and time.monotonic() - self._saved >= SAVE_INTERVAL:
                self._save()
        if last:
            self._finish()
        return True

    def _finish(self) -> None:
        with self._guard:
            plan, self.plan = self.plan, None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if plan is not None:
            log.warning("the vector index of %s is rebuilt", plan.collection)

    def _load(self) -> RebuildPlan | None:
        try:
            return RebuildPlan.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.warning("ignoring unreadable rebuild plan %s: %s", self.path, str(exc).splitlines()[0])
            return None

    def _save(self) -> None:
        assert self.plan is not None
        self._saved = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, self.plan.model_dump_json(indent=1).encode())


def _state(jobs: JobManager, job_id: str) -> str:
    try:
        return jobs.get(job_id).state
    except ValueError:  # pruned from the journal, or the journal was lost
        return "unknown"
