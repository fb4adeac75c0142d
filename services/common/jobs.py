"""Jobs (training runs, scoring runs) as datastore records, with live watchers.

A job is a plain dict document stored as a datastore record of one kind ("trainingJobs",
"scoringJobs"), so it outlives the service that runs it: a restarted service lists past
jobs, and `recover()` marks the ones it lost as failed rather than leaving them "running"
forever. Every document has

    job_id, state, create_time, start_time, end_time, request_id, error, log_tail

(state is a common.v1.JobState name without its prefix; times are ISO-8601 UTC strings or
None; error is {"reason", "message"} or None); each service adds its own keys.

Watchers are in-process: `update()` wakes them on every change, while progress ticks
(persist=False) reach the datastore at most once per `progress_interval` — state changes
are always written at once. Queues, devices and processes belong to the services.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from services.common.errors import NotFound

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE_STATES = frozenset({QUEUED, RUNNING})
# A request_id makes retries of a create safe for this long.
REQUEST_ID_WINDOW = timedelta(hours=24)
LOG_TAIL_LINES = 50
WATCH_POLL_SECONDS = 5.0


class RecordStore(Protocol):
    """What a JobStore needs of the datastore (DatastoreClient implements it)."""

    async def put_record(self, kind: str, record_id: str, data: dict[str, Any], expected_revision: int = 0) -> int: ...

    async def get_record(self, kind: str, record_id: str) -> dict[str, Any] | None: ...

    async def list_records(self, kind: str) -> list[dict[str, Any]]: ...


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def new_job(**fields: Any) -> dict[str, Any]:
    """A QUEUED job document with a fresh id; `fields` adds the service's own keys."""
    return {
        "job_id": str(uuid.uuid4()),
        "state": QUEUED,
        "create_time": now_iso(),
        "start_time": None,
        "end_time": None,
        "request_id": "",
        "error": None,
        "log_tail": [],
        **fields,
    }


