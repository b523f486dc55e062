"""Run locks: how workers (processes or machines sharing a study folder) claim a run. A worker
creates `<run folder>.lock` exclusively and rewrites its heartbeat while the run trains; a lock
whose process is gone (same host) or whose heartbeat is older than LOCK_TIMEOUT (any host) is
stale and taken over."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Protocol


class Node(Protocol):
    """What a lock needs of a run: its folder (a study's `study.Node` is one)."""
    folder: Path


def lock_path(node: Node) -> Path:
    return node.folder.with_name(node.folder.name + ".lock")


LOCK_TIMEOUT = float(os.environ.get("ADAPTERBENCH_LOCK_TIMEOUT", 300))   # seconds without a heartbeat
HEARTBEAT_EVERY = float(os.environ.get("ADAPTERBENCH_HEARTBEAT", 30))


def lock_record() -> dict:
    """Who holds a lock: host, pid, the SLURM job (array job_task when in an array), heartbeat."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job else os.environ.get("SLURM_JOB_ID")
    now = time.time()
    return {"pid": os.getpid(), "host": socket.gethostname(), "job": job, "started": now, "heartbeat": now}


def try_lock(node: Node) -> bool:
    """Claim a run by creating its lock exclusively; a stale lock (its process gone on this
    host, or no heartbeat for LOCK_TIMEOUT seconds from any host) is taken over."""
    path = lock_path(node)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            seen = read_lock(path)
            if not _stale(path, seen) or not _take_over(path, seen):
                return False
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(lock_record(), f)
        return True
    return False


def read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _take_over(path: Path, seen: dict | None) -> bool:
    """Move a stale lock aside; if what was moved is not the lock judged stale (another worker
    took it over meanwhile), put it back."""
    grave = path.with_name(f"{path.name}.stale-{socket.gethostname()}-{os.getpid()}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return True                      # gone already: try to create it
    if read_lock(grave) != seen:
        try:
            os.link(grave, path)         # put the fresh lock back (fails if a new one exists)
        except FileExistsError:
            pass
        grave.unlink(missing_ok=True)
        return False
    grave.unlink(missing_ok=True)
    return True


def _stale(path: Path, info: dict | None = None) -> bool:
    info = info if info is not None else read_lock(path)
    if info is None:
        return time.time() - path.stat().st_mtime > 60 if path.exists() else True
    if time.time() - float(info.get("heartbeat", info.get("time", 0))) > LOCK_TIMEOUT:
        return True                      # no heartbeat for too long: dead, on whatever host
    if info.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, KeyError):
        return False
    return False


class Heartbeat:
    """While a run trains, rewrite its lock's heartbeat every HEARTBEAT_EVERY seconds (a thread)."""

    def __init__(self, node: Node):
        import threading
        self.path, self.stop = lock_path(node), threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        from adapterbench.fileio import write_json
        while not self.stop.wait(HEARTBEAT_EVERY):
            info = read_lock(self.path)
            if info is None or info.get("pid") != os.getpid():
                return                   # no longer ours
            info["heartbeat"] = time.time()
            try:
                write_json(self.path, info)
            except Exception:
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)


def unlock(node: Node) -> None:
    lock_path(node).unlink(missing_ok=True)


def locked(node: Node) -> bool:
    return lock_path(node).exists() and not _stale(lock_path(node))
