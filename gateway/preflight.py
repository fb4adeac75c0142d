"""Checks `labelgrid up` makes before it starts anything: every port it needs is free.

Without them a taken port showed up late and indirectly: the stack started five children,
then Envoy logged `cannot bind '127.0.0.1:9901': Address already in use` among the others'
output and everything stopped again; worse, a second `labelgrid up` next to a running one
could pass a ready check against the first stack's gateway.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class PortUse:
    flag: str  # the `labelgrid up` option that sets it
    what: str  # who listens there
    host: str
    port: int


def port_taken(host: str, port: int) -> bool:
    """Whether a listening socket holds (host, port). SO_REUSEADDR, as the servers bind: a
    port left in TIME_WAIT by a stack that just stopped counts as free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError:
            return True
    return False


def port_problems(uses: list[PortUse]) -> list[str]:
    """One line per port given twice or already taken, saying which option moves it."""
    problems: list[str] = []
    seen: dict[int, PortUse] = {}
    for use in uses:
        if use.port == 0:
            continue
        if use.port in seen:
            first = seen[use.port]
            problems.append(
                f"port {use.port} is given twice: {first.flag} ({first.what}) and {use.flag} ({use.what}); "
                f"pick another with {use.flag} PORT"
            )
            continue
        seen[use.port] = use
        if port_taken(use.host, use.port):
            problems.append(
                f"port {use.port} on {use.host} ({use.flag}, {use.what}) is in use: another labelgrid up "
                f"or another program holds it (`ss -ltnp 'sport = :{use.port}'` names it); "
                f"stop it or start with {use.flag} PORT"
            )
    return problems


WHAT = {
    "port": "Envoy: REST, gRPC and gRPC-web",
    "admin_port": "Envoy's admin",
    "gateway_port": "the REST gateway",
    "datastore_port": "the datastore",
    "inference_port": "inference",
    "training_port": "training",
    "activelearning_port": "active learning",
    "infer_replica_ports": "an inference replica",
}


def stack_ports(options: dict[str, object], host: str) -> list[PortUse]:
    """The ports of `labelgrid up`'s options (every `--*-port`, each port of a `--*-ports` list
    such as the inference replicas', and `--port` on `host`; the services and Envoy's admin
    listen on loopback)."""
    uses = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if (name == "port" or name.endswith("_port")) and isinstance(value, int):
            what = WHAT.get(name, name.removesuffix("_port").replace("_", " "))
            uses.append(PortUse(flag, what, host if name == "port" else "127.0.0.1", value))
        elif name.endswith("_ports") and isinstance(value, (list, tuple)):
            what = WHAT.get(name, name.removesuffix("_ports").replace("_", " "))
            uses += [
                PortUse(flag, f"{what} ({n} of {len(value)})", "127.0.0.1", port) for n, port in enumerate(value, 1)
            ]
    return uses
