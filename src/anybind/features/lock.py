"""One writer per store: a lock file beside the store's parts, taken over when its holder died.

    with StoreLock(store_folder):     # waits while another process writes the same store
        ...                           # write shards, merge, write the manifest

The lock is a file (``.lock`` in the store folder) created with ``O_EXCL``, holding the holder's
pid, host, start time and process start ticks. A waiter polls it, says once who holds it, and
takes it over when the holder is a dead process on this host (SIGKILL, power loss, a recycled
pid). A holder on another host cannot be checked from here: the waiter keeps waiting and says
which file to remove if that process is gone.

Everything outside this module uses only ``StoreLock(path)``, ``acquire``/``release`` and the
context manager. A store on an object store (``s3://``) gets `ObjectStoreLock` behind the same
interface: the lock is an object created with a conditional PUT (``If-None-Match: *``: of two
writers exactly one creates it), refreshed by a heartbeat (a conditional PUT on its own ETag)
while held. A waiter takes it over when its holder is a dead process on this host, or when its
heartbeat is older than ``ANYBIND_S3_LOCK_STALE_S`` (120 s) by the server's clock, removing it
with a conditional DELETE on the ETag it judged, so two waiters cannot both take it over.
The one race left: a holder paused for longer than the stale time (a suspended laptop) loses
its lock without knowing until its next heartbeat, which then fails and says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

from ..atomic import pid_alive, proc_start_ticks
from ..errors import StoreError
from .storage import ObjectPath, as_path, s3_endpoint

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

    def __new__(cls, path=None, **_):
        if cls is StoreLock and isinstance(as_path(path), ObjectPath):
            return super().__new__(ObjectStoreLock)
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike, *, name: str = LOCK_FILE, poll_s: float = 0.5,
                 timeout_s: float | None = None):
        self.path = as_path(path)
        self.file = self.path / name
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


# ---- the object-store form ---------------------------------------------------------------------------
HEARTBEAT_S = 30.0


def _stale_s() -> float:
    return float(os.environ.get("ANYBIND_S3_LOCK_STALE_S", 120))


def _s3_client():
    from .._deps import require

    require("boto3", "writing a feature store to an object store (its lock)", extra="scale")
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint())


def _refused(e: Exception) -> bool:
    """A conditional request that did not hold (412), or lost to a concurrent one (409)."""
    return getattr(e, "response", {}).get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict")


class ObjectStoreLock(StoreLock):
    """The lock of a store on an object store: a ``.lock`` object, created only when absent."""

    def __init__(self, path, **options):
        super().__init__(path, **options)
        self._client = _s3_client()
        self._etag: str | None = None
        self._seen: tuple[Holder, str, float] | None = None  # (holder, its ETag, its age in s)
        self._beat: tuple[threading.Event, threading.Thread] | None = None

    def _try_create(self) -> bool:
        body = (json.dumps(asdict(me()), sort_keys=True) + "\n").encode()
        try:
            reply = self._client.put_object(Bucket=self.file.bucket, Key=self.file.key, Body=body, IfNoneMatch="*")
        except Exception as e:  # botocore's errors are built at run time: told apart by their code
            if _refused(e):
                return False
            raise StoreError(f"could not write the lock {self.file}: {e}") from e
        self._etag = reply["ETag"]
        self._start_heartbeat(body)
        return True

    def holder(self) -> Holder | None:
        try:
            reply = self._client.get_object(Bucket=self.file.bucket, Key=self.file.key)
        except Exception:  # noqa: BLE001 - gone meanwhile (or unreadable): free, try again
            return None
        server_now = parsedate_to_datetime(reply["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = (server_now - reply["LastModified"]).total_seconds()  # both by the server's clock
        try:
            holder = Holder(**json.loads(reply["Body"].read()))
        except (ValueError, TypeError):
            holder = Holder(pid=-1, host="?", since="?")  # a garbled lock: judged by its age alone
        self._seen = (holder, reply["ETag"], age)
        return holder

    def _is_dead(self, holder: Holder) -> bool:
        if holder.host == socket.gethostname() and holder.pid != os.getpid():
            return not pid_alive(holder.pid, holder.proc_start)
        return self._seen is not None and self._seen[0] == holder and self._seen[2] > _stale_s()

    def _take_over(self, seen: Holder) -> None:
        """Delete the lock only if it is still the one judged dead (its ETag): one waiter wins."""
        if self._seen is None or self._seen[0] != seen:
            return
        with contextlib.suppress(Exception):
            self._client.delete_object(Bucket=self.file.bucket, Key=self.file.key, IfMatch=self._seen[1])

    def _start_heartbeat(self, body: bytes) -> None:
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(min(HEARTBEAT_S, _stale_s() / 4)):
                try:
                    self._etag = self._client.put_object(Bucket=self.file.bucket, Key=self.file.key, Body=body,
                                                         IfMatch=self._etag)["ETag"]
                except Exception as e:  # noqa: BLE001 - said, and the beat stops: the lock is not ours now
                    log.error("%s: lost the lock (%s): another writer may have taken it over", self.path, e)
                    return

        self._beat = (stop, threading.Thread(target=beat, name=f"lock-heartbeat {self.file}", daemon=True))
        self._beat[1].start()

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._beat is not None:  # stopped first: a beat in flight would change the ETag
            self._beat[0].set()
            self._beat[1].join()
        with contextlib.suppress(Exception):  # already taken over: nothing of ours to remove
            self._client.delete_object(Bucket=self.file.bucket, Key=self.file.key, IfMatch=self._etag)

    def _remote_hint(self, holder: Holder | None) -> str:
        if holder is None:
            return ""
        return (f" (if that process is gone, the lock is taken over once its heartbeat is {_stale_s():.0f} s old, "
                f"or remove {self.file})")
