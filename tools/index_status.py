"""index_status: follow, wait for, or cancel the background jobs that index_folder starts."""

from __future__ import annotations

from typing import Annotated

import anyio
from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError, model_validator

from ..server.jobs import ACTIVE_STATES, JobManager, JobStatus
from ._mcp import engine, parse, run_core, tool_result
from .index_folder import IndexFolderResult

MAX_WAIT_SECONDS = 300.0
POLL_SECONDS = 0.25  # how often a waiting call looks at its job and reports progress
MAX_LISTED = 20

JobId = Annotated[
    str | None,
    Field(min_length=1, max_length=64, description="The job_id from index_folder; omit to list recent jobs"),
]
WaitSeconds = Annotated[
    float,
    Field(
        ge=0.0,
        le=MAX_WAIT_SECONDS,
        description=f"Wait up to this long (0 to {MAX_WAIT_SECONDS:.0f} s) for the job to finish, with progress",
    ),
]


class IndexStatusInput(BaseModel):
    job_id: JobId = None
    wait_seconds: WaitSeconds = 0.0
    cancel: bool = False

    @model_validator(mode="after")
    def _needs_job_for_wait_or_cancel(self) -> IndexStatusInput:
        if self.job_id is None and (self.cancel or self.wait_seconds > 0):
            what = "cancel=true" if self.cancel else f"wait_seconds={self.wait_seconds:g}"
            raise ValueError(f"{what} needs a job_id; call index_status without arguments to list the jobs")
        return self


class IndexJob(JobStatus):
    # The same record as the journal's, with the result typed for the output schema.
    result: IndexFolderResult | None = Field(default=None, description="The index_folder result once completed")


class IndexStatusResult(BaseModel):
    jobs: list[IndexJob] = Field(description=f"The asked-for job, or the {MAX_LISTED} most recent, newest first")


def index_status(jobs: JobManager, request: IndexStatusInput) -> IndexStatusResult:
    """Cancel if asked, then report the job (or the recent jobs); never waits."""
    if request.job_id is None:
        found = jobs.list()[:MAX_LISTED]
    elif request.cancel:
        found = [jobs.cancel(request.job_id)]
    else:
        found = [jobs.get(request.job_id)]
    return IndexStatusResult(jobs=[_typed(j) for j in found])


def _typed(job: JobStatus) -> IndexJob:
    data = job.model_dump()
    try:
        return IndexJob.model_validate(data)
    except ValidationError:
        # A result journalled by another cliplens version must not break the listing.
        data.update(result=None, message=f"{job.message} (result kept in an older format; index again to see it)")
        return IndexJob.model_validate(data)


DESCRIPTION = (
    "Report the background jobs that index_folder(background=true) started: state, progress and, once "
    "completed, the result; optionally wait for one to finish, or cancel it (images already embedded stay)."
)


async def handle(
    ctx: Context,
    job_id: JobId = None,
    wait_seconds: WaitSeconds = 0.0,
    cancel: Annotated[bool, Field(description="Stop the job at its next batch; needs job_id")] = False,
) -> Annotated[CallToolResult, IndexStatusResult]:
    app = engine(ctx)
    request = parse(IndexStatusInput, job_id=job_id, wait_seconds=wait_seconds, cancel=cancel)
    result = await run_core(index_status, app.jobs, request)
    if request.wait_seconds > 0 and result.jobs[0].state in ACTIVE_STATES:
        status = request.model_copy(update={"cancel": False})
        reported: tuple[int, int] | None = None
        # Polling with anyio.sleep keeps the event loop free and holds no worker thread
        # for the whole wait; each look takes a lock for a moment.
        with anyio.move_on_after(request.wait_seconds):
            while result.jobs[0].state in ACTIVE_STATES:
                job = result.jobs[0]
                if (job.done, job.total) != reported:
                    reported = (job.done, job.total)
                    await ctx.report_progress(job.done, job.total or None, job.message)
                await anyio.sleep(POLL_SECONDS)
                result = await run_core(index_status, app.jobs, status)
        job = result.jobs[0]
        if job.state == "completed" and (job.done, job.total) != reported:
            await ctx.report_progress(job.done, job.total or None, job.message)
    return tool_result(result)


# Not read-only: cancel=true stops a job.
ANNOTATIONS = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False
)
