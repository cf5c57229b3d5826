"""One writer per store: a lock file beside the store's parts, taken over when its holder died.

    with StoreLock(store_folder):     # waits while another process writes the same store
        ...                           # write shards, merge, write the manifest

The lock is a file (``.lock`` in the store folder) created with ``O_EXCL``, holding the holder's
pid, host, start time and process start ticks. A waiter polls it, says once who holds it, and
takes it over when the holder is a dead process on this host (SIGKILL, power loss, a recycled
pid). A holder on another host cannot be checked from here: the waiter keeps waiting and says
which file to remove if that process is gone.

Everything outside this module uses only ``StoreLock(path)``, ``acquire``/``release`` and the
context manager, so a store on object storage can get a lock of its own form (a conditional
put) behind the same interface.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import pid_alive, proc_start_ticks
from ..errors import StoreError

log = logging.getLogger("anybind.extract")
LOCK_FILE = ".lock"
UNWRITTEN_GRACE_S = 10.0  # a lock file still empty after this long was left by a killed creator


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: enough to find the process and to tell a recycled pid from it."""

    pid: int
    host: str
    since: str  # local time the lock was taken, for people
    proc_start: int | None = None  # the process's start time in clock ticks since boot (Linux)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.since}"


def me() -> Holder:
    pid = os.getpid()
    return Holder(pid, socket.gethostname(), time.strftime("%Y-%m-%dT%H:%M:%S%z"), proc_start_ticks(pid))


class StoreLock:
    """An exclusive lock on the store at `path` (a folder, created when missing)."""

    def __init__(self, path: str | os.PathLike, *, name: str = LOCK_FILE, poll_s: float = 0.5,
                 timeout_s: float | None = None):
        self.path, self.file = Path(path), Path(path) / name
        self.poll_s, self.timeout_s = poll_s, timeout_s
        self.held = False

    # ---- the interface ---------------------------------------------------------------------
    def acquire(self) -> StoreLock:
        """Take the lock, waiting while a live process holds it; a dead holder's lock is taken over."""
        self.path.mkdir(parents=True, exist_ok=True)
        start, told = time.monotonic(), None
        while not self._try_create():
            holder = self.holder()
            if holder is not None and self._is_dead(holder):
                log.warning("%s: taking over the lock of %s, which is no longer running", self.path, holder.describe())
                self._take_over(holder)
                continue
            if holder != told and holder is not None:
                told = holder
                log.warning("%s is being written by another anybind process (%s): waiting for it to finish%s",
                            self.path, holder.describe(), self._remote_hint(holder))
            if self.timeout_s is not None and time.monotonic() - start > self.timeout_s:
                raise StoreError(f"gave up waiting for the lock on {self.path}, held by "
                                 f"{holder.describe() if holder else 'another process'}{self._remote_hint(holder)}")
            time.sleep(self.poll_s)
        self.held = True
        return self

    def release(self) -> None:
        if self.held:
            self.held = False
            self.file.unlink(missing_ok=True)

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def holder(self) -> Holder | None:
        """The current holder, None when the lock is free or its file is still being written."""
        return _read_holder(self.file)

    # ---- the file form -----------------------------------------------------------------------
    def _try_create(self) -> bool:
        try:
            fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(asdict(me()), sort_keys=True) + "\n").encode())
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            self.file.unlink(missing_ok=True)
            from ..atomic import explain

            raise StoreError(f"could not write the lock {self.file}: {explain(e)}") from e
        os.close(fd)
        return True

    def _is_dead(self, holder: Holder) -> bool:
        if holder.host != socket.gethostname():
            return False  # another machine's process: cannot be checked from here
        return not pid_alive(holder.pid, holder.proc_start)

    def _take_over(self, seen: Holder) -> None:
        """Remove a dead holder's lock file, unless another waiter replaced it meanwhile.

        The rename is atomic, so of several waiters one moves the file; if what it moved is not
        the dead holder's lock (a faster waiter already took over and locked), it is put back.
        """
        grave = self.file.with_name(f"{self.file.name}.{os.getpid()}.tmp")  # cleaned as a stale tmp if we die here
        try:
            os.rename(self.file, grave)
        except FileNotFoundError:
            return
        if _read_holder(grave) != seen:
            with contextlib.suppress(FileExistsError):
                os.link(grave, self.file)
        grave.unlink(missing_ok=True)

    def _remote_hint(self, holder: Holder | None) -> str:
        if holder is None or holder.host == socket.gethostname():
            return ""
        return f" (if that process is gone, remove {self.file})"


def _read_holder(file: Path) -> Holder | None:
    """The holder written in a lock file; an empty one left by a killed creator reads as dead."""
    try:
        text = file.read_text()
        age = time.time() - file.stat().st_mtime
    except OSError:
        return None
    try:
        return Holder(**json.loads(text))
    except (ValueError, TypeError):
        if age < UNWRITTEN_GRACE_S:
            return None  # being written right now
        return Holder(pid=-1, host=socket.gethostname(), since="?", proc_start=None)