class JobStore:
    """The jobs of one kind: in memory for the ones this process touches, in the datastore for all."""

    def __init__(self, records: RecordStore, kind: str, progress_interval: float = 1.0) -> None:
        self.records = records
        self.kind = kind
        self.progress_interval = progress_interval
        self._jobs: dict[str, dict[str, Any]] = {}
        self._changed: dict[str, asyncio.Condition] = {}
        self._last_write: dict[str, float] = {}
        self._dirty: set[str] = set()
        self._lock = asyncio.Lock()

    async def recover(self, message: str = "lost: the service restarted while the job was active") -> list[dict[str, Any]]:
        """Marks every job a previous process left queued or running as FAILED; returns them."""
        lost = [doc for doc in await self.records.list_records(self.kind) if doc.get("state") in ACTIVE_STATES]
        for doc in lost:
            self._jobs[doc["job_id"]] = doc
            await self.update(doc["job_id"], {"state": FAILED, "error": {"reason": "SERVER_ERROR", "message": message}})
        return [self._jobs[doc["job_id"]] for doc in lost]

    async def create(self, doc: dict[str, Any], request_id: str = "") -> tuple[dict[str, Any], bool]:
        """Stores a new job; a request_id seen in the last 24 hours returns that job instead (created False)."""
        async with self._lock:
            if request_id:
                since = datetime.now(UTC) - REQUEST_ID_WINDOW
                for existing in await self.list():
                    created_at = parse_time(existing.get("create_time"))
                    if existing.get("request_id") == request_id and created_at and created_at >= since:
                        return existing, False
            doc = {**doc, "request_id": request_id}
            await self.records.put_record(self.kind, doc["job_id"], doc, expected_revision=-1)
            self._jobs[doc["job_id"]] = doc
            self._last_write[doc["job_id"]] = time.monotonic()
            return dict(doc), True

    async def get(self, job_id: str) -> dict[str, Any]:
        """The job; NOT_FOUND (RECORD_NOT_FOUND) if there is none."""
        if job_id in self._jobs:
            return dict(self._jobs[job_id])
        doc = await self.records.get_record(self.kind, job_id)
        if doc is None:
            raise NotFound(f"job {job_id!r} does not exist", reason="RECORD_NOT_FOUND")
        return doc

    async def list(
        self, state: str | None = None, where: Callable[[dict[str, Any]], bool] | None = None
    ) -> list[dict[str, Any]]:
        """Jobs newest first, this process's fresher copies winning over stored ones."""
        stored = {doc["job_id"]: doc for doc in await self.records.list_records(self.kind) if "job_id" in doc}
        stored.update((job_id, dict(doc)) for job_id, doc in self._jobs.items())
        jobs = [
            doc
            for doc in stored.values()
            if (state is None or doc.get("state") == state) and (where is None or where(doc))
        ]
        return sorted(jobs, key=lambda doc: doc.get("create_time") or "", reverse=True)

    async def update(self, job_id: str, changes: dict[str, Any], persist: bool = True) -> dict[str, Any]:
        """Merges `changes` into the job and wakes its watchers.

        Entering RUNNING sets start_time and a final state sets end_time (unless given).
        persist=False (progress ticks) writes at most once per progress_interval; the next
        persisted update or `flush()` writes what was held back.
        """
        doc = self._jobs.get(job_id) or await self.get(job_id)
        previous_state = doc.get("state")
        doc = {**doc, **changes}
        state = doc.get("state")
        if state != previous_state:
            persist = True
            if state == RUNNING and not doc.get("start_time"):
                doc["start_time"] = now_iso()
            if state in FINAL_STATES and not doc.get("end_time"):
                doc["end_time"] = now_iso()
        if len(doc.get("log_tail") or []) > LOG_TAIL_LINES:
            doc["log_tail"] = doc["log_tail"][-LOG_TAIL_LINES:]
        self._jobs[job_id] = doc
        due = time.monotonic() - self._last_write.get(job_id, 0.0) >= self.progress_interval
        if persist or due:
            await self._write(job_id)
        else:
            self._dirty.add(job_id)
        condition = self._changed.get(job_id)
        if condition is not None:
            async with condition:
                condition.notify_all()
        if state in FINAL_STATES:
            self._last_write.pop(job_id, None)
        return dict(doc)

    async def log(self, job_id: str, *lines: str) -> dict[str, Any]:
        """Appends lines to the job's log tail (kept to the last LOG_TAIL_LINES), throttled like progress."""
        doc = self._jobs.get(job_id) or await self.get(job_id)
        return await self.update(job_id, {"log_tail": [*(doc.get("log_tail") or []), *lines]}, persist=False)

    async def flush(self) -> None:
        """Writes every progress tick still held back (call before stopping)."""
        for job_id in list(self._dirty):
            await self._write(job_id)

    async def _write(self, job_id: str) -> None:
        self._dirty.discard(job_id)
        self._last_write[job_id] = time.monotonic()
        await self.records.put_record(self.kind, job_id, self._jobs[job_id])

    async def watch(self, job_id: str, min_interval: float = 1.0) -> AsyncIterator[dict[str, Any]]:
        """The job now, then again after every change, ending after a final state. Changes
        within one state (progress, log lines) come at most once per `min_interval`."""
        doc = await self.get(job_id)
        condition = self._changed.setdefault(job_id, asyncio.Condition())
        sent: dict[str, Any] | None = None
        sent_at = 0.0
        while True:
            if sent is not None and doc != sent and doc.get("state") == sent.get("state"):
                delay = min_interval - (time.monotonic() - sent_at)
                if delay > 0:
                    await asyncio.sleep(delay)
                    doc = await self.get(job_id)
            if doc != sent:
                yield doc
                sent, sent_at = doc, time.monotonic()
            if doc.get("state") in FINAL_STATES:
                return
            async with condition:
                # Wait only if nothing changed since the last read. A job another process
                # runs never notifies this one: re-read it from the datastore now and then.
                if self._jobs.get(job_id, doc) == doc:
                    try:
                        await asyncio.wait_for(condition.wait(), timeout=WATCH_POLL_SECONDS)
                    except TimeoutError:
                        pass
            doc = await self.get(job_id)
