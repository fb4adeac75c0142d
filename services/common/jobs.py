"""Jobs (training, scoring and batch inference runs) as typed models stored as datastore records.

A job is a `Job` (pydantic): its id, a `JobState`, its times, the request id that created
it, a `JobError` once it failed and the tail of its log; each service subclasses it with
what its jobs hold (the request, typed progress). A job is stored as a datastore record of
one kind ("trainingJobs", "scoringJobs", "batchInferenceJobs"), so it outlives the service
that runs it: a restarted service lists past jobs, and `recover()` marks the ones it lost
as failed rather than leaving them running forever. The record is the model's JSON (times
ISO-8601 UTC strings, the state a common.v1.JobState name without its prefix).

Jobs are immutable values: `JobStore.update` makes the next one. Watchers are in-process:
`update()` wakes them on every change, while progress ticks (persist=False) reach the
datastore at most once per `progress_interval`; state changes are always written at once.
Queues, devices and processes belong to the services.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Generic, Protocol, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, ValidationError

from services.common.errors import NotFound

log = logging.getLogger("labelgrid.jobs")

# A request_id makes retries of a create safe for this long.
REQUEST_ID_WINDOW = timedelta(hours=24)
LOG_TAIL_LINES = 50
LOG_LINE_CHARS = 1000
"""Longest kept log line (longer ones end in "..."): 50 of them stay well under the datastore's
64 KiB cap on a record's data."""

WATCH_POLL_SECONDS = 5.0


def _clip(line: str) -> str:
    return line if len(line) <= LOG_LINE_CHARS else line[: LOG_LINE_CHARS - 3] + "..."


class JobState(enum.StrEnum):
    """A job's state, as common.v1.JobState names it without its prefix."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    @property
    def active(self) -> bool:
        return self in ACTIVE_STATES


QUEUED, RUNNING, SUCCEEDED = JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED
FAILED, CANCELLED = JobState.FAILED, JobState.CANCELLED
STATES = tuple(JobState)
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE_STATES = frozenset({QUEUED, RUNNING})


def now() -> datetime:
    return datetime.now(UTC)


# Stored as `datetime.isoformat()` ("...+00:00"), as records written before the typed model.
Time = Annotated[datetime, PlainSerializer(lambda value: value.isoformat(), return_type=str, when_used="json")]


class JobError(BaseModel):
    """Why a job FAILED: a reason of the ErrorReason list and a message for people."""

    model_config = ConfigDict(frozen=True)

    reason: str
    message: str


class Job(BaseModel):
    """What every job has. Services subclass it with their own fields (defaults for all)."""

    model_config = ConfigDict(frozen=True)

    job_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    state: JobState = JobState.QUEUED
    create_time: Time = Field(default_factory=now)
    start_time: Time | None = None
    end_time: Time | None = None
    request_id: str = ""
    error: JobError | None = None
    log_tail: tuple[str, ...] = ()
    # Where a QUEUED job waits in its service's queue (1 = next); set when answering, never stored.
    queue_position: int = Field(default=0, exclude=True)

    def record(self) -> dict[str, Any]:
        """The job as its datastore record (JSON values)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Self:
        return cls.model_validate(data)

    def at_position(self, position: int) -> Self:
        return self.model_copy(update={"queue_position": position})


J = TypeVar("J", bound=Job)


class RecordStore(Protocol):
    """What a JobStore needs of the datastore (DatastoreClient implements it)."""

    async def put_record(self, kind: str, record_id: str, data: dict[str, Any], expected_revision: int = 0) -> int: ...

    async def get_record(self, kind: str, record_id: str) -> dict[str, Any] | None: ...

    async def list_records(self, kind: str) -> list[dict[str, Any]]: ...


