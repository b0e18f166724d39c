"""Start and stop the local servers ragops uses: a Prefect server (schedules, UI) and an MLflow
tracking server / UI on the project's SQLite store.

Every server runs in its own process group (`start_new_session=True`), listens on 127.0.0.1 by
default, writes its log to `.cache/ragops/servers/<name>-<port>.log`, and is stopped by signalling the whole
group: SIGINT first (the Prefect worker/runner ignores SIGTERM), then SIGTERM, then SIGKILL. This
also takes down the helpers those servers spawn (uvicorn workers, MLflow's `huey_consumer` job
processes) which would otherwise be orphaned.

The Prefect server has no authentication of its own, and anything that can reach it can start a
deployment. So it is hardened: CORS origins are the server's own URLs (not `*`), CSRF protection
is on, a `Host` other than the server's names is refused (DNS rebinding), and binding beyond the
loopback interface is refused without an auth string (`PREFECT_SERVER_API_AUTH_STRING`; clients
set the same value in `PREFECT_API_AUTH_STRING`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ragops.env import tracking_uri
from ragops.errors import RagopsError
from ragops.paths import Workspace

HOST = "127.0.0.1"


class ServerError(RagopsError):
    """A server did not start (the message names its log file) or did not stop."""


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def servers_dir(ws: Workspace) -> Path:
    return ws.cache_dir / "servers"


def state_file(ws: Workspace, kind: str) -> Path:
    """Where a running server of this workspace is recorded (`prefect.json`, `mlflow.json`)."""
    return servers_dir(ws) / f"{kind}.json"


def running_server(ws: Workspace, kind: str) -> str | None:
    """The URL of this workspace's running `kind` server ("prefect" or "mlflow") started by ragops
    (e.g. `ragops server` in another shell), if it answers its health check; else None."""
    try:
        state = json.loads(state_file(ws, kind).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state["url"] if _http_ok(state.get("health_url", "")) else None


def _live(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    pids = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return pids


@dataclass
class ServerProcess:
    """A server started by ragops: its process (the leader of its own process group), URL and log."""

    name: str
    url: str
    health_url: str
    process: subprocess.Popen
    log_path: Path
    port: int
    known_pids: set[int] = field(default_factory=set)
    state_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def pgid(self) -> int:
        return self.process.pid  # start_new_session=True: the server leads its own group

    def pids(self) -> list[int]:
        """Every live process of this server: its group, plus descendants seen earlier (in case one
        moved to another group)."""
        self._remember_descendants()
        return sorted({*group_pids(self.pgid), *(p for p in self.known_pids if _live(p))})

    def alive(self) -> bool:
        return bool(self.pids())

    def healthy(self) -> bool:
        return bool(self.health_url) and _http_ok(self.health_url)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _remember_descendants(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.known_pids.update(child.pid for child in psutil.Process(self.pid).children(recursive=True))

    def wait_healthy(self, timeout_s: float = 120) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"{self.name} exited with code {self.process.returncode} before becoming healthy; "
                    f"log: {self.log_path}\n{self.log_tail()}"
                )
            if self.healthy():
                self._remember_descendants()
                if self.state_path is not None:
                    self.state_path.parent.mkdir(parents=True, exist_ok=True)
                    self.state_path.write_text(json.dumps({"url": self.url, "health_url": self.health_url, "pid": self.pid, "port": self.port}))
                return self
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"{self.name} was not healthy at {self.health_url} after {timeout_s:g} s; log: {self.log_path}\n{self.log_tail()}")

    def stop(self, timeout_s: float = 15) -> None:
        """Stop the whole process group: SIGINT, then SIGTERM, then SIGKILL, `timeout_s` apart.

        Raises ServerError if anything survives SIGKILL."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            if not pids:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, sig)
            for pid in pids:  # stragglers outside the group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if os.getpgid(pid) != self.pgid:
                        os.kill(pid, sig)
            deadline = time.monotonic() + (timeout_s if sig != signal.SIGKILL else 5)
            while time.monotonic() < deadline:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=0.2)  # reap the leader so it does not linger as a zombie
                if not self.pids():
                    break
                time.sleep(0.2)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1)
        if self.state_path is not None:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(self.state_path.read_text(encoding="utf-8")).get("pid") == self.pid:
                    self.state_path.unlink()
        left = self.pids()
        if left:
            raise ServerError(f"{self.name}: processes {left} survived SIGKILL")

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def prefect_server_security(host: str, port: int, auth_string: str | None = None) -> tuple[dict[str, str], list[str]]:
    """The Prefect settings (environment) and allowed `Host` names of a server bound to `host:port`.

    Raises ServerError for a non-loopback `host` without an auth string."""
    loopback = is_loopback(host)
    if not loopback and not auth_string:
        raise ServerError(
            f"refusing to serve Prefect on {host}: beyond 127.0.0.1 anyone who can reach the port could start "
            "deployments. Set an auth string (PREFECT_SERVER_API_AUTH_STRING=user:password, or --auth-string; "
            "clients then set PREFECT_API_AUTH_STRING to the same value)"
        )
    names = ["127.0.0.1", "localhost"] + ([] if loopback else [host, socket.gethostname(), socket.getfqdn()])
    names = list(dict.fromkeys(n for n in names if n and n not in ("0.0.0.0", "::")))
    env = {
        "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ",".join(f"http://{name}:{port}" for name in names),
        "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
    }
    if auth_string:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
    # Bound to every interface, the names clients use are unknowable here: the auth string guards it.
    allowed_hosts = names if loopback or host not in ("0.0.0.0", "::") else ["*"]
    return env, allowed_hosts


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _spawn(name: str, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {name}: {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() signals the group
        )


def _base_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_RUN_ID", None)
    env.setdefault("DO_NOT_TRACK", "true")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.update(extra or {})
    return env


def start_prefect_server(
    ws: Workspace,
    *,
    port: int | None = None,
    host: str = HOST,
    auth_string: str | None = None,
    prefect_home: str | Path | None = None,
    log_dir: str | Path | None = None,
    extra_env: dict[str, str] | None = None,
    timeout_s: float = 180,
    wait: bool = True,
) -> ServerProcess:
    """The Prefect server (API, UI, scheduler) on `host:port` (default 127.0.0.1) with PREFECT_HOME
    inside the project (`.prefect/`, the SQLite database lives there), hardened as the module says
    (`ragops.ops.prefect_app`). `auth_string` defaults to $PREFECT_SERVER_API_AUTH_STRING and is
    required beyond loopback. Returns once `/api/health` answers."""
    auth_string = auth_string or os.environ.get("PREFECT_SERVER_API_AUTH_STRING") or None
    port = port or free_port()
    security_env, allowed_hosts = prefect_server_security(host, port, auth_string)
    if port_in_use(port):
        raise ServerError(f"port {port} on {HOST} is already in use (choose another with --port)")
    home = Path(prefect_home or ws.root / ".prefect").resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = _base_env(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": host,
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            **security_env,
            **(extra_env or {}),
        }
    )
    env.pop("PREFECT_API_URL", None)  # the server must not try to talk to another server
    local = HOST if host in ("0.0.0.0", "::") or is_loopback(host) else host
    url = f"http://{local}:{port}"
    log_path = Path(log_dir or servers_dir(ws)) / f"prefect-{port}.log"
    argv = [sys.executable, "-m", "ragops.ops.prefect_app", "--host", host, "--port", str(port), "--allowed-hosts", ",".join(allowed_hosts)]
    server = ServerProcess(
        "prefect server", url, f"{url}/api/health", _spawn("prefect server", argv, env, log_path, ws.root), log_path, port,
        state_path=state_file(ws, "prefect"),
    )
    return server.wait_healthy(timeout_s) if wait else server


