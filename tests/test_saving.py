"""Saved parts: one contract, the same bytes from any process, old formats refused by version."""

import subprocess
import sys

import pytest

from anybind import saving

SAVE = """
import sys, torch
from anybind.align.projectors import build_projector
from anybind.align.space import ProjectorSpace
torch.manual_seed(0)
space = ProjectorSpace({"image": build_projector("mlp", 12, 8), "text": build_projector("star", 6, 8)},
                       {"image": ["final"], "text": ["layer.2", "final"][1:]})
space.save(sys.argv[1])
"""


def test_two_processes_save_the_same_part_to_the_same_bytes(tmp_path):
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", SAVE, str(tmp_path / name)], check=True)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 5  # the space's config, and a config + weights per projector
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_a_part_of_another_kind_or_version_is_refused_by_name(tmp_path):
    saving.save_part(tmp_path / "p", "projector", "linear", {"bias": True})
    assert saving.read_config(tmp_path / "p", "projector")["options"] == {"bias": True}
    with pytest.raises(saving.SavedPartError, match="holds a saved 'projector', not a baseline"):
        saving.read_config(tmp_path / "p", "baseline")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text('{"name": "linear"}')
    with pytest.raises(saving.SavedPartError, match="format 1; this anybind reads format 2"):
        saving.read_config(tmp_path / "old", "projector")