class JobStore(Generic[J]):
    """The jobs of one kind: in memory for the ones this process touches, in the datastore for all."""

    def __init__(self, records: RecordStore, kind: str, job_type: type[J], progress_interval: float = 1.0) -> None:
        self.records = records
        self.kind = kind
        self.job_type = job_type
        self.progress_interval = progress_interval
        self._jobs: dict[str, J] = {}
        self._changed: dict[str, asyncio.Condition] = {}
        self._last_write: dict[str, float] = {}
        self._dirty: set[str] = set()
        self._lock = asyncio.Lock()

    def _parse(self, data: dict[str, Any]) -> J | None:
        try:
            return self.job_type.from_record(data)
        except ValidationError as error:
            log.warning(
                "a %s record is not a job; skipped",
                self.kind,
                extra={"record": data.get("job_id"), "error": str(error)},
            )
            return None

    async def _stored(self) -> list[J]:
        return [job for job in map(self._parse, await self.records.list_records(self.kind)) if job is not None]

    async def recover(self, message: str = "lost: the service restarted while the job was active") -> list[J]:
        """Marks every job a previous process left queued or running as FAILED; returns them."""
        lost = [job for job in await self._stored() if job.state.active]
        for job in lost:
            self._jobs[job.job_id] = job
            await self.update(job.job_id, {"state": FAILED, "error": JobError(reason="SERVER_ERROR", message=message)})
        return [self._jobs[job.job_id] for job in lost]

    async def create(self, job: J, request_id: str = "") -> tuple[J, bool]:
        """Stores a new job; a request_id seen in the last 24 hours returns that job instead (created False)."""
        async with self._lock:
            if request_id:
                existing = await self.find_request(request_id)
                if existing is not None:
                    return existing, False
            job = job.model_copy(update={"request_id": request_id})
            await self.records.put_record(self.kind, job.job_id, job.record(), expected_revision=-1)
            self._jobs[job.job_id] = job
            self._last_write[job.job_id] = time.monotonic()
            return job, True

    async def find_request(self, request_id: str) -> J | None:
        """The job created with `request_id` within the last 24 hours, if any."""
        since = now() - REQUEST_ID_WINDOW
        for job in await self.list(where=lambda job: job.request_id == request_id):
            if job.create_time >= since:
                return job
        return None

    async def get(self, job_id: str) -> J:
        """The job; NOT_FOUND (RECORD_NOT_FOUND) if there is none."""
        if job_id in self._jobs:
            return self._jobs[job_id]
        data = await self.records.get_record(self.kind, job_id)
        job = None if data is None else self._parse(data)
        if job is None:
            raise NotFound(f"job {job_id!r} does not exist", reason="RECORD_NOT_FOUND")
        return job

    async def list(self, state: str | None = None, where: Callable[[J], bool] | None = None) -> list[J]:
        """Jobs newest first, this process's fresher copies winning over stored ones."""
        found = {job.job_id: job for job in await self._stored()}
        found.update(self._jobs)
        jobs = [
            job for job in found.values() if (state is None or job.state == state) and (where is None or where(job))
        ]
        return sorted(jobs, key=lambda job: job.create_time, reverse=True)

    async def update(self, job_id: str, changes: dict[str, Any], persist: bool = True) -> J:
        """The job with `changes` (field name -> typed value), stored; wakes its watchers.

        Entering RUNNING sets start_time and a final state sets end_time (unless given).
        persist=False (progress ticks) writes at most once per progress_interval; the next
        persisted update or `flush()` writes what was held back.
        """
        previous = self._jobs.get(job_id) or await self.get(job_id)
        job = self.job_type.model_validate({**dict(previous), **changes})
        if job.state != previous.state:
            persist = True
            times: dict[str, datetime] = {}
            if job.state is RUNNING and not job.start_time:
                times["start_time"] = now()
            if job.state.final and not job.end_time:
                times["end_time"] = now()
            job = job.model_copy(update=times)
        if len(job.log_tail) > LOG_TAIL_LINES or any(len(line) > LOG_LINE_CHARS for line in job.log_tail):
            # Bounded lines too: the job record must stay under the datastore's 64 KiB record cap.
            tail = job.log_tail[-LOG_TAIL_LINES:]
            job = job.model_copy(update={"log_tail": tuple(_clip(line) for line in tail)})
        self._jobs[job_id] = job
        due = time.monotonic() - self._last_write.get(job_id, 0.0) >= self.progress_interval
        if persist or due:
            await self._write(job_id)
        else:
            self._dirty.add(job_id)
        condition = self._changed.get(job_id)
        if condition is not None:
            async with condition:
                condition.notify_all()
        if job.state.final:
            self._last_write.pop(job_id, None)
        return job

    async def log(self, job_id: str, *lines: str) -> J:
        """Appends lines to the job's log tail (kept to the last LOG_TAIL_LINES), throttled like progress."""
        job = self._jobs.get(job_id) or await self.get(job_id)
        return await self.update(job_id, {"log_tail": (*job.log_tail, *lines)}, persist=False)

    async def flush(self) -> None:
        """Writes every progress tick still held back (call before stopping)."""
        for job_id in list(self._dirty):
            await self._write(job_id)

    async def _write(self, job_id: str) -> None:
        self._dirty.discard(job_id)
        self._last_write[job_id] = time.monotonic()
        await self.records.put_record(self.kind, job_id, self._jobs[job_id].record())

    async def watch(self, job_id: str, min_interval: float = 1.0) -> AsyncIterator[J]:
        """The job now, then again after every change, ending after a final state. Changes
        within one state (progress, log lines) come at most once per `min_interval`."""
        job = await self.get(job_id)
        condition = self._changed.setdefault(job_id, asyncio.Condition())
        sent: J | None = None
        sent_at = 0.0
        while True:
            if sent is not None and job != sent and job.state == sent.state:
                delay = min_interval - (time.monotonic() - sent_at)
                if delay > 0:
                    await asyncio.sleep(delay)
                    job = await self.get(job_id)
            if job != sent:
                yield job
                sent, sent_at = job, time.monotonic()
            if job.state.final:
                return
            async with condition:
                # Wait only if nothing changed since the last read. A job another process
                # runs never notifies this one: re-read it from the datastore now and then.
                if self._jobs.get(job_id, job) == job:
                    try:
                        await asyncio.wait_for(condition.wait(), timeout=WATCH_POLL_SECONDS)
                    except TimeoutError:
                        pass
            job = await self.get(job_id)


__all__ = [
    "ACTIVE_STATES",
    "CANCELLED",
    "FAILED",
    "FINAL_STATES",
    "QUEUED",
    "RUNNING",
    "STATES",
    "SUCCEEDED",
    "Job",
    "JobError",
    "JobState",
    "JobStore",
    "RecordStore",
]