def start_mlflow_server(
    ws: Workspace,
    *,
    port: int | None = None,
    backend_store_uri: str | None = None,
    artifacts_destination: str | Path | None = None,
    log_dir: str | Path | None = None,
    extra_env: dict[str, str] | None = None,
    timeout_s: float = 180,
    wait: bool = True,
) -> ServerProcess:
    """`mlflow server --host 127.0.0.1 --workers 1` on the project's SQLite store
    (`mlruns/mlflow.db`) with artifacts under `mlruns/artifacts`. Job execution is off (no
    `huey_consumer` processes). Returns once `/health` answers."""
    port = port or free_port()
    if port_in_use(port):
        raise ServerError(f"port {port} on {HOST} is already in use (choose another with --port)")
    ws.mlruns.mkdir(parents=True, exist_ok=True)
    store = backend_store_uri or tracking_uri(ws.root)
    artifacts = Path(artifacts_destination or ws.mlruns / "artifacts").resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    env = _base_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(extra_env or {})})
    env.pop("MLFLOW_TRACKING_URI", None)
    url = f"http://{HOST}:{port}"
    log_path = Path(log_dir or servers_dir(ws)) / f"mlflow-{port}.log"
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--host", HOST, "--port", str(port), "--workers", "1",
        "--backend-store-uri", store,
        "--artifacts-destination", str(artifacts),
    ]  # fmt: skip
    server = ServerProcess(
        "mlflow server", url, f"{url}/health", _spawn("mlflow server", argv, env, log_path, ws.root), log_path, port,
        state_path=state_file(ws, "mlflow"),
    )
    return server.wait_healthy(timeout_s) if wait else server


def start_process(
    name: str, argv: list[str], *, cwd: str | Path, log_path: str | Path, env: dict[str, str] | None = None, health_url: str = ""
) -> ServerProcess:
    """Any long-running helper (e.g. a `serve` loop) in its own process group, logging to a file;
    stopped like the servers (SIGINT first). `health_url` may be empty."""
    process = _spawn(name, argv, _base_env(env), Path(log_path), Path(cwd))
    return ServerProcess(name, health_url, health_url, process, Path(log_path), 0)


def stop_all(*servers: ServerProcess | None, timeout_s: float = 15) -> None:
    """Stop several servers (last started first); every one is attempted even if another fails."""
    errors = []
    for server in reversed([s for s in servers if s is not None]):
        try:
            server.stop(timeout_s)
        except Exception as error:  # noqa: BLE001 - collect, then report all
            errors.append(str(error))
    if errors:
        raise ServerError("; ".join(errors))
