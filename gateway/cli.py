"""`labelgrid up`: the whole stack on localhost, as child processes watched by one supervisor.

Datastore (on the local studies folder, S3 or a DICOMweb PACS), inference (one or more
replicas), training, active learning, the REST gateway and Envoy each run as their own
process, exactly as they run in a cluster. The supervisor waits until each
is ready (gRPC health SERVING, the gateway's /info/ 200, Envoy's /ready), restarts a child
that dies (with backoff), and on Ctrl-C / SIGTERM stops them all (SIGTERM, wait, SIGKILL).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import getpass
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Protocol

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from labelgrid.client.cli import add_commands as add_sdk_commands
from labelgrid.client.cli import run as run_sdk_command

from gateway.envoy import EnvoySettings, envoy_command, is_loopback, write_bootstrap
from gateway.preflight import port_problems, stack_ports
from services.common.auth import ROLES, USER, Identity, UsersFile, issue_access_token, new_signing_key
from services.common.errors import InvalidArgument
from services.datastore.settings import DatastoreSettings

STOP_TIMEOUT_S = 20.0  # services drain in-flight RPCs for 10 s (grace_seconds) before this
START_TIMEOUT_S = 180.0  # inference imports torch and warms its models up
MAX_BACKOFF_S = 30.0
FIRST_REPLICA_PORT = 50060  # --infer-replicas N: replicas on 50060, 50061, ... unless --infer-replica-ports
STABLE_AFTER_S = 60.0  # a child up this long has its backoff reset


class Say(Protocol):
    """Prints one line of output, tagged with where it came from."""

    def __call__(self, line: str, source: str = ...) -> None: ...


def grpc_serving(address: str) -> Callable[[], bool]:
    """Ready check: the server's overall gRPC health is SERVING."""

    def check() -> bool:
        with grpc.insecure_channel(address) as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.RpcError:
                return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    return check


def http_ok(url: str, headers: Callable[[], dict[str, str]] | None = None) -> Callable[[], bool]:
    """Ready check: `url` answers 200 (sent with `headers()`, e.g. the supervisor's token)."""

    def check() -> bool:
        try:
            return httpx.get(url, timeout=5.0, headers=headers() if headers else None).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def envoy_ready(admin_url: str) -> Callable[[], bool]:
    """Ready check of Envoy: live (/ready), and every upstream host it health-checks (inference
    replicas) has passed a check, so the first gRPC call through the edge is not refused with
    'no healthy upstream'."""
    live = http_ok(f"{admin_url}/ready")

    def check() -> bool:
        if not live():
            return False
        try:
            clusters = httpx.get(f"{admin_url}/clusters", timeout=5.0).text
        except httpx.HTTPError:
            return False
        flags = [line for line in clusters.splitlines() if "::health_flags::" in line]
        return all(line.endswith("::health_flags::healthy") for line in flags)

    return check


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn giving the child SIGTERM when the supervisor dies, even by SIGKILL, so no
    orphan keeps the ports. prctl is looked up here: a forked child must not dlopen. The death
    signal follows the *thread* that forked, so children are only ever started from the main one."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return set_death_signal


