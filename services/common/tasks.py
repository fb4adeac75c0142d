"""Background asyncio tasks that are kept until they end and whose failures are logged, never lost.

`asyncio.create_task` alone keeps only a weak reference (a task can be collected while it
runs) and an exception nobody awaits is reported late or not at all. Every service starts
its background work (job runners, log and progress writes, auto scoring) through `spawn`
into a set it owns, so it can wait for or cancel all of it on stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("labelgrid.tasks")


def _log_failure(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.error("background task %s failed", task.get_name(), exc_info=error)


def spawn(tasks: set[asyncio.Task[Any]], coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
    """Starts `coro` as a task held in `tasks` until it ends; its exception, if any, is logged."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    task.add_done_callback(_log_failure)
    return task


async def cancel_all(tasks: set[asyncio.Task[Any]]) -> None:
    """Cancels the tasks and waits for them to end (their failures are already logged)."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
