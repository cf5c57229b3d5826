"""Recipes: every built-in parses and names registered parts; overrides and bad values."""

import re
import sys
from pathlib import Path

import pytest
import yaml

from anybind.align import available_recipes, load_recipe
from anybind.align.losses import LOSSES
from anybind.align.projectors import PROJECTORS, projector_options
from anybind.align.recipe import RecipeError
from anybind.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from _synthetic import planted_stores  # noqa: E402


def test_the_published_recipes_exist():
    assert {"default", "structure", "sail", "freeze-align", "linear"} <= set(available_recipes())


@pytest.mark.parametrize("name", available_recipes())
def test_every_recipe_parses_and_names_registered_parts(name):
    r = load_recipe(name)
    assert r.loss.name in LOSSES
    for spec in r.projector.values():
        spec = dict(spec)
        kind = spec.pop("name")
        assert kind in PROJECTORS
        assert set(spec) <= set(projector_options(kind)), (kind, spec)
    assert r.description.strip()


def test_published_settings():
    s, sail, fa = load_recipe("structure"), load_recipe("sail"), load_recipe("freeze-align")
    assert s.projector["default"]["name"] == "linear" and s.loss.temperature == 0.05
    assert not s.loss.learn_temperature and s.loss.structure_weight == 10
    assert sail.projector["default"] == {"name": "star", "hidden_mult": 8} and sail.loss.name == "siglip"
    assert fa.projector["default"]["name"] == "mlp" and fa.loss.learn_temperature
    # the default is freeze-align's training (stopping earlier) blended with caption transfer
    default = load_recipe("default").to_dict()
    same = ("dim", "projector", "loss", "optimizer")
    assert {k: default[k] for k in same} == {k: fa.to_dict()[k] for k in same}
    assert default["blend"] == {"name": "nn-transfer", "weight": 0.5, "k": 10, "bank": 10000, "member_weighted": True}
    assert default["train"]["patience"] == 3


def test_overrides_and_types():
    r = load_recipe("structure", ["loss.structure_weight=5", "train.batch_size=2048", "optimizer.lr=1e-4",
                                  "projector.text={name: mlp, depth: 3}", "train.max_steps=null"])
    assert r.loss.structure_weight == 5.0 and r.train.batch_size == 2048 and r.optimizer.lr == 1e-4
    assert r.projector_for("text") == {"name": "mlp", "depth": 3}
    assert r.projector_for("image") == {"name": "linear"}