class Child:
    """One process of the stack: started, checked for readiness, stopped by its own pid.

    Its output goes to ours, each line prefixed with its name.
    """

    def __init__(
        self, name: str, argv: list[str], ready: Callable[[], bool], say: Say, env: dict[str, str] | None = None
    ) -> None:
        self.name, self.argv, self.ready, self.say = name, argv, ready, say
        self.env = env or {}  # added to ours (secrets go here, never into argv)
        self.proc: subprocess.Popen[str] | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.is_ready = False
        self.restart_at: float | None = None  # when a crashed child is due to be started again

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
            # Own session: Ctrl-C reaches only the supervisor, which stops the children in order.
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        self.started_at, self.is_ready, self.restart_at = time.monotonic(), False, None
        threading.Thread(target=self._forward, args=(self.proc,), name=f"{self.name}-output", daemon=True).start()
        self.say(f"started {self.name} (pid {self.proc.pid})")

    def _forward(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.say(line.rstrip("\n"), self.name)

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return None if self.proc is None else self.proc.poll()

    def wait_ready(self, timeout: float, cancel: threading.Event) -> bool:
        """Polls the ready check until it passes; False if the process ends, time runs out or
        `cancel` is set."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not cancel.is_set():
            if self.exited() is not None:
                return False
            if self.ready():
                self.is_ready = True
                return True
            time.sleep(0.2)
        return False

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait up to `timeout`, then SIGKILL."""
        if self.proc is None:
            return
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.say(f"{self.name} did not stop in {timeout:.0f} s: killing it")
            self.proc.kill()
            self.proc.wait()


class Supervisor:
    """Starts the children in order, restarts the ones that die, stops them all on request."""

    def __init__(self, groups: list[list[Child]], say: Say) -> None:
        # Groups start one after another; the children of a group start together.
        self.groups, self.say = groups, say
        self.stopping = threading.Event()

    @property
    def children(self) -> list[Child]:
        return [child for group in self.groups for child in group]

    def start(self, timeout: float = START_TIMEOUT_S) -> bool:
        """True once every child is ready; False if one died or was late (or a stop came)."""
        for group in self.groups:
            for child in group:
                child.start()
            for child in group:
                if not child.wait_ready(timeout, self.stopping):
                    if self.stopping.is_set():
                        return False
                    code = child.exited()
                    why = f"exited with code {code}" if code is not None else f"was not ready in {timeout:.0f} s"
                    self.say(f"{child.name} {why}; see its output above")
                    return False
        return True

    def watch(self, interval: float = 0.25) -> None:
        """Until stop(): restarts dead children (1 s, 2 s, 4 s ... backoff) and reports readiness."""
        while not self.stopping.wait(interval):
            now = time.monotonic()
            for child in self.children:
                code = child.exited()
                if code is not None and child.restart_at is None:
                    if now - child.started_at >= STABLE_AFTER_S:
                        child.restarts = 0
                    delay = min(MAX_BACKOFF_S, 2.0**child.restarts)
                    child.restarts += 1
                    child.restart_at = now + delay
                    self.say(f"{child.name} (pid {child.pid}) exited with code {code}; restarting in {delay:.0f} s")
                elif child.restart_at is not None and now >= child.restart_at:
                    child.start()
                elif code is None and not child.is_ready and child.ready():
                    child.is_ready = True
                    self.say(f"{child.name} is ready (pid {child.pid})")

    def stop(self) -> None:
        """SIGTERM to all, edge first; wait; SIGKILL stragglers."""
        self.stopping.set()
        ordered = list(reversed(self.children))
        for child in ordered:
            child.terminate()
        for child in ordered:
            child.stop()


@dataclass(frozen=True)
class Ports:
    edge: int = 8000
    admin: int = 9901
    gateway: int = 8001
    datastore: int = 50051
    inference: int = 50052
    training: int = 50053
    activelearning: int = 50054


@dataclass
class StackAuth:
    """Auth of a `labelgrid up` stack: on with --auth-users or LABELGRID_AUTH_TOKENS /
    LABELGRID_AUTH_SIGNING_KEY in the environment. The signing key is generated for this run
    unless given, and every service gets its own random service token (passed in env, not argv)."""

    signing_key: str | None = None
    static_tokens: tuple[str, ...] = ()
    service_tokens: dict[str, str] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.signing_key or self.static_tokens)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StackAuth:
        key = os.environ.get("LABELGRID_AUTH_SIGNING_KEY") or None
        raw_tokens = os.environ.get("LABELGRID_AUTH_TOKENS")
        tokens = tuple(token.strip() for token in (raw_tokens or "").split(",") if token.strip())
        if raw_tokens is not None and not tokens:
            raise SystemExit("LABELGRID_AUTH_TOKENS is set but empty: refusing to start with auth silently off")
        if getattr(args, "auth_users", None):
            users = UsersFile.load(args.auth_users)  # InvalidArgument: reported by main()
            if not users.users:
                raise SystemExit(f"users file {str(args.auth_users)!r} has no users: refusing to start")
            key = key or new_signing_key()
        if not key and not tokens:
            return cls()
        key = key or new_signing_key()  # also signs the next-sample download links
        services = {name: secrets.token_urlsafe(32) for name in ("gateway", "inference", "training", "activelearning")}
        return cls(key, tokens, services)

    def env_for(self, service: str) -> dict[str, str]:
        if not self.enabled or self.service_tokens is None:
            return {}
        env = {"LABELGRID_AUTH_SERVICES": ",".join(f"{name}={token}" for name, token in self.service_tokens.items())}
        if self.signing_key:
            env["LABELGRID_AUTH_SIGNING_KEY"] = self.signing_key
        if service in self.service_tokens:
            env["LABELGRID_AUTH_SERVICE_TOKEN"] = self.service_tokens[service]
        return env

    def check_headers(self) -> dict[str, str]:
        """What the supervisor's own checks send: a short access token of its own (user role)."""
        if self.signing_key:
            identity = Identity("labelgrid-up", frozenset({USER}))
            return {"authorization": f"Bearer {issue_access_token(identity, self.signing_key, 60)}"}
        if self.static_tokens:
            return {"authorization": f"Bearer {self.static_tokens[0]}"}
        return {}


