"""The one atomic writer: every whole-file write goes through here, every growing log appends here.

A write goes to a temporary file in the same folder, is flushed and fsynced, renamed over the
target, and the folder is fsynced, so a kill or a power cut leaves the old file or the new one,
never half of either. A failed write (a full disk, a read-only folder) removes its temporary
file and raises `WriteError` naming the path and what ran out.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import AnybindError


class WriteError(AnybindError, OSError):
    """A file or folder that could not be written."""


def tmp_name(path: Path) -> Path:
    """The temporary sibling a write of `path` goes through (hidden, per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_with(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then fsync it and move it onto `path`.

    An object-store path (`anybind.features.storage.ObjectPath`) writes itself: the file is filled
    locally and PUT whole, the object store's form of the rename."""
    if hasattr(path, "write_with"):
        return path.write_with(write)
    path = Path(path)
    tmp = tmp_name(path)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"could not write {path}: {explain(e)}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """JSON with a trailing newline; key order as given (callers build dicts in a fixed order)."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def append_line(path: str | os.PathLike, line: str, fsync: bool = True) -> None:
    """Append one line to a growing log (a kill loses at most the line being written); `fsync`
    also makes it survive a power loss. A log that a checkpoint makes durable (`fsync_file` before
    the checkpoint) skips that per line: on a busy disk one fsync a training step cost 30x the step."""
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line.rstrip("\n") + "\n")
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
    except OSError as e:
        raise WriteError(f"could not append to {path}: {explain(e)}") from e


def append_json(path: str | os.PathLike, record: Any, fsync: bool = True) -> None:
    append_line(path, json.dumps(record), fsync)


def fsync_file(path: str | os.PathLike) -> None:
    """Make what was written to `path` durable (nothing to do when it does not exist)."""
    _fsync(path, quiet=False)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (a no-op where folders cannot be opened)."""
    _fsync(path, quiet=True)


def _fsync(path: str | os.PathLike, quiet: bool) -> None:
    """fsync `path` if it exists; `quiet`: any OSError too is ignored (folders some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    except OSError:
        if quiet:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not quiet:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, *, replace: bool = False,
               is_ours: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Build a folder beside `out` and move it into place only when the block succeeds.

    With `replace`, an existing `out` is swapped out only after the new one is complete, and
    only when ``is_ours(out)`` says it is a folder anybind wrote (a user's folder is refused).
    A failure leaves `out` as it was.
    """
    out = Path(out)
    recover_swap(out)
    check_replaceable(out, replace, is_ours)
    stage = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        if out.exists():
            os.replace(out, old)
        os.replace(stage, out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def recover_swap(out: str | os.PathLike) -> None:
    """Finish what a killed `staged_dir` left: put back the old folder when the kill fell between
    its two renames, and remove the staging folders of writers that are gone."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for left in sorted(out.parent.glob(f".{out.name}.*.old")) + sorted(out.parent.glob(f".{out.name}.*.partial")):
        pid = left.name[len(out.name) + 2 :].rsplit(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue  # another writer's, still at work (one of ours from before is stale here)
        if left.suffix == ".old" and not out.exists():
            os.replace(left, out)
        else:
            shutil.rmtree(left, ignore_errors=True)


def clean_stale_tmp(folder: str | os.PathLike) -> None:
    """Remove the temporary files (`tmp_name`: `.NAME.PID.tmp`) of writers that died in `folder`:
    killed, or out of disk. An object store holds none: its writes are staged locally."""
    if hasattr(folder, "write_with"):
        return
    for tmp in Path(folder).glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2] if tmp.name.count(".") >= 3 else ""
        if not (pid.isdigit() and (int(pid) == os.getpid() or pid_alive(int(pid)))):
            tmp.unlink(missing_ok=True)


def pid_alive(pid: int, proc_start: int | None = None) -> bool:
    """True while process `pid` of this host runs (and, given `proc_start`, is still that process)."""
    if pid <= 0:  # os.kill(0 or -1, ...) would address a process group, not one process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    now = proc_start_ticks(pid)
    if now == -1:
        return False
    return proc_start is None or now is None or now == proc_start


def proc_start_ticks(pid: int) -> int | None:
    """A process's start time in ticks since boot (/proc/PID/stat field 22), None where unknown,
    -1 for a zombie (killed, not yet reaped): with the pid, it tells a recycled pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    return int(fields[19]) if fields[0] != "Z" else -1


def check_replaceable(out: str | os.PathLike, replace: bool,
                      is_ours: Callable[[Path], bool] | None = None) -> None:
    """Refuse, before any work, an output folder that exists and may not be replaced."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not replace:
            raise WriteError(f"{out} exists and is not empty: choose another output or pass --overwrite")
        if is_ours is not None and not is_ours(out):
            raise WriteError(f"{out} is not a folder anybind wrote: refusing to overwrite it "
                             "(remove it yourself, or choose another output)")


def explain(e: OSError) -> str:
    """A reader's account of an OSError: what ran out, or what was refused."""
    if e.errno == errno.ENOSPC:
        return "no space left on the device: free some disk space (or choose another --cache / --out) and run again"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded: free some space and run again"
    if e.errno == errno.EFBIG:
        return "the file grew past the size allowed here (ulimit -f)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{e.strerror or e}: the folder is not writable"
    return str(e.strerror or e)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
