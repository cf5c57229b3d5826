"""Recipes: the training settings only (projectors, loss, optimiser, schedule, batch, stopping).

No data and no encoders, so one recipe applies to any pair of stores. One dataclass, loaded
from YAML (a built-in name or a path), overridden with ``--set loss.structure_weight=5``; every
key and value is checked before training starts, and the resolved recipe is saved beside the
outputs.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..atomic import write_text
from ..checks import choice, did_you_mean, integer, number, positive
from ..errors import AnybindError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "configs" / "recipes"


class RecipeError(AnybindError, ValueError):
    """A recipe with an unknown key or a bad value."""


def _default_loss() -> dict[str, Any]:
    return {"name": "infonce"}


@dataclass
class OptimizerConfig:
    name: str = "adamw"  #: adamw | lion
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  #: max gradient norm (0 = no clipping)
    schedule: str = "cosine"  #: cosine (to min_lr_ratio * lr) | constant, both after warm-up
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        choice("optimizer.name", self.name, ("adamw", "lion"), error=RecipeError)
        choice("optimizer.schedule", self.schedule, ("cosine", "constant"), error=RecipeError)
        positive("optimizer.lr", self.lr, error=RecipeError)
        number("optimizer.weight_decay", self.weight_decay, minimum=0, error=RecipeError)
        number("optimizer.grad_clip", self.grad_clip, minimum=0, error=RecipeError)
        integer("optimizer.warmup_steps", self.warmup_steps, minimum=0, error=RecipeError)
        number("optimizer.min_lr_ratio", self.min_lr_ratio, minimum=0, maximum=1, error=RecipeError)
        if len(self.betas) != 2:
            raise RecipeError(f"optimizer.betas must be two numbers in [0, 1), not {self.betas!r}")
        for i, beta in enumerate(self.betas):
            if number(f"optimizer.betas[{i}]", beta, minimum=0, error=RecipeError) >= 1:
                raise RecipeError(f"optimizer.betas must be two numbers in [0, 1), not {self.betas!r}")
        self.betas = tuple(float(b) for b in self.betas)


SHUFFLES = ("full", "blocks")
#: (section, setting, default) of settings added after results were keyed by the resolved recipe
ADDED_LATER = (("train", "shuffle", "full"),)


@dataclass
class TrainConfig:
    batch_size: int = 4096  #: global batch (split over processes under torchrun)
    epochs: int = 40
    max_steps: int | None = None  #: stop after this many steps (None = epochs decide)
    precision: str = "auto"  #: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    seed: int = 0
    val_every: int = 50  #: steps between validation retrievals
    patience: int = 10  #: early stopping: validations without improvement
    metric: str = "mean_R@10"  #: validation metric that picks the best checkpoint
    checkpoint_every: int = 50  #: steps between resumable checkpoints
    captions: str = "all"  #: all: every caption is a pair (all positives counted) | one: one per item per epoch
    #: full: a uniform shuffle each epoch | blocks: runs of 256 consecutive pairs in random order, shuffled
    #: within windows of 16 runs (a memory-mapped store larger than memory is then read in stretches)
    shuffle: str = "full"

    def __post_init__(self):
        integer("train.batch_size", self.batch_size, minimum=2, error=RecipeError)
        integer("train.epochs", self.epochs, minimum=1, error=RecipeError)
        if self.max_steps is not None:
            integer("train.max_steps", self.max_steps, minimum=1, error=RecipeError)
        choice("train.precision", self.precision, ("auto", "bf16", "fp32"), error=RecipeError)
        integer("train.seed", self.seed, error=RecipeError)
        integer("train.val_every", self.val_every, minimum=1, error=RecipeError)
        integer("train.patience", self.patience, minimum=1, error=RecipeError)
        integer("train.checkpoint_every", self.checkpoint_every, minimum=1, error=RecipeError)
        choice("train.captions", self.captions, ("all", "one"), error=RecipeError)
        choice("train.shuffle", self.shuffle, SHUFFLES, error=RecipeError)
        if not self.metric.startswith(("mean_R@", "image_to_text_R@", "text_to_image_R@")):
            raise RecipeError(f"train.metric must be a retrieval recall such as mean_R@10, not {self.metric!r}")


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    dim: int = 512  #: dimension of the shared space
    #: projector per modality ("default" applies to any modality not named), e.g. {"default": {"name": "linear"}}
    projector: dict[str, dict] = field(default_factory=lambda: {"default": {"name": "linear"}})
    #: the loss: {name: infonce | siglip | a registered loss, that loss's own options...,
    #: structure_<option>: the STRUCTURE regulariser (structure_weight > 0 turns it on)};
    #: resolved with every default filled in (anybind.align.losses.resolve_loss_section)
    loss: dict[str, Any] = field(default_factory=_default_loss)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    #: inference-time retrieval correction fitted on a bank of training embeddings and shipped with
    #: the model, e.g. {"name": "qb-norm", "beta": 20} (anybind.align.corrections); none by default
    correction: dict = field(default_factory=lambda: {"name": "none"})
    #: blend the trained space with a training-free baseline's: scores become
    #: weight * trained + (1 - weight) * baseline, e.g. {"name": "nn-transfer", "weight": 0.5, "k": 10}
    blend: dict = field(default_factory=lambda: {"name": "none"})

    def __post_init__(self):
        from .losses import resolve_loss_section  # imports torch: only once a recipe is built

        integer("dim", self.dim, minimum=1, error=RecipeError)
        self.loss = resolve_loss_section(self.loss, error=RecipeError)
        if not isinstance(self.correction, dict) or "name" not in self.correction:
            raise RecipeError("correction must be a mapping with a 'name' (none, qb-norm, invgc, ...)")
        self._check_blend()
        if not isinstance(self.projector, dict) or not self.projector:
            raise RecipeError("projector must map a modality (or 'default') to {name: ..., options}")
        for modality, spec in self.projector.items():
            if not isinstance(spec, dict) or "name" not in spec:
                raise RecipeError(f"projector.{modality} needs a 'name' (linear, mlp, star, lowrank, layermix)")

    def _check_blend(self) -> None:
        if not isinstance(self.blend, dict) or "name" not in self.blend:
            raise RecipeError("blend must be a mapping with a 'name' (none, nn-transfer, ...) and a weight")
        if self.blend["name"] == "none":
            return
        weight = number("blend.weight", _as_float(self.blend.get("weight", 0.5)), error=RecipeError)
        if not 0 < weight < 1:
            raise RecipeError(f"blend.weight must be in (0, 1), not {self.blend.get('weight')!r}")
        if "weight" in self.blend:
            self.blend["weight"] = weight

    def projector_for(self, modality: str) -> dict:
        spec = self.projector.get(modality) or self.projector.get("default")
        if spec is None:
            raise RecipeError(f"the recipe names no projector for '{modality}' and no 'default'")
        return dict(spec)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for section, key, default in ADDED_LATER:  # at their default, left out: earlier results and checkpoints stay valid
            if d[section].get(key) == default:
                del d[section][key]
        d["loss"] = dict(d["loss"])  # a plain mapping, for YAML and JSON
        d["optimizer"]["betas"] = list(d["optimizer"]["betas"])
        return d

    def save(self, path: str | os.PathLike) -> None:
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _as_float(value: Any) -> Any:
    """YAML reads 1e-3 (no dot), nan and inf as text: such text is read as the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# ---- building from dicts, with type checks ----------------------------------------------------------