def port_list(value: str) -> list[int]:
    """--infer-replica-ports: a comma list of TCP ports."""
    try:
        ports = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ports separated by commas, got {value!r}") from None
    if not ports or not all(0 < port < 65536 for port in ports):
        raise argparse.ArgumentTypeError(f"expected ports (1-65535) separated by commas, got {value!r}")
    return ports


def studies_arg(value: str) -> Path | str:
    """--studies: a folder, or (as MONAI Label takes it) a DICOMweb URL kept as written."""
    return value if value.startswith(("http://", "https://")) else Path(value)


def dicomweb_studies(args: argparse.Namespace) -> str:
    """The DICOMweb root given as --studies, else ''."""
    return args.studies if isinstance(args.studies, str) else ""


def edge_s3_endpoint(args: argparse.Namespace) -> str:
    """The S3 endpoint Envoy fetches image and label downloads from (EnvoySettings.s3_endpoint):
    the datastore's own, resolved by its settings as the datastore child will (the flag, else
    LABELGRID_S3_*, else its default), when it is plain http."""
    if args.backend != "s3" or dicomweb_studies(args):
        return ""
    store = DatastoreSettings(backend="s3", **({"s3_endpoint": args.s3_endpoint} if args.s3_endpoint else {}))
    return "" if store.s3_secure or store.s3_endpoint.startswith("https://") else store.s3_endpoint


