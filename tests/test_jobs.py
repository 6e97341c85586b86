"""Background index jobs: index_status through the MCP protocol, and the JobManager's journal,
cancel, restart and crash semantics on the real model and a real Chroma store."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
from mcp import Client
from pydantic import BaseModel

from cliplens.server.app import AppContext, build_server, open_engine
from cliplens.server.config import Settings
from cliplens.server.jobs import Cancelled, JobManager, JobRequest, JobStatus, Progress, journal_dir
from cliplens.server.store import StoreError
from cliplens.tools.index_folder import IndexFolderInput, index_folder
from cliplens.tools.index_status import IndexStatusInput, index_status

from .conftest import connect, error_text, make_image, structured
from .test_stdio_e2e import isolated_env

TIMEOUT = 30  # seconds, for every wait
MANY = 12


def make_many(folder: Path, n: int, size: tuple[int, int] = (20, 20)) -> list[Path]:
    # Distinct colours: a core that reuses embeddings of identical content still stores every path.
    return [make_image(folder / f"img{i:04d}.png", (i * 7 % 256, i * 13 % 256, i * 29 % 256), size) for i in range(n)]


@pytest.fixture
def many(photos: Path) -> Path:
    """A subfolder of the allowed folder with MANY small images."""
    make_many(photos / "many", MANY)
    return photos / "many"


def stored_paths(app: AppContext) -> list[str]:
    """Every document in the collection, duplicates included (ids are not trusted here)."""
    got = app.store.require_writable().get(include=["documents"])
    return list(got["documents"] or [])


def index_run(app: AppContext, *, batch_size: int = 16, gate: Gate | None = None) -> Any:
    """The run function open_engine injects, with a small batch and an optional gate."""

    def run(request: JobRequest, progress: Progress, cancelled: Cancelled) -> BaseModel:
        job = IndexFolderInput(path=request.path, recursive=request.recursive, prune=request.prune)
        report = gate.wrap(progress) if gate else progress
        return index_folder(
            app.encoder, app.store, app.policy, job, progress=report, cancelled=cancelled, batch_size=batch_size
        )

    return run


class Gate:
    """Holds a job after its first written batch until the test lets it go on."""

    def __init__(self) -> None:
        self.first_batch = threading.Event()
        self.proceed = threading.Event()

    def wrap(self, progress: Progress) -> Progress:
        def report(done: int, total: int, message: str) -> None:
            progress(done, total, message)
            if done > 0 and not self.first_batch.is_set():
                self.first_batch.set()
                self.proceed.wait(TIMEOUT)

        return report

    def release_soon(self) -> None:
        threading.Timer(0.2, self.proceed.set).start()


@pytest.fixture
def engine(settings: Settings) -> Iterator[AppContext]:
    with open_engine(settings) as app:
        yield app


def manager(app: AppContext, journal: Path, run: Any, **kwargs: Any) -> JobManager:
    return JobManager(
        journal, run, model=app.encoder.info.model_id, require_writable=app.store.require_writable, **kwargs
    )


# --- through the MCP protocol ------------------------------------------------------------


async def test_background_index_then_wait_gives_the_real_result(settings: Settings, photos: Path) -> None:
    async with connect(settings) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert tools["index_status"].output_schema and tools["index_status"].output_schema["type"] == "object"
        assert "background" in tools["index_folder"].input_schema["properties"]

        started = structured(await client.call_tool("index_folder", {"path": str(photos), "background": True}))
        assert started["status"] == "started" and started["job"]["state"] in ("queued", "running", "completed")
        # Nothing counted yet: no fake zeros.
        assert started["scanned"] is None and started["added"] is None and started["store_total"] is None
        job_id = started["job"]["job_id"]

        progress: list[tuple[float, float | None]] = []

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            progress.append((done, total))

        out = structured(
            await client.call_tool(
                "index_status", {"job_id": job_id, "wait_seconds": TIMEOUT}, progress_callback=on_progress
            )
        )
        [job] = out["jobs"]
        assert job["state"] == "completed" and job["error"] is None and job["resumed_count"] == 0
        result = job["result"]
        assert (result["scanned"], result["added"], result["store_total"]) == (4, 4, 4)
        assert result["status"] == "completed" and (job["done"], job["total"]) == (4, 4)
        assert progress and progress[-1] == (4, 4)

        found = structured(
            await client.call_tool("search_images", {"query": "a red square", "top_k": 8, "cutoff": "none"})
        )
        assert sorted(Path(h["path"]).name for h in found["hits"]) == ["blue.png", "green.jpg", "red.png", "yellow.png"]

        listed = structured(await client.call_tool("index_status", {}))
        assert [j["job_id"] for j in listed["jobs"]] == [job_id]

        # A synchronous run is what it always was, plus its status.
        sync = structured(await client.call_tool("index_folder", {"path": str(photos)}))
        assert sync["status"] == "completed" and sync["job"] is None and sync["unchanged"] == 4


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        ({"job_id": "nope42"}, "'nope42'"),
        ({"job_id": "x", "wait_seconds": 301}, "less than or equal to 300"),
        ({"job_id": "x", "wait_seconds": -1}, "greater than or equal to 0"),
        ({"wait_seconds": 5}, "wait_seconds=5 needs a job_id"),
        ({"cancel": True}, "cancel=true needs a job_id"),
        ({"job_id": ""}, "at least 1 character"),
    ],
)
async def test_index_status_rejects_bad_input_clearly(settings: Settings, args: dict, expect: str) -> None:
    async with connect(settings) as client:
        assert expect in error_text(await client.call_tool("index_status", args))


async def test_background_checks_the_path_before_queuing(settings: Settings, tmp_path: Path) -> None:
    async with connect(settings) as client:
        for bad, expect in ((str(tmp_path), "outside the allowed folders"), (str(tmp_path / "photos" / "no"), "exist")):
            text = error_text(await client.call_tool("index_folder", {"path": bad, "background": True}))
            assert expect in text, text
        assert structured(await client.call_tool("index_status", {}))["jobs"] == []


async def test_cancel_a_running_job_keeps_the_written_batches(
    engine: AppContext, settings: Settings, many: Path, tmp_path: Path
) -> None:
    gate = Gate()
    jobs = manager(engine, tmp_path / "journal", index_run(engine, batch_size=2, gate=gate))
    try:
        async with Client(build_server(settings, engine=dataclasses.replace(engine, jobs=jobs))) as client:
            started = structured(await client.call_tool("index_folder", {"path": str(many), "background": True}))
            job_id = started["job"]["job_id"]
            assert await anyio.to_thread.run_sync(gate.first_batch.wait, TIMEOUT)

            again = structured(await client.call_tool("index_folder", {"path": str(many), "background": True}))
            assert again["job"]["job_id"] == job_id  # the same folder and options: the same job

            asked = structured(await client.call_tool("index_status", {"job_id": job_id, "cancel": True}))
            assert asked["jobs"][0]["state"] == "running" and "cancelling" in asked["jobs"][0]["message"]
            gate.proceed.set()
            out = structured(await client.call_tool("index_status", {"job_id": job_id, "wait_seconds": TIMEOUT}))
            job = out["jobs"][0]
            assert job["state"] == "cancelled" and job["result"] is None and job["finished"]
    finally:
        gate.proceed.set()
        jobs.close()
    kept = engine.store.count()
    assert 0 < kept < MANY and len(set(stored_paths(engine))) == kept


# --- JobManager: journal, restart and crash -----------------------------------------------


def test_close_mid_job_then_a_new_manager_resumes_it(engine: AppContext, many: Path, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    gate = Gate()
    first = manager(engine, journal, index_run(engine, batch_size=2, gate=gate))
    job = first.submit(JobRequest(path=str(many)))
    assert gate.first_batch.wait(TIMEOUT)
    gate.release_soon()
    first.close()  # a clean stop: not a cancel

    on_disk = JobStatus.model_validate_json((journal / f"{job.job_id}.json").read_text())
    assert on_disk.state == "running" and on_disk.done > 0 and "resumes" in on_disk.message
    written = engine.store.count()
    assert 0 < written < MANY

    second = manager(engine, journal, index_run(engine, batch_size=2))
    try:
        done = second.wait(job.job_id, TIMEOUT)
    finally:
        second.close()
    assert done.state == "completed" and done.resumed_count == 1
    assert done.result is not None
    assert (done.result["unchanged"], done.result["added"]) == (written, MANY - written)
    paths = stored_paths(engine)
    assert len(paths) == len(set(paths)) == MANY


def test_a_journal_left_by_a_crash_is_resumed(engine: AppContext, many: Path, photos: Path, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    journal.mkdir()
    model = engine.encoder.info.model_id

    def left(n: int, folder: Path, state: str, model: str = model) -> None:
        job = JobStatus.model_validate(
            {"job_id": f"aa00000{n}", "folder": str(folder), "recursive": True, "prune": True, "model": model,
             "state": state, "created": f"2025-01-01T00:00:0{n}+00:00", "done": 3, "total": 12}
        )  # fmt: skip
        (journal / f"{job.job_id}.json").write_text(job.model_dump_json())

    left(1, many, "running")
    left(2, photos / "sub", "queued")
    left(3, many, "running", model="some/other-model")  # not ours to run
    (journal / "bad00000.json").write_text("{ half a file")

    jobs = manager(engine, journal, index_run(engine))
    try:
        ran = [jobs.wait(i, TIMEOUT) for i in ("aa000001", "aa000002")]
        other = jobs.get("aa000003")
    finally:
        jobs.close()
    assert [(j.state, j.resumed_count) for j in ran] == [("completed", 1), ("completed", 1)]
    assert (other.state, other.resumed_count) == ("running", 0)
    assert (journal / "bad00000.corrupt").exists() and not (journal / "bad00000.json").exists()
    paths = stored_paths(engine)
    assert len(paths) == len(set(paths)) == MANY + 1


def test_a_read_only_store_neither_submits_nor_resumes(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    journal.mkdir()
    stuck = JobStatus(job_id="cafe0001", folder="/x", recursive=True, prune=True, state="running", created="t")
    (journal / "cafe0001.json").write_text(stuck.model_dump_json())
    message = "the store at /db is locked by another cliplens process (pid 1); this one can only search."

    def locked() -> None:
        raise StoreError(message)

    jobs = JobManager(journal, fake_run(), require_writable=locked)
    try:
        assert not jobs.owner
        with pytest.raises(StoreError, match="locked by another cliplens process"):
            jobs.submit(JobRequest(path="/x"))
        assert jobs.get("cafe0001").state == "running" and jobs.get("cafe0001").resumed_count == 0
        with pytest.raises(StoreError, match="locked"):
            jobs.cancel("cafe0001")
    finally:
        jobs.close()


def fake_run(steps: int = 3, hold: threading.Event | None = None) -> Any:
    class Done(BaseModel):
        folder: str

    def run(request: JobRequest, progress: Progress, cancelled: Cancelled) -> BaseModel:
        progress(0, steps, "start")
        for i in range(steps):
            cancelled()
            if hold is not None:
                hold.wait(TIMEOUT)
            progress(i + 1, steps, f"step {i + 1}")
        return Done(folder=request.path)

    return run


def test_a_second_process_mirrors_the_journal_and_takes_over(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    hold = threading.Event()
    owner = JobManager(journal, fake_run(hold=hold))
    mirror = JobManager(journal, fake_run())
    try:
        job = owner.submit(JobRequest(path="/a"))
        assert owner.owner and not mirror.owner
        with pytest.raises(StoreError, match="run by another cliplens process"):
            mirror.submit(JobRequest(path="/b"))
        assert mirror.get(job.job_id).state in ("queued", "running")
        threading.Timer(0.2, hold.set).start()
        owner.close()  # the owner goes away mid-job
        # The next look takes the journal over and resumes the job.
        done = mirror.wait(job.job_id, TIMEOUT)
        assert mirror.owner and (done.state, done.resumed_count) == ("completed", 1)
        assert done.result == {"folder": "/a"}
    finally:
        hold.set()
        owner.close()
        mirror.close()


def test_duplicates_queue_cancel_unknown_ids_and_pruning(tmp_path: Path) -> None:
    hold = threading.Event()
    jobs = JobManager(tmp_path / "journal", fake_run(hold=hold), keep_finished=3)
    try:
        a = jobs.submit(JobRequest(path="/a"))
        assert jobs.submit(JobRequest(path="/a")).job_id == a.job_id
        assert jobs.submit(JobRequest(path="/a", prune=False)).job_id != a.job_id  # other options: another job
        b = jobs.submit(JobRequest(path="/b"))
        assert jobs.cancel(b.job_id).state == "cancelled"  # queued: at once
        assert jobs.wait(a.job_id, 0.2).state == "running"  # held: the wait times out
        with pytest.raises(ValueError, match=r"unknown job_id 'zzz'.*" + b.job_id):
            jobs.get("zzz")
        hold.set()
        for job in jobs.list():
            jobs.wait(job.job_id, TIMEOUT)
        assert jobs.get(a.job_id).state == "completed" and jobs.get(b.job_id).state == "cancelled"
        for i in range(4):
            jobs.wait(jobs.submit(JobRequest(path=f"/n{i}")).job_id, TIMEOUT)
        listed = jobs.list()
        assert len(listed) == 3 and [j.folder for j in listed] == ["/n3", "/n2", "/n1"]  # newest first
        assert sorted(p.stem for p in (tmp_path / "journal").glob("*.json")) == sorted(j.job_id for j in listed)
    finally:
        hold.set()
        jobs.close()


def test_a_result_in_an_older_format_does_not_break_the_listing(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    journal.mkdir()
    old = JobStatus(job_id="01d00001", folder="/x", recursive=True, prune=True, state="completed", created="2024")
    old.result = {"images": 3}  # not today's IndexFolderResult
    (journal / "01d00001.json").write_text(old.model_dump_json())
    jobs = JobManager(journal, fake_run())
    try:
        [job] = index_status(jobs, IndexStatusInput()).jobs
    finally:
        jobs.close()
    assert job.job_id == "01d00001" and job.result is None and "older format" in job.message


def test_a_chroma_server_gets_its_own_journal(tmp_path: Path) -> None:
    local = journal_dir(tmp_path, None)
    one, two = journal_dir(tmp_path, "http://a:8000"), journal_dir(tmp_path, "http://b:8000")
    assert local == tmp_path / "jobs" and one.parent == two.parent == local and one != two


# --- a real crash: SIGKILL mid-job, then open the store again ------------------------------

CRASHING_SERVER = """
import sys, time
import cliplens.tools.index_folder as ix
from cliplens.server.app import open_engine
from cliplens.server.config import Settings
from cliplens.server.jobs import JobRequest

