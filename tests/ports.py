"""Free loopback ports for the servers the tests start, one place for all of them.

Ports come from below the kernel's ephemeral range. The kernel hands ephemeral ports to
every `bind(0)` (a service's own metrics listener) and to every outgoing connection, so a
port picked there by bind-and-release can be taken by one of those before our server binds
it: a CI run lost `labelgrid up` that way, its inference port taken by a metrics listener.
Each port is also handed out at most once per test process.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

HOST = "127.0.0.1"
LOWEST = 20000  # above the well-known and registered ports that daemons commonly hold

_handed: set[int] = set()
_lock = threading.Lock()
_random = random.SystemRandom()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports nothing listens on (all held until all are picked)."""
    highest = _ephemeral_low() - 1
    held: list[socket.socket] = []
    try:
        with _lock:
            for _ in range(100 * count + 1000):
                if len(held) == count:
                    break
                port = _random.randint(LOWEST, highest) if highest > LOWEST + 1000 else 0
                if port in _handed:
                    continue
                sock = socket.socket()
                try:
                    sock.bind((HOST, port))
                except OSError:
                    sock.close()
                    continue
                held.append(sock)
                _handed.add(sock.getsockname()[1])
            if len(held) < count:
                raise RuntimeError(f"found only {len(held)} of {count} free loopback ports")
            return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def free_port() -> int:
    """One loopback port nothing listens on, e.g. to stand for a service that is down."""
    return free_ports(1)[0]