def build_stack(args: argparse.Namespace, say: Say) -> tuple[Supervisor, Ports]:
    """The children (datastore, inference or its replicas, training, active learning, gateway,
    Envoy), wired to each other's loopback ports."""
    ports = Ports(
        args.port, args.admin_port, args.gateway_port, args.datastore_port, args.inference_port,
        args.training_port, args.activelearning_port,
    )  # fmt: skip
    host = "127.0.0.1"
    work = Path(args.work_dir)
    datastore_address, inference_address = f"{host}:{ports.datastore}", f"{host}:{ports.inference}"
    training_address, activelearning_address = f"{host}:{ports.training}", f"{host}:{ports.activelearning}"
    common = ["--host", host, "--log-level", args.log_level]
    python = [sys.executable, "-m"]
    pacs = dicomweb_studies(args)
    backend = "dicomweb" if pacs else args.backend
    datastore_argv = [*python, "services.datastore", *common, "--port", str(ports.datastore), "--backend", backend]
    if pacs:  # credentials come from LABELGRID_DICOMWEB_USERNAME/_PASSWORD or _TOKEN, not argv
        datastore_argv += ["--dicomweb-url", pacs, "--state-dir", str(work / "datastore")]
    elif args.backend == "local":
        datastore_argv += ["--root", str(args.studies)]
    else:  # credentials come from LABELGRID_S3_ACCESS_KEY / LABELGRID_S3_SECRET_KEY, not argv
        datastore_argv += ["--state-dir", str(work / "datastore")]
        datastore_argv += ["--s3-endpoint", args.s3_endpoint] if args.s3_endpoint else []
        datastore_argv += ["--s3-bucket", args.s3_bucket] if args.s3_bucket else []
        datastore_argv += ["--s3-public-endpoint", args.s3_public_endpoint] if args.s3_public_endpoint else []
    # Inference: one process on --inference-port, or with --infer-replicas N, N processes on the
    # replica ports behind Envoy, which listens on --inference-port itself (least requests).
    replica_addresses = [f"{host}:{port}" for port in replica_ports(args)]
    inference_argvs = {
        name: [
            *python, "services.infer", *common, "--port", str(port), "--datastore", datastore_address,
            "--device", args.device, "--app", args.app, "--work-dir", str(work / name.replace("inference", "infer")),
        ]
        for name, port in (
            [(f"inference-{n}", port) for n, port in enumerate(replica_ports(args), 1)] or [("inference", ports.inference)]
        )
    }  # fmt: skip
    if replica_addresses:  # batch inference fans its images out over every replica (round robin)
        fan_out = [
            "--batch-address",
            "ipv4:" + ",".join(replica_addresses),
            "--batch-width",
            str(2 * len(replica_addresses)),
        ]
        inference_argvs = {name: [*argv, *fan_out] for name, argv in inference_argvs.items()}
    training_argv = [
        *python, "services.train", *common, "--port", str(ports.training), "--datastore", datastore_address,
        "--device", args.train_device, "--app", args.app, "--work-dir", str(work / "train"),
    ]  # fmt: skip
    activelearning_argv = [
        *python, "services.activelearning", *common, "--port", str(ports.activelearning),
        "--datastore", datastore_address, "--device", args.scoring_device, "--app", args.app,
        "--work-dir", str(work / "activelearning"),
    ]  # fmt: skip
    if args.bundle:  # MONAI Bundles: each model service stores them in the datastore (idempotent) and serves them
        bundles = ["--bundle", ",".join(str(Path(path).resolve()) for path in args.bundle)]
        training_argv, activelearning_argv = ([*argv, *bundles] for argv in (training_argv, activelearning_argv))
        inference_argvs = {name: [*argv, *bundles] for name, argv in inference_argvs.items()}
    gateway_argv = [
        *python, "gateway", *common, "--port", str(ports.gateway),
        "--datastore-address", datastore_address, "--inference-address", inference_address,
        "--training-address", training_address, "--activelearning-address", activelearning_address,
        "--log-file", str(stack_log_file(work)),
    ]  # fmt: skip
    if pacs:  # OHIF's DICOMweb source: /proxy/dicom on the same origin
        gateway_argv += ["--dicomweb-url", pacs]
    elif args.backend == "s3" and args.s3_public_endpoint:  # downloads handed to S3 (307)
        gateway_argv += ["--download-redirect"]
    stack_auth = StackAuth.from_args(args)
    if args.auth_users:
        gateway_argv += ["--auth-users-file", str(Path(args.auth_users).resolve())]
    envoy_config = write_bootstrap(
        EnvoySettings(
            host=args.host,
            port=ports.edge,
            admin_port=ports.admin,
            gateway_address=f"{host}:{ports.gateway}",
            datastore_address=datastore_address,
            inference_address=",".join(replica_addresses) or inference_address,
            inference_listen_port=ports.inference if replica_addresses else 0,
            training_address=training_address,
            activelearning_address=activelearning_address,
            access_log=args.access_log,
            s3_endpoint=edge_s3_endpoint(args),
        ),
        work / "envoy.json",
    )
    env = stack_auth.env_for
    groups = [
        [Child("datastore", datastore_argv, grpc_serving(datastore_address), say, env("datastore"))],
        [
            *(
                Child(name, argv, grpc_serving(f"{host}:{argv[argv.index('--port') + 1]}"), say, env("inference"))
                for name, argv in inference_argvs.items()
            ),
            Child("training", training_argv, grpc_serving(training_address), say, env("training")),
            Child(
                "activelearning", activelearning_argv, grpc_serving(activelearning_address), say, env("activelearning")
            ),
            Child(
                "gateway",
                gateway_argv,
                http_ok(f"http://{host}:{ports.gateway}/info/", stack_auth.check_headers),
                say,
                env("gateway"),
            ),
            Child("envoy", envoy_command(envoy_config), envoy_ready(f"http://127.0.0.1:{ports.admin}"), say),
        ],
    ]
    return Supervisor(groups, say), ports


LOG_FILE_MAX_BYTES = 10 * 1024 * 1024  # then it moves to <name>.1 (one old file kept)


