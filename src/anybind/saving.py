"""The one way a part saves itself: a folder with ``config.json`` and ``weights.safetensors``.

    save_part(folder, "projector", "mlp", options={"depth": 2, ...}, tensors=state_dict)
    config, tensors = read_part(folder, "projector")     # refuses another kind or format

``config.json`` holds ``format`` (this contract's version), ``kind`` (projector, baseline,
correction, bound-model, ...), ``name`` (the registered name that rebuilds it), ``options`` (the
keyword options it was built with) and any ``extra`` fields the part needs. A saved part names
registered parts, never import paths, and holds no pickles. Both files are written atomically;
the weights file has no metadata, so the same tensors give the same bytes.

Torch is imported only when tensors are written or read: a bundle can be inspected without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import atomic
from .errors import AnybindError

FORMAT = 2  # version 1 was four different layouts (config.json, correction.json, baseline.json, bound.json)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


class SavedPartError(AnybindError):
    """A folder that is not a saved part of the expected kind, or one written by another version."""


def save_part(directory: str | os.PathLike, kind: str, name: str, options: dict | None = None,
              tensors: dict | None = None, **extra: Any) -> Path:
    """Write `directory`/config.json (+ weights.safetensors when there are tensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tensors:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic.write_with(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    else:
        (directory / WEIGHTS_FILE).unlink(missing_ok=True)
    config = {"format": FORMAT, "kind": kind, "name": name, "options": options or {}, **extra}
    atomic.write_json(directory / CONFIG_FILE, config)
    return directory


def read_config(directory: str | os.PathLike, kind: str | None = None) -> dict:
    """The part's config, checked for `kind` and format version."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise SavedPartError(f"{directory} is not a saved anybind {kind or 'part'} (no {CONFIG_FILE})") from None
    except (OSError, ValueError) as e:
        raise SavedPartError(f"{path} is unreadable ({e}): the folder is damaged; save it again") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format", 1) if isinstance(config, dict) else None  # format 1 wrote none
        raise SavedPartError(f"{directory} was written in saved-part format {found!r}; this anybind reads format "
                             f"{FORMAT}: train or export it again with this version")
    if kind is not None and config.get("kind") != kind:
        raise SavedPartError(f"{directory} holds a saved {config.get('kind')!r}, not a {kind}")
    return config


def read_part(directory: str | os.PathLike, kind: str | None = None) -> tuple[dict, dict]:
    """(config, tensors) of a saved part; tensors are CPU torch tensors ({} when none were saved)."""
    directory = Path(directory)
    config = read_config(directory, kind)
    path = directory / WEIGHTS_FILE
    if not path.exists():
        return config, {}
    from safetensors.torch import load_file

    try:
        return config, load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise SavedPartError(f"{path} is unreadable ({e}): the folder is damaged; save it again") from e
