"""Which batch jobs a starting inference replica may mark lost (services.infer.domain.batch.owner_lost)."""

from __future__ import annotations

import os
import subprocess
import sys

from services.infer.domain.batch import owner_id, owner_lost


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(child.stdout)


def test_a_live_replica_on_the_same_host_keeps_its_jobs() -> None:
    me = owner_id()
    host = me.split(":")[0]
    replica = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not owner_lost(f"{host}:{replica.pid}:abc", me)
    finally:
        replica.kill()
        replica.wait()
    assert owner_lost(f"{host}:{replica.pid}:abc", me)  # now it is gone


def test_an_earlier_life_of_this_process_is_lost_even_with_the_same_pid() -> None:
    me = owner_id()
    host = me.split(":")[0]
    assert owner_lost(f"{host}:{os.getpid()}:earlier", me)  # a restarted container: pid 1 again
    assert owner_lost(f"{host}:{dead_pid()}", me)  # the old host:pid form
    assert not owner_lost(me, me)


def test_owners_on_other_hosts_are_never_judged_here() -> None:
    me = owner_id()
    assert not owner_lost(f"another-pod:{dead_pid()}:abc", me)
    assert not owner_lost(f"another-pod:{os.getpid()}:abc", me)