def stack_log_file(work_dir: str | Path) -> Path:
    """Where `labelgrid up` writes the stack's output; the gateway's GET /logs/ tails it."""
    return Path(work_dir) / "logs" / "labelgrid.log"


def make_say(log_file: Path | None = None) -> Say:
    """Prints whole lines from many threads without interleaving them; also appends them to
    `log_file` (bounded: at LOG_FILE_MAX_BYTES it is rotated once)."""
    lock = threading.Lock()
    handle = None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handle = log_file.open("a", encoding="utf-8", errors="replace")

    def say(line: str, source: str = "labelgrid") -> None:
        nonlocal handle
        text = f"{source:>14} | {line}"
        with lock:
            print(text, flush=True)
            if handle is not None and log_file is not None:
                try:
                    handle.write(text + "\n")
                    handle.flush()
                    if handle.tell() >= LOG_FILE_MAX_BYTES:
                        handle.close()
                        os.replace(log_file, log_file.with_name(log_file.name + ".1"))
                        handle = log_file.open("a", encoding="utf-8", errors="replace")
                except OSError:  # a full disk stops the file, never the stack
                    handle = None

    return say


def replica_ports(args: argparse.Namespace) -> list[int]:
    """The ports of the inference replicas: none for one replica (it listens on --inference-port),
    else --infer-replica-ports, or consecutive ports from FIRST_REPLICA_PORT."""
    if args.infer_replicas < 1:
        raise InvalidArgument(f"--infer-replicas must be at least 1, got {args.infer_replicas}")
    given = list(args.infer_replica_ports or [])
    if given and len(given) != args.infer_replicas:
        raise InvalidArgument(
            f"--infer-replica-ports names {len(given)} ports for --infer-replicas {args.infer_replicas}"
        )
    if args.infer_replicas == 1:
        return []
    return given or [FIRST_REPLICA_PORT + n for n in range(args.infer_replicas)]