@pytest.mark.parametrize("override,message", [
    ("loss.nope=1", "unknown recipe key 'loss.nope'"),
    ("loss.temprature=0.1", "unknown recipe key 'loss.temprature' (did you mean 'temperature'?)"),
    ("loss.structure_wieght=5", "unknown recipe key 'loss.structure_wieght' (did you mean 'structure_weight'?)"),
    ("loss.name=siglip", "unknown recipe key 'loss.learn_temperature': loss 'siglip' takes"),
    ("loss=[infonce]", "loss must be a mapping"),
    ("colour=red", "unknown recipe key 'colour'"),
    ("train.batch_sze=8", "unknown recipe key 'train.batch_sze' (did you mean 'batch_size'?)"),
    ("loss.name=triplet", "loss.name must be one of all-pairs, anchor-infonce, anchor-siglip, infonce, siglip, symile"),
    ("loss.structure_levels=0", "loss.structure_levels: structure: levels must be at least 1"),
    ("loss.temperature=2", "loss.temperature: infonce: temperature must be in"),
    ("train.batch_size=many", "train.batch_size must be a whole number"),
    ("train.batch_size=1", "train.batch_size must be at least 2"),
    ("optimizer.lr=-1", "optimizer.lr must be above 0"),
    ("optimizer.betas=[0.9]", "optimizer.betas"),
    ("train.metric=accuracy", "train.metric must be a retrieval recall"),
    ("projector.image=linear", "projector.image needs a 'name'"),
    ("loss", "--set takes key=value"),
])
def test_bad_recipes_name_the_problem(override, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe("structure", [override])


@pytest.mark.parametrize("override,key", [
    ("optimizer.lr=nan", "optimizer.lr"),
    ("optimizer.lr=inf", "optimizer.lr"),
    ("optimizer.lr=.nan", "optimizer.lr"),
    ("optimizer.lr=-.inf", "optimizer.lr"),
    ("optimizer.weight_decay=inf", "optimizer.weight_decay"),
    ("optimizer.grad_clip=nan", "optimizer.grad_clip"),
    ("optimizer.min_lr_ratio=nan", "optimizer.min_lr_ratio"),
    ("optimizer.betas=[0.9, nan]", "optimizer.betas[1]"),
    ("loss.temperature=nan", "loss.temperature"),
    ("loss.structure_weight=inf", "loss.structure_weight"),
    ("loss.structure_tau=.nan", "loss.structure_tau"),
    ("blend={name: nn-transfer, weight: nan}", "blend.weight"),
])
def test_non_finite_numbers_are_refused_naming_the_key(override, key):
    with pytest.raises(RecipeError, match=f"^{re.escape(key)}.*finite number"):
        load_recipe("structure", [override])


def test_loss_section_overrides_and_round_trip(tmp_path):
    r = load_recipe("structure", ["loss.temperature=0.1", "loss.structure_tau=2e-2", "loss.chunk_size=512"])
    assert r.loss.temperature == 0.1 and r.loss.structure_tau == 0.02 and r.loss["chunk_size"] == 512
    assert r.loss.structure_weight == 10.0 and r.loss.structure_warmup_steps == 50
    # switching losses replaces the section; structure_ keys set the regulariser under any loss
    s = load_recipe("structure", ["loss={name: siglip, scale_init: 5}", "loss.structure_weight=2"])
    assert s.loss.name == "siglip" and s.loss.scale_init == 5.0 and s.loss.structure_weight == 2.0
    assert "temperature" not in s.loss
    # the resolved recipe (every default filled in) is saved as YAML and loads back the same
    r.save(tmp_path / "recipe.yaml")
    assert type(r.to_dict()["loss"]) is dict
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again.to_dict() == r.to_dict() and again.loss == r.loss
    # a resolved recipe from before (LossConfig wrote structure_tau: null) still loads
    old = r.to_dict()
    old["loss"]["structure_tau"] = None
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    assert load_recipe(tmp_path / "old.yaml").loss.structure_tau == 0.05


def test_recipe_file_path(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump({"name": "mine", "projector": {"default": {"name": "mlp"}}, "dim": 64}))
    r = load_recipe(f)
    assert r.name == "mine" and r.dim == 64
    with pytest.raises(RecipeError, match="no recipe 'nosuch'"):
        load_recipe("nosuch")


def test_cli_recipes_and_train(tmp_path, capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "structure" in out and "STRUCTURE x10" in out
    assert main(["recipes", "sail", "--set", "dim=256"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["dim"] == 256
    img, txt = planted_stores(tmp_path / "stores", n_items=300)
    args = ["train", "--recipe", "linear", "--store", f"image={img.path}", "--store", f"text={txt.path}",
            "--set", "train.max_steps=20", "--set", "train.batch_size=128", "--set", "train.val_every=10",
            "--out", str(tmp_path / "run"), "-q"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "trained (best, step" in out and "baseline: nn-transfer" in out and "chance" in out
    assert (tmp_path / "run" / "best" / "config.json").exists()
    assert main(args[:-3] + ["--set", "loss.bogus=1", "--out", str(tmp_path / "bad"), "-q"]) == 2
    assert "unknown recipe key 'loss.bogus'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["train", "--store", "image=nonsense", "--store", f"text={txt.path}", "-q"]) == 2
    assert "ENCODER+DATASET" in capsys.readouterr().err
