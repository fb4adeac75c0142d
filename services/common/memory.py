"""Process-wide memory settings for services that stream large bodies through many threads."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("labelgrid.memory")

_M_ARENA_MAX = -8
"""mallopt's parameter number for the arena limit (glibc's malloc.h)."""

MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Caps glibc malloc's arenas (unless MALLOC_ARENA_MAX is set); call before threads start.

    glibc gives each contending thread an arena of its own (up to 8 per core). Transfers pass
    1-16 MiB buffers through gRPC, hashing and S3 part threads, and memory freed in one arena
    stays resident there (a 512 MiB S3 upload under CPU load grew the datastore by 57-85 MiB
    with the default, 54-70 MiB with two arenas). Python's small objects use its own allocator,
    so contention stays low. True when the cap was applied (False off glibc, or when the
    environment already sets one).
    """
    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    applied = bool(mallopt(_M_ARENA_MAX, arenas))
    if not applied:
        log.debug("mallopt(M_ARENA_MAX) was refused")
    return applied
