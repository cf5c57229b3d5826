"""Progressive binding: what `train --add` trains against — the frozen space of a bound model.

A new modality (audio, say) is bound into an existing model through one of its modalities (the
target, e.g. text): the target's features go through the *source* model as it is (projector,
blend and all: `BoundModel.encode`), and only the new modality's projector learns to land there.
The source is read, never written: the new model shares its parts and saves them byte-identically.

    spec = AddSpec.from_source("bundles/openclipart", modality="audio", to="text")
    train(recipe, {"audio": audio_store, "text": spoken_text_store}, out="runs/audio", add=spec)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import AnybindError
from .bound import BoundModel, is_bound_model

SOURCE_FILE = "source.json"  # in a run folder trained with --add: where its frozen part came from


@dataclass
class AddSpec:
    """Bind `modality` onto the frozen bound space of `to`, in the model at `source`."""

    source: BoundModel
    source_path: Path  # the run, bundle or bound-model folder named
    model_path: Path  # its bound-model folder
    modality: str
    to: str

    @classmethod
    def from_source(cls, source: str | os.PathLike, modality: str, to: str | None = None) -> AddSpec:
        path = Path(source)
        model_path = source_model_folder(path)
        model = BoundModel.load(model_path)
        if modality in model.modalities:
            raise AnybindError(f"{path} already binds '{modality}': add it under another name, e.g. --add {modality}2")
        joint = list(model.layers)
        to = to or ("text" if "text" in joint else model.anchor)
        if to not in joint:
            raise AnybindError(f"--to {to}: the source binds {', '.join(joint)} jointly "
                               f"(a modality added later cannot be a target: bind to the space it was bound into)")
        return cls(model, path.resolve(), model_path.resolve(), modality, to)

    @property
    def fingerprint(self) -> str:
        """A hash of the source model's saved files: a resumed run must train against the same source."""
        from .._hashing import hash_dir

        return hash_dir(self.model_path, patterns=("*",))

    def target_encoding(self) -> dict | None:
        """How the source's features of `to` were computed ({encoder, pooling, precision, dtype}), read
        from the source run's stores or the bundle's bundle.json; None when the source does not say."""
        return source_encoding(self.source_path, self.to)

    def record(self) -> dict:
        """What `source.json` holds: enough for export to find the source's encoders."""
        return {"source": str(self.source_path), "model": str(self.model_path), "modality": self.modality,
                "to": self.to, "fingerprint": self.fingerprint}


def source_model_folder(path: Path) -> Path:
    """The bound-model folder of a run folder, a bundle or a bound-model folder."""
    for candidate in (path, path / "model"):
        if is_bound_model(candidate):
            return candidate
    raise AnybindError(f"{path} is neither a training run (with model/), a bundle, nor a bound-model folder: "
                       "pass what `anybind train` or `anybind export` wrote")


def source_encoding(path: Path, modality: str) -> dict | None:
    """The encoding of `modality`'s features in a run folder or bundle (None: a bare model folder)."""
    if (path / "bundle.json").exists():
        entry = json.loads((path / "bundle.json").read_text()).get("modalities", {}).get(modality)
        return {k: entry.get(k) for k in ("encoder", "pooling", "precision", "dtype")} if entry else None
    if (path / "stores.json").exists():
        stores = json.loads((path / "stores.json").read_text())
        if modality in stores:
            from ..features import FeatureStore
            from ..features.encode import store_encoding

            return store_encoding(FeatureStore.open(stores[modality]))
        upstream = read_source(path)  # an added run holds only its own edge's stores
        return source_encoding(Path(upstream["source"]), modality) if upstream else None
    return None


def check_target_store(add: AddSpec, store) -> None:
    """The target's features must come from the encoder the source model was trained on."""
    from ..features.encode import store_encoding

    want, have = add.target_encoding(), store_encoding(store)
    if want is None:
        return
    diffs = [f"{k}: source {want[k]!r}, store {have[k]!r}" for k in ("encoder", "pooling")
             if want.get(k) is not None and want[k] != have.get(k)]
    if diffs:
        raise AnybindError(f"the {add.to} store {store.path.name} was not extracted as the source model's {add.to} "
                           f"side ({'; '.join(diffs)}): give --store {add.to}=DATASET to extract it as the source was")


def read_source(run: str | os.PathLike) -> dict | None:
    """The `source.json` of a run folder trained with --add, or None."""
    path = Path(run) / SOURCE_FILE
    return json.loads(path.read_text()) if path.exists() else None


class FrozenTarget(nn.Module):
    """The target side during --add training: features -> the source model's bound embedding.

    It has no parameters and holds the source model outside the module tree, so optimisers,
    checkpoints and `state_dict` never see (or change) the source."""

    def __init__(self, source: BoundModel, modality: str):
        super().__init__()
        self._source, self.modality = source, modality
        self.out_dim = source.dim

    def forward(self, feats) -> torch.Tensor:
        return self._source.encode(self.modality, feats)

    def to(self, *args, **kwargs):  # move the source's projectors with it
        self._source.to(*args, **kwargs)
        return super().to(*args, **kwargs)
