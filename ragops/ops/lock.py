"""The workspace lock: one pipeline (flow, CLI command or DVC stage) writes a workspace at a time.

A `filelock` on `ws.lock_file`. A second run waits up to `timeout_s` seconds, then gives up with
`WorkspaceBusy` (a one-line error naming the lock file and the holder), so a scheduled run that
collides with a manual one skips instead of corrupting artifacts.

The lock is re-entrant within one thread of one process: a `pipeline` flow holds it and the
`refresh` and `evaluate` subflows it calls (same thread) take it again without blocking. Another
thread or process blocks on the OS lock as it should, except a descendant process of the holder
(e.g. a `ragops <stage>` that a `dvc repro` started by the holder runs): the holder exports
$RAGOPS_WORKSPACE_LOCK, and a process whose ancestor holds the lock works under it instead of
waiting for its own parent (a deadlock).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from ragops.errors import RagopsError
from ragops.paths import Workspace


LOCK_ENV = "RAGOPS_WORKSPACE_LOCK"


class WorkspaceBusy(RagopsError):
    """Another run holds the workspace lock."""


@dataclass
class _Held:
    lock: FileLock
    thread: int
    depth: int


_held: dict[str, _Held] = {}
_registry_lock = threading.Lock()


def _holder_file(lock_file: Path) -> Path:
    return lock_file.with_name(lock_file.name + ".holder")


def lock_holder(ws: Workspace) -> dict | None:
    """Who holds (or last held) the lock: {pid, host, since, what}, or None."""
    try:
        return json.loads(_holder_file(ws.lock_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _describe_holder(ws: Workspace) -> str:
    holder = lock_holder(ws)
    if not holder:
        return "another run"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"'{holder.get('what', 'a run')}' (pid {holder.get('pid')} on {holder.get('host')}, since {since})"


def _held_by_ancestor(ws: Workspace) -> bool:
    """True when $RAGOPS_WORKSPACE_LOCK names this workspace's lock and a live ancestor of this
    process that the holder file confirms holds it."""
    try:
        inherited = json.loads(os.environ.get(LOCK_ENV) or "{}")
        pid = int(inherited.get("pid", 0))
    except (ValueError, TypeError, AttributeError):
        return False
    if inherited.get("lock") != str(ws.lock_file) or not pid or pid == os.getpid():
        return False
    holder = lock_holder(ws) or {}
    if holder.get("pid") != pid or holder.get("host") != socket.gethostname():
        return False
    import psutil

    try:
        return pid in {parent.pid for parent in psutil.Process().parents()}
    except psutil.Error:
        return False


@contextlib.contextmanager
def workspace_lock(ws: Workspace, timeout_s: float = 0, what: str = "ragops") -> Iterator[bool]:
    """Hold the workspace lock for the block; yields True when this call took the OS lock, False
    when it re-entered a lock this thread already holds. Raises `WorkspaceBusy` after `timeout_s`.
    """
    key = str(ws.lock_file)
    me = threading.get_ident()
    with _registry_lock:
        held = _held.get(key)
        if held is not None and held.thread == me:
            held.depth += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield False
        finally:
            with _registry_lock:
                _held[key].depth -= 1
        return
    if _held_by_ancestor(ws):
        yield False  # the process that started us holds it for us
        return

    ws.lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(ws.lock_file), thread_local=False, is_singleton=False)
    try:
        lock.acquire(timeout=max(float(timeout_s), 0.0), poll_interval=0.2)
    except Timeout:
        raise WorkspaceBusy(
            f"workspace {ws.root} is busy: {_describe_holder(ws)} holds {ws.lock_file.name}; "
            f"waited {timeout_s:g} s (orchestration.lock_timeout_s), skipping"
        ) from None
    with _registry_lock:
        _held[key] = _Held(lock, me, 1)
    previous_env = os.environ.get(LOCK_ENV)
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "what": what}
        with contextlib.suppress(OSError):
            _holder_file(ws.lock_file).write_text(json.dumps(holder), encoding="utf-8")
        os.environ[LOCK_ENV] = json.dumps({"lock": key, "pid": os.getpid()})  # for processes we start
        yield True
    finally:
        if previous_env is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = previous_env
        with _registry_lock:
            _held.pop(key, None)
        with contextlib.suppress(OSError):
            _holder_file(ws.lock_file).unlink()
        lock.release(force=True)


def is_locked(ws: Workspace) -> bool:
    """True when some other thread or process holds the workspace lock right now."""
    try:
        with workspace_lock(ws, timeout_s=0, what="probe"):
            return False
    except WorkspaceBusy:
        return True
