"""Atomic writes and content hashing.

A failed stage must never leave a half-written index, model or corpus behind: every output is
written into a temporary sibling and renamed into place only when complete.

Temporary siblings are named after the writing process (`.<name>.tmp-<pid>-<random>`, and
`.<name>.old-<pid>` for the previous version of a directory during its swap). A process killed
with SIGKILL cannot clean up after itself: the next write of the same target removes what dead
processes left behind, and restores the previous version if the kill fell between the two
renames of a swap (the target is then missing and its `.old-<pid>` backup is complete).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create owner-only files; outputs get the usual umask-based mode instead."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp-(?P<tmp_pid>\d+)-.*|old-(?P<old_pid>\d+))$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-{os.getpid()}-"


def clean_leftovers(target: str | Path) -> list[Path]:
    """Remove the temporary siblings of `target` left by dead processes (killed mid-write), after
    restoring `target` from a dead swap's `.old-<pid>` backup when `target` itself is missing.
    Siblings of live processes (a concurrent writer) are left alone. Returns what was removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for path in sorted(target.parent.iterdir()):
        match = _LEFTOVER.match(path.name)
        if not match or match["name"] != target.name:
            continue
        pid = int(match["tmp_pid"] or match["old_pid"])
        if _pid_alive(pid):
            continue
        if match["old_pid"] and not target.exists():
            os.replace(path, target)  # killed between the two renames: the backup is the last good version
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))
    _public(tmp, directory=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, backup)
    os.replace(tmp, target)
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `target` for writing; rename it over `target` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    fd, tmp_name = tempfile.mkstemp(prefix=_tmp_prefix(target), dir=target.parent)
    tmp = Path(tmp_name)
    _public(tmp)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path for a library that writes files itself (pandas, faiss); renamed on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    fd, tmp_name = tempfile.mkstemp(prefix=_tmp_prefix(target), suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    _public(tmp)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_hash(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def path_hash(path: str | Path, exclude: tuple[str, ...] = ()) -> str:
    """Content hash of a file, or of a directory tree (relative names and contents; hidden files
    and files named in `exclude` skipped)."""
    path = Path(path)
    if path.is_file():
        return file_hash(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name not in exclude):
        digest.update(os.fsencode(child.relative_to(path)))  # the name's bytes: a non-UTF-8 name hashes too
        digest.update(file_hash(child).encode())
    return digest.hexdigest()


def json_hash(obj: Any) -> str:
    return text_hash(json.dumps(obj, sort_keys=True, default=str))
