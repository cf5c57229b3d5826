"""The README's "extending anybind" recipes work: a loss, a projector, a dataset, an encoder backend."""

import sys
from pathlib import Path

import torch
from torch import nn

from _synthetic import planted_stores
from anybind.align import load_recipe, train
from anybind.align.losses import LOSSES
from anybind.align.projectors import PROJECTORS, Projector, register_projector
from anybind.data import PREFIXES, load_dataset
from anybind.encoders import create_encoder
from anybind.encoders.registry import BACKENDS, register_backend

sys.path.insert(0, str(Path(__file__).parent))


class CosineMSE(nn.Module):
    """A toy loss on embeddings: pull each pair together (no negatives)."""

    def __init__(self, *, chunk_size=None):
        super().__init__()

    def forward(self, za, zb, pos=None):
        return (1 - torch.nn.functional.cosine_similarity(za, zb)).mean()


@register_projector("tiny-test-affine")
class Affine(Projector):
    def __init__(self, in_dim, out_dim, *, bias: bool = True):
        super().__init__(in_dim, out_dim, {"bias": bias})
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x):
        return self.proj(x)


def test_a_registered_loss_and_projector_train(tmp_path, monkeypatch):
    monkeypatch.setitem(LOSSES, "cosine-mse", CosineMSE)
    img, txt = planted_stores(tmp_path / "stores", n_items=200)
    recipe = load_recipe("linear", ["loss.name=cosine-mse", "projector.default={name: tiny-test-affine}",
                                    "train.max_steps=5", "train.batch_size=64", "train.val_every=5"])
    result = train(recipe, {"image": img, "text": txt}, out=tmp_path / "run", progress=False, baselines=False)
    assert result.steps == 5 and "tiny-test-affine" in PROJECTORS


def test_a_users_dataset_lister_and_backend(cache, monkeypatch):
    monkeypatch.setitem(PREFIXES, "mine", "plugins.mydata:list_mine")
    index = load_dataset("mine:hello")
    assert len(index) == 12 and index.column("caption")[0] == ["hello caption 0"]
    monkeypatch.setitem(BACKENDS, "myrandom", BACKENDS["random"])
    register_backend("myrandom", BACKENDS["random"])
    assert create_encoder("myrandom:text").modality == "text"