def _coerce(key: str, value, tp):
    """Check/convert one value against its annotated type; a clear error names the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key} must be true or false, not {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise RecipeError(f"{key} must be a whole number, not {value!r}")
        return value
    if tp is float:
        value = _as_float(value)  # then the dataclass's checks refuse nan and inf, naming the key
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key} must be a number, not {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key} must be text, not {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key} must be a list, not {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key} must be a mapping, not {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix.rstrip('.') or 'the recipe'} must be a mapping, not {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        hint = did_you_mean(unknown[0], fields) if len(unknown) == 1 else ""
        raise RecipeError(f"unknown recipe key{'s' if len(unknown) > 1 else ''} "
                          + ", ".join(f"'{prefix}{k}'" for k in unknown)
                          + f"{hint}: {prefix.rstrip('.') or 'the recipe'} has " + ", ".join(fields))
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(f"{prefix}{k}", v, tp)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise RecipeError(f"{prefix.rstrip('.') or 'recipe'}: {e}") from e


def recipe_from_dict(data: dict) -> Recipe:
    return _build(Recipe, data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`key.sub=value` strings (values parsed as YAML) applied to a recipe dict."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set takes key=value (e.g. loss.structure_weight=5), not {item!r}")
        value = yaml.safe_load(raw) if raw.strip() else None
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {key}: '{p}' is not a section")
        node[parts[-1]] = value
    return data


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | os.PathLike = "default", overrides: list[str] | None = None) -> Recipe:
    """A built-in recipe by name (`anybind recipes` lists them) or a YAML file, plus --set overrides.

    >>> r = load_recipe("structure", ["loss.structure_weight=5", "train.batch_size=1024"])
    >>> r.loss.structure_weight
    5.0
    """
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise RecipeError(f"no recipe '{name_or_path}': built-in recipes are {', '.join(available_recipes())}, "
                              "or give a path to a .yaml file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {e}") from e
    return recipe_from_dict(apply_overrides(data, overrides or []))
