"""The README's "extending anybind" recipes work: a loss, a projector, a dataset, an encoder backend."""

import sys
from pathlib import Path

import torch
from torch import nn

from _synthetic import planted_stores
from anybind.align import load_recipe, train
from anybind.align.losses import LOSSES, build_objective, register_loss
from anybind.align.projectors import PROJECTORS, Projector, register_projector
from anybind.data import DATA_PREFIXES, load_dataset, register_dataset_prefix
from anybind.encoders import create_encoder
from anybind.encoders.registry import BACKENDS, register_backend

sys.path.insert(0, str(Path(__file__).parent))


class CosineMSE(nn.Module):
    """A toy loss on embeddings with one option: pull each pair to within a margin (no negatives)."""

    def __init__(self, *, margin: float = 0.0):
        super().__init__()
        self.margin = margin

    def forward(self, za, zb, pos=None):
        return (1 - torch.nn.functional.cosine_similarity(za, zb) - self.margin).clamp_min(0).mean()


@register_projector("tiny-test-affine")
class Affine(Projector):
    def __init__(self, in_dim, out_dim, *, bias: bool = True):
        super().__init__(in_dim, out_dim, {"bias": bias})
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x):
        return self.proj(x)


def test_a_registered_loss_and_projector_train(tmp_path):
    # a loss with an option: one class plus its registration; the recipe sets the option
    register_loss("cosine-mse", CosineMSE)
    try:
        img, txt = planted_stores(tmp_path / "stores", n_items=200)
        recipe = load_recipe("linear", ["loss={name: cosine-mse}", "loss.margin=0.1", "loss.structure_weight=1",
                                        "projector.default={name: tiny-test-affine}",
                                        "train.max_steps=5", "train.batch_size=64", "train.val_every=5"])
        assert recipe.loss.margin == 0.1 and recipe.to_dict()["loss"]["margin"] == 0.1
        objective = build_objective(recipe.loss)
        assert isinstance(objective.contrastive, CosineMSE) and objective.contrastive.margin == 0.1
        assert objective.structure is not None
        result = train(recipe, {"image": img, "text": txt}, out=tmp_path / "run", progress=False, baselines=False)
        assert result.steps == 5 and "tiny-test-affine" in PROJECTORS
    finally:
        LOSSES.unregister("cosine-mse")


def test_a_users_dataset_lister_and_backend(cache):
    register_dataset_prefix("mine", "plugins.mydata:list_mine", help="a user's own lister")
    register_backend("myrandom", "anybind.encoders.random:create", needs=("numpy",))
    try:
        index = load_dataset("mine:hello")
        assert len(index) == 12 and index.column("caption")[0] == ["hello caption 0"]
        assert create_encoder("myrandom:text").modality == "text"
    finally:
        DATA_PREFIXES.unregister("mine")
        BACKENDS.unregister("myrandom")


def test_a_users_baseline_and_correction_register_build_save_and_load(tmp_path):
    """The README's one-liners for baselines and corrections: a registered part is built by name,
    fitted, saved as a saved part (config.json + weights.safetensors) and loaded back by name."""
    from dataclasses import dataclass

    import numpy as np

    from anybind.align import baselines, corrections
    from anybind.align.baselines import Baseline, PairedArrays, register_baseline
    from anybind.align.corrections import RetrievalCorrection, register_correction

    @register_baseline("tiny-test-mean-shift")
    @dataclass(eq=False)
    class MeanShift(Baseline):
        scale: float = 1.0

        def _fit(self, train):
            self._means = {"image": torch.from_numpy(train.image.mean(0)), "text": torch.from_numpy(train.text.mean(0))}
            self._fitted_info["out_dim"] = train.image.shape[1]

        def _encode(self, side, x):
            return self.scale * (x - self._means[side])

    @register_correction("tiny-test-shift")
    class Shift(RetrievalCorrection):
        needs_bank = False

        def __init__(self, *, by: float = 0.5):
            super().__init__({"by": by})

        def _gallery(self, modality, x, chunk_size):
            return x, torch.full((len(x),), self._params["by"])

    try:
        rng = np.random.default_rng(0)
        pairs = PairedArrays.one_to_one(rng.normal(size=(20, 4)).astype(np.float32),
                                        rng.normal(size=(20, 4)).astype(np.float32))
        fitted = baselines.build_baseline("tiny-test-mean-shift", scale=2.0).fit(pairs)
        fitted.save(tmp_path / "b")
        again = Baseline.load(tmp_path / "b")
        assert torch.equal(again.encode("text", pairs.text), fitted.encode("text", pairs.text))
        corrections.build_correction("tiny-test-shift", by=0.25).save(tmp_path / "c")
        shift = RetrievalCorrection.load(tmp_path / "c")
        assert shift.config() == {"name": "tiny-test-shift", "by": 0.25}
        assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["config.json", "weights.safetensors"]
    finally:
        baselines.BASELINES.unregister("tiny-test-mean-shift")
        corrections.CORRECTIONS.unregister("tiny-test-shift")
