"""The bound model: everything that maps cached features to the shared space, as one object.

    model = BoundModel.load("runs/default/model")
    z = model.encode("text", feats)              # [n, dim], L2-normalised, blend included
    ranked = model.ranking_inputs(z_img, z_txt)  # what retrieval ranks by (correction applied)

It holds the trained projectors (a `ProjectorSpace`, or none for a training-free model), the
training-free space blended in (a fitted baseline and its weight, or none), and the retrieval
correction (or none), for any number of modalities, one of them the anchor. Modalities bound later
(`train --add`: progressive binding) are *added*: each maps its features straight onto the frozen
bound space of the modality it was trained against (`added[m].to`), through a trained projector or
a training-free map (`align/into.py`); nothing bound before changes, and it saves byte-identically. Training reports it,
evaluation scores it, export ships it and the server searches with it: one object, so their
numbers agree by construction. `anybind.align.fit` fits its parts.

Centring (optional, `centred`): each modality's mean bound vector over its training items is
subtracted before the final normalisation, removing the offset between modality centroids (the
modality gap, Liang et al. 2022); benchmarks/modality_gap.py measures what that does to a mixed
index. A blended vector stays [sqrt(w) z1, sqrt(1-w) z2] (each space centred and normalised on its
own); an added modality is centred with its own mean.

Torch is imported only when the model is loaded or used, so reading a bound model's config (and
a bundle's) needs no torch at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import saving
from ..errors import AnybindError

if TYPE_CHECKING:
    import torch

KIND = "bound-model"
CENTRING = "centring"  # the saved part (and folder) holding the per-modality means
ANCHOR_SIDE, PARTNER_SIDE = "image", "text"  # the two sides baselines and corrections name


class Added:
    """A modality bound after the rest: `part` (a ProjectorSpace holding its one projector, or an
    IntoMap) maps its features onto the frozen bound space of modality `to`."""

    def __init__(self, part, to: str, layers: list[str]):
        self.part, self.to, self.layers = part, to, list(layers)

    @property
    def kind(self) -> str:
        if hasattr(part := self.part, "projectors"):
            return "projectors"
        return getattr(part, "added_kind", f"map:{part.name}")  # a bridge names its own kind


class BoundModel:
    """Projectors + blend + retrieval correction, per modality; `encode(modality, features)`."""

    def __init__(self, layers: dict[str, list[str]], anchor: str, *, space=None, baseline=None,
                 weight: float = 1.0, correction=None, recipe: dict | None = None,
                 added: dict[str, Added] | None = None, centres: dict[str, torch.Tensor] | None = None):
        if space is None and baseline is None:
            raise AnybindError("a bound model needs trained projectors, a training-free baseline, or both")
        if anchor not in layers:
            raise AnybindError(f"anchor modality '{anchor}' is not one of {', '.join(layers)}")
        self.layers = {m: list(v) for m, v in layers.items()}
        self.anchor = anchor
        self.space, self.baseline, self.correction = space, baseline, correction
        self.weight = float(weight)  # the trained space's share of a cosine when blended
        self.recipe = recipe
        self.added: dict[str, Added] = {}
        for modality, extra in (added or {}).items():
            self._add(modality, extra)
        self.centres = {}  # modality -> its mean bound vector (subtracted in encode); see `centred`
        for modality, mean in (centres or {}).items():
            self._check(modality)
            if tuple(mean.shape) != (self.dim,):
                raise AnybindError(f"the centre of '{modality}' has shape {tuple(mean.shape)}, not ({self.dim},)")
            self.centres[modality] = mean.detach().float().cpu()

    def _add(self, modality: str, extra: Added) -> None:
        if modality in self.modalities:
            raise AnybindError(f"this model already binds '{modality}': add it under another name")
        if extra.to not in self.modalities:
            raise AnybindError(f"'{modality}' is bound to '{extra.to}', which this model does not bind "
                               f"({', '.join(self.modalities)})")
        self.added[modality] = extra

    def with_added(self, modality: str, part, to: str, layers: list[str]) -> BoundModel:
        """A new model: this one plus `modality`, mapped by `part` onto the bound space of `to`.
        The parts of this model are shared, not copied: nothing of it changes."""
        new = BoundModel(self.layers, self.anchor, space=self.space, baseline=self.baseline, weight=self.weight,
                         correction=self.correction, recipe=self.recipe, added=self.added, centres=self.centres)
        new._add(modality, Added(part, to, layers))
        return new

    # ---- what it is ----------------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        """Every modality, the jointly trained ones first, then the added ones in the order added."""
        return [*self.layers, *self.added]

    def layers_of(self, modality: str) -> list[str]:
        """The encoder layers `modality`'s features are read at."""
        self._check(modality)
        return list(self.added[modality].layers if modality in self.added else self.layers[modality])

    def input_dims(self, modality: str) -> list[int] | None:
        """The feature dims `modality`'s part reads (one per layer), or None when it does not say."""
        self._check(modality)
        part = self.added[modality].part if modality in self.added else self.space
        projectors = getattr(part, "projectors", {})
        if modality not in projectors:
            return None
        proj = projectors[modality]
        return list(proj.in_dim) if isinstance(proj.in_dim, list) else [int(proj.in_dim)]

    def bound_to(self, modality: str) -> str:
        """The jointly trained modality whose space `modality` was bound into (itself for those)."""
        self._check(modality)
        return self.added[modality].to if modality in self.added else modality

    @property
    def blended(self) -> bool:
        return self.space is not None and self.baseline is not None

    def side(self, modality: str) -> str:
        """The side name (image / text) a baseline or correction uses for `modality`."""
        return ANCHOR_SIDE if self.bound_to(modality) == self.anchor else PARTNER_SIDE

    @property
    def dim(self) -> int:
        dims = []
        if self.space is not None:
            dims.append(next(iter(self.space.projectors.values())).out_dim)
        if self.baseline is not None:
            dims.append(self.baseline.out_dim)
        return int(sum(dims))

    def __repr__(self) -> str:
        parts = [p for p, on in (("projectors", self.space), ("blend", self.blended and self.baseline),
                                 ("baseline", not self.blended and self.baseline),
                                 ("correction", self.correction), ("centring", self.centres)) if on]
        extra = "".join(f"; {m} added onto {a.to}" for m, a in self.added.items())
        return f"BoundModel({', '.join(self.modalities)}; anchor {self.anchor}; {' + '.join(parts)}{extra})"

    # ---- encoding ------------------------------------------------------------------------------
    def encode(self, modality: str, feats: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Normalised shared-space rows of one modality's features (one tensor per layer it reads),
        centred when the model centres `modality`."""
        z = self._uncentred(modality, feats)
        return z if modality not in self.centres else self._centre(modality, z)

    def _uncentred(self, modality: str, feats: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        self._check(modality)
        feats = [feats] if isinstance(feats, torch.Tensor) else list(feats)
        if modality in self.added:  # straight onto the whole bound vector of its target, blend included
            return self.added[modality].part.encode(modality, feats)
        parts = []
        if self.space is not None:
            parts.append(self.space.encode(modality, feats))
        if self.baseline is not None:  # baselines read the last layer of each side
            z = self.baseline.encode(self.side(modality), feats[-1])
            parts.append(F.normalize(torch.as_tensor(z).float(), dim=1).to(feats[-1].device))
        if len(parts) == 1:
            return parts[0]
        # side by side: [sqrt(w) z1, sqrt(1-w) z2], so a cosine is w * s1 + (1 - w) * s2
        return torch.cat([parts[0] * self.weight**0.5, parts[1] * (1 - self.weight) ** 0.5], dim=1)

    def segments(self, modality: str) -> list[tuple[int, float]]:
        """(width, share of a cosine) of each run of a bound vector normalised on its own: the
        projectors' and the blended baseline's for a jointly trained modality of a blended model,
        else the whole vector (an added modality's part normalises its output as a whole)."""
        self._check(modality)
        if modality in self.added or not self.blended:
            return [(self.dim, 1.0)]
        width = int(next(iter(self.space.projectors.values())).out_dim)
        return [(width, self.weight), (self.dim - width, 1.0 - self.weight)]

    def _centre(self, modality: str, z: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        z = z - self.centres[modality].to(z.device, z.dtype)
        runs, lo = [], 0
        for width, share in self.segments(modality):
            runs.append(F.normalize(z[:, lo : lo + width], dim=1) * share**0.5)
            lo += width
        return torch.cat(runs, dim=1)

    def centred(self, features: dict[str, list[torch.Tensor] | torch.Tensor]) -> BoundModel:
        """A new model that centres each modality of `features` (its training items' features, one
        tensor per layer it reads) on their mean bound vector; a retrieval correction is fitted again
        on the centred embeddings of the anchor's and its partner's features. Other modalities keep
        their centre (if any); nothing of this model changes."""
        if not features:
            raise AnybindError("centring needs the training features of at least one modality")
        centres = dict(self.centres)
        for modality, feats in features.items():
            z = self._uncentred(modality, feats)
            if len(z) < 2:
                raise AnybindError(f"centring '{modality}' needs at least 2 training rows, not {len(z)}")
            centres[modality] = z.mean(dim=0)
        new = BoundModel(self.layers, self.anchor, space=self.space, baseline=self.baseline, weight=self.weight,
                         correction=self.correction, recipe=self.recipe, added=self.added, centres=centres)
        if self.correction is not None:
            new.correction = new._refit_correction(features)
        return new

    def _refit_correction(self, features: dict):
        from .corrections import build_correction

        partner = next(m for m in self.layers if m != self.anchor)
        if self.anchor not in features or partner not in features:
            raise AnybindError(f"this model's retrieval correction is fitted on '{self.anchor}' and '{partner}' "
                               "embeddings: centre both (give their training features) to fit it again")
        bank = {ANCHOR_SIDE: self.encode(self.anchor, features[self.anchor]),
                PARTNER_SIDE: self.encode(partner, features[partner])}
        return build_correction(**self.correction.config()).fit(bank)

    def ranking_inputs(self, anchor_emb: torch.Tensor, partner_emb: torch.Tensor) -> dict[str, Any]:
        """The keyword arguments of `metrics.retrieval_metrics` that rank as this model does."""
        if self.correction is None:
            return {"image_emb": anchor_emb, "text_emb": partner_emb}
        from .corrections import apply_correction

        return apply_correction(self.correction, anchor_emb, partner_emb)

    def gallery(self, modality: str, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gallery rows as the model ranks them and a per-row score offset (subtract it from every
        query's cosine); (emb, None) without a correction."""
        if self.correction is None:
            return emb, None
        return self.correction.gallery(self.side(modality), emb)

    def to(self, device) -> BoundModel:
        for part in [self.space, *(a.part for a in self.added.values())]:
            if hasattr(part, "to"):
                part.to(device)
        return self

    def _check(self, modality: str) -> None:
        if modality not in self.modalities:
            raise AnybindError(f"this model binds {', '.join(self.modalities)}, not '{modality}'")

    # ---- one folder ----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """A saved part (kind bound-model) with projectors/, baseline/ and correction/ inside."""
        directory = Path(directory)
        parts = {"projectors": self.space, "baseline": self.baseline, "correction": self.correction}
        for name, part in parts.items():
            if part is not None:
                part.save(directory / name)
        for modality, extra in self.added.items():
            extra.part.save(directory / "added" / modality)
        added = {m: {"to": a.to, "layers": a.layers, "kind": a.kind} for m, a in self.added.items()}
        if self.centres:  # one tensor per centred modality, named by it
            saving.save_part(directory / CENTRING, CENTRING, "modality-means", tensors=self.centres)
            parts[CENTRING] = self.centres
        return saving.save_part(directory, KIND, "bound", layers=self.layers, anchor=self.anchor,
                                weight=self.weight, parts=[n for n, p in parts.items() if p is not None],
                                recipe=self.recipe, **({"added": added} if added else {}))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> BoundModel:
        directory = Path(directory)
        info = saving.read_config(directory, KIND)
        parts = set(info["parts"])
        space = baseline = correction = None
        if "projectors" in parts:
            from .space import ProjectorSpace

            space = ProjectorSpace.load(directory / "projectors")
        if "baseline" in parts:
            from .baselines import Baseline

            baseline = Baseline.load(directory / "baseline")
        if "correction" in parts:
            from .corrections import RetrievalCorrection

            correction = RetrievalCorrection.load(directory / "correction")
        added = {m: Added(_load_added(directory / "added" / m, a["kind"]), a["to"], a["layers"])
                 for m, a in (info.get("added") or {}).items()}
        centres = saving.read_part(directory / CENTRING, CENTRING)[1] if CENTRING in parts else None
        return cls(info["layers"], info["anchor"], space=space, baseline=baseline, weight=info["weight"],
                   correction=correction, recipe=info.get("recipe"), added=added, centres=centres)


def _load_added(directory: Path, kind: str):
    if kind == "projectors":
        from .space import ProjectorSpace

        return ProjectorSpace.load(directory)
    if kind.startswith("bridge:"):  # another bound model's modality through a bridge map (align/bridge.py)
        from .bridge import BridgePart

        return BridgePart.load(directory)
    from .into import IntoMap

    return IntoMap.load(directory)


def is_bound_model(directory: str | os.PathLike) -> bool:
    try:
        saving.read_config(directory, KIND)
    except saving.SavedPartError:
        return False
    return True


# ---- centring a trained run on its own training split -------------------------------------------
def split_features(model: BoundModel, stores: dict, fold: int | None, split: str = "train") -> dict:
    """Each store's `split` rows (cross-validation fold `fold`, or the index's fixed split) as
    features at the layers `model` reads for that modality: what `BoundModel.centred` fits on."""
    import numpy as np

    from .data import Side, row_splits

    out = {}
    for modality, store in stores.items():
        rows = np.flatnonzero(row_splits(store, fold) == split)
        layers = model.layers_of(modality)
        out[modality] = Side(modality, store, layers, [store.array(lay) for lay in layers]).rows(rows)
    return out


def run_training_features(run: str | os.PathLike, model: BoundModel) -> dict:
    """The training features of every modality of `model` from the run that trained it: its own
    stores, and for a `train --add` run its source run's before them (each at the fold it trained on)."""
    import json

    from ..features import FeatureStore
    from .frozen import read_source

    run = Path(run)
    if not (run / "stores.json").exists():
        raise AnybindError(f"{run} is not a training run (no stores.json): centre a bound model from its run folder, "
                           "or call BoundModel.centred with its training features")
    stores = {m: FeatureStore.open(p) for m, p in json.loads((run / "stores.json").read_text()).items()}
    source = read_source(run)
    if source is None:
        return split_features(model, {m: s for m, s in stores.items() if m in model.modalities}, run_fold(run))
    origin = Path(source["source"])
    if not (origin / "stores.json").exists():
        raise AnybindError(f"{run} was added onto {origin}, which is not a training run (a bundle?): its "
                           "modalities' training features are unknown, so they cannot be centred")
    own = split_features(model, {source["modality"]: stores[source["modality"]]}, run_fold(run))
    return {**run_training_features(origin, model), **own}


def run_fold(run: Path) -> int | None:
    """The cross-validation fold a run trained on (None: the fixed split), from its checkpoint."""
    import torch

    try:
        return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["split"]["fold"]
    except (OSError, KeyError, RuntimeError) as e:
        raise AnybindError(f"{run}/checkpoint.pt does not say which split the run trained on ({e}): centring "
                           "fits on the training split, so train the run again with this version") from e


def centre_run(run: str | os.PathLike) -> BoundModel:
    """A run's bound model (`run`/model) centred per modality on the run's own training split."""
    model = BoundModel.load(Path(run) / "model")
    return model.centred(run_training_features(run, model))