real = ix.index_folder

def paced(*args, progress=None, **kwargs):
    # Small batches and a pause after each, so the kill lands mid-job.
    def report(done, total, message):
        progress(done, total, message)
        time.sleep(0.02)
    return real(*args, progress=report, **{**kwargs, "batch_size": 4})

ix.index_folder = paced
with open_engine(Settings.model_validate_json(sys.argv[1])) as app:
    app.jobs.submit(JobRequest(path=sys.argv[2]))
    time.sleep(120)
"""


def test_sigkill_mid_job_then_reopen_resumes_it(settings: Settings, photos: Path, tmp_path: Path) -> None:
    folder = photos / "crash"
    n = 300
    make_many(folder, n, size=(12, 12))
    journal = journal_dir(settings.store_dir(), None)
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_SERVER, settings.model_dump_json(), str(folder)],
        env=isolated_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        seen: dict[str, Any] = {}
        while not (seen.get("state") == "running" and seen.get("done", 0) > 0):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, f"no progress in the journal: {seen}"
            time.sleep(0.05)
            for path in journal.glob("*.json"):
                seen = json.loads(path.read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
    assert seen["done"] < n, "the job finished before the kill: nothing was tested"

    with open_engine(settings) as app:  # resumes the job at once
        done = app.jobs.wait(seen["job_id"], TIMEOUT)
        assert (done.state, done.resumed_count) == ("completed", 1), done
        # What the journal said was done before the kill was in the store, and was not redone.
        assert done.result is not None and seen["done"] <= done.result["unchanged"] < n
        assert done.result["unchanged"] + done.result["added"] == n
        paths = stored_paths(app)
    assert len(paths) == len(set(paths)) == n
    assert set(paths) == {str(p) for p in folder.iterdir()}
