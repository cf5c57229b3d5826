"""The atomic writer: whole files or nothing, folders swapped only when complete, and a swap cut
by a kill finished on the next run."""

import os
import subprocess
import sys

import pytest

from anybind import atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.json"
    atomic.write_json(path, {"a": 1})

    def broken(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(atomic.WriteError, match="no space left on the device"):
        atomic.write_with(path, broken)
    assert path.read_text() == '{\n "a": 1\n}\n' and os.listdir(tmp_path) == ["f.json"]


def test_staged_dir_swaps_only_a_complete_folder(tmp_path):
    out = tmp_path / "out"
    with atomic.staged_dir(out) as stage:
        (stage / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic.staged_dir(out, replace=True) as stage:
        (stage / "a").write_text("2")
        raise RuntimeError("the build failed")
    assert (out / "a").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["out"]
    with pytest.raises(atomic.WriteError, match="pass --overwrite"), atomic.staged_dir(out):
        pass


def test_a_swap_killed_between_its_renames_is_finished_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a pid that has exited
    os.replace(out, tmp_path / f".out.{dead}.old")  # the kill fell after moving the old folder away
    (tmp_path / f".out.{dead}.partial").mkdir()
    with atomic.staged_dir(out, replace=True, is_ours=lambda p: (p / "a").exists()) as stage:
        (stage / "a").write_text("new")
    assert (out / "a").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]