def up(args: argparse.Namespace) -> int:
    say = make_say(stack_log_file(args.work_dir))
    args.infer_replica_ports = replica_ports(args)
    if problems := port_problems(stack_ports(vars(args), args.host)):
        for problem in [*problems, "labelgrid did not start"]:
            say(problem)
        return 1
    if args.sample_studies and args.backend == "local" and not dicomweb_studies(args):
        subprocess.run([sys.executable, "-m", "services.datastore.sample_studies", str(args.studies)], check=True)
    if not is_loopback(args.host) and not StackAuth.from_args(args).enabled:
        for line in (
            "!" * 78,
            f"WARNING: listening on {args.host} (not loopback) WITHOUT AUTH: anyone who can reach",
            "this port can read, change and delete every image, label and model.",
            "Add users (labelgrid users add NAME --role ROLE --users-file FILE) and start with",
            "--auth-users FILE, or set LABELGRID_AUTH_TOKENS.",
            "!" * 78,
        ):
            say(line)
    supervisor, ports = build_stack(args, say)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if not supervisor.stopping.is_set():
            say(f"{signal.Signals(signum).name}: stopping")
        supervisor.stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if not supervisor.start():
            if supervisor.stopping.is_set():
                return 0
            say("labelgrid did not start")
            return 1
        edge = f"http://{args.host}:{ports.edge}"
        say(
            f"labelgrid is up: MONAI Label API at {edge}/ (docs {edge}/docs), gRPC and gRPC-web at "
            f"{args.host}:{ports.edge}, Envoy admin http://127.0.0.1:{ports.admin}/. Ctrl-C stops it."
        )
        supervisor.watch()
        return 0
    finally:
        supervisor.stop()
        say("labelgrid stopped")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labelgrid", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("up", help="run the whole stack on localhost until Ctrl-C")
    run.add_argument(
        "--studies", type=studies_arg, default=Path("var/studies"),
        help="studies folder (local backend), or a DICOMweb URL http(s)://HOST:PORT/dicom-web (a PACS)",
    )  # fmt: skip
    run.add_argument("--sample-studies", action="store_true", help="fill an empty studies folder with sample volumes")
    run.add_argument("--backend", choices=("local", "s3"), default="local")
    run.add_argument(
        "--s3-endpoint", default="", help="s3 backend: HOST:PORT (keys: env LABELGRID_S3_ACCESS_KEY/_SECRET_KEY)"
    )
    run.add_argument("--s3-bucket", default="")
    run.add_argument(
        "--s3-public-endpoint", default="",
        help="s3 backend: the address clients reach S3 at; image downloads then answer 307 to a presigned GET there",
    )  # fmt: skip
    run.add_argument("--work-dir", type=Path, default=Path("var"), help="scratch space and the generated envoy.json")
    run.add_argument("--host", default="127.0.0.1", help="address Envoy listens on (the services stay on loopback)")
    run.add_argument("--port", type=int, default=Ports.edge, help="Envoy: REST, gRPC and gRPC-web")
    run.add_argument("--admin-port", type=int, default=Ports.admin, help="Envoy admin (loopback)")
    run.add_argument("--gateway-port", type=int, default=Ports.gateway)
    run.add_argument("--datastore-port", type=int, default=Ports.datastore)
    run.add_argument("--inference-port", type=int, default=Ports.inference)
    run.add_argument("--training-port", type=int, default=Ports.training)
    run.add_argument("--activelearning-port", type=int, default=Ports.activelearning)
    run.add_argument(
        "--infer-replicas", type=int, default=1, metavar="N",
        help="inference processes; above 1 Envoy balances them (least requests) on --inference-port",
    )  # fmt: skip
    run.add_argument(
        "--infer-replica-ports", type=port_list, default=[], metavar="P1,P2,...",
        help=f"the replicas' own ports (default: {FIRST_REPLICA_PORT}, {FIRST_REPLICA_PORT + 1}, ...)",
    )  # fmt: skip
    run.add_argument("--device", default="auto", help="inference devices: auto, cpu, cuda, cuda:N")
    run.add_argument("--train-device", default="auto", help="training devices: auto, cpu, cuda, cuda:N")
    run.add_argument(
        "--scoring-device", default="auto", help="active learning scoring devices: auto, cpu, cuda, cuda:N"
    )
    run.add_argument("--app", default="apps.radiology", help="the app package inference serves")
    run.add_argument(
        "--bundle", action="append", type=Path, default=[], metavar="PATH",
        help="a MONAI Bundle (folder or .zip) to serve and train, named after the folder / zip; repeatable",
    )  # fmt: skip
    run.add_argument("--log-level", default="INFO")
    run.add_argument("--access-log", action="store_true", help="Envoy logs every request")
    run.add_argument(
        "--auth-users", type=Path, default=None, metavar="FILE",
        help="turn auth on with the users of FILE (labelgrid users add); signing key: env "
        "LABELGRID_AUTH_SIGNING_KEY, else generated for this run",
    )  # fmt: skip
    users = commands.add_parser("users", help="manage the built-in users of a users file")
    users_commands = users.add_subparsers(dest="users_command", required=True)
    add = users_commands.add_parser("add", help="add or replace a user; the password is read from standard input")
    add.add_argument("name")
    add.add_argument("--role", action="append", required=True, choices=ROLES, help="a role (repeat for more)")
    add.add_argument("--users-file", type=Path, required=True, metavar="FILE")
    add.add_argument("--email", default=None)
    add.add_argument("--full-name", default=None)
    add_sdk_commands(commands)  # the SDK's: models, images, labels, infer, next-sample
    return parser


def users_add(args: argparse.Namespace) -> int:
    """`labelgrid users add`: the password comes from stdin (one line; a terminal is asked twice)."""
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    path = Path(args.users_file)
    users = UsersFile.load(path) if path.exists() else UsersFile()
    users.add(args.name, password, args.role, email=args.email, name=args.full_name)
    users.save(path)
    print(f"user {args.name} ({', '.join(args.role)}) written to {path}")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "up" and dicomweb_studies(args) and (args.sample_studies or args.backend != "local"):
        parser.error("a DICOMweb --studies URL is its own backend: drop --sample-studies and --backend")
    try:
        if args.command == "up":
            sys.exit(up(args))
        if args.command == "users":
            sys.exit(users_add(args))
    except InvalidArgument as err:
        print(f"labelgrid: {err.message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_sdk_command(args))


if __name__ == "__main__":
    main()
