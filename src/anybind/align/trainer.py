"""The one training loop: projectors on cached features, any recipe.

    result = train(load_recipe("structure"), {"image": img_store, "text": txt_store}, out="runs/s1")

Deterministic and resumable: the batch order of an epoch comes from (seed, epoch), dropout and
sub-batch sampling are reseeded every step, and a checkpoint holds everything else, so a killed
run resumes to the same result. Validation retrieval runs every `val_every` steps; the best
model is kept; training stops early after `patience` validations without improvement.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import atomic
from .._hashing import hash_obj
from ..device import select_device
from ..errors import AnybindError
from ..features import FeatureStore
from ..metrics.retrieval import chance_retrieval_metrics
from ..tracking import Loggers, as_loggers, record_metrics
from . import distributed as dist
from .bound import BoundModel
from .data import PairedFeatures, Pairs, block_permutation
from .fit import (
    INTO_MAP_BASELINES,
    added_map_model,
    fit_baseline,
    fit_blend,
    fit_correction,
    joint_retrieval,
    split_retrieval,
    tuple_retrieval,
)
from .frozen import SOURCE_FILE, AddSpec, FrozenTarget, check_target_store
from .losses import build_objective
from .optim import build_optimizer, lr_lambda
from .projectors import build_projector
from .recipe import Recipe
from .space import ProjectorSpace

log = logging.getLogger("anybind.train")
CHECKPOINT = "checkpoint.pt"
METRICS_LOG = "metrics.jsonl"
BEST = "best"  # the best projectors so far (resumable training state)
MODEL = "model"  # the finished bound model: what evaluation scores and export ships


@dataclass
class TrainResult:
    out: Path
    best_step: int
    best_metric: float
    steps: int
    val: dict  # retrieval of the finished bound model on the val split
    model: BoundModel | None = None
    baselines: dict = field(default_factory=dict)  # name -> val metrics
    chance: dict = field(default_factory=dict)
    stopped_early: bool = False
    seconds: float = 0.0


# ---- building the parts --------------------------------------------------------------------------
def build_model(recipe: Recipe, data: PairedFeatures, add: AddSpec | None = None) -> ProjectorSpace:
    """A projector per modality; with `add`, the target side is the frozen source model and the
    new modality's projector lands on its whole bound vector (`add.source.dim`)."""
    projectors, layers = {}, {}
    for name in data.names:
        side = data.side(name)
        layers[name] = side.layers
        if add is not None and name == add.to:
            projectors[name] = FrozenTarget(add.source, name)
            continue
        spec = recipe.projector_for(name)
        kind = spec.pop("name")
        if len(side.layers) > 1 and kind != "layermix":
            raise AnybindError(f"the {name} side reads {len(side.layers)} layers ({', '.join(side.layers)}): "
                               f"use projector.{name}.name=layermix, or one layer")
        in_dim = side.dims if kind == "layermix" else side.dims[0]
        projectors[name] = build_projector(kind, in_dim, add.source.dim if add else recipe.dim, **spec)
    return ProjectorSpace(projectors, layers)


INPUT_FIT_ROWS = 50_000  # rows a projector's input statistics (pca) are fitted on, at most


def fit_inputs(space: ProjectorSpace, data: PairedFeatures, train_pairs: Pairs, seed: int) -> None:
    """Let each trained projector fit what it derives from its training inputs (`fit_inputs`), on the
    distinct training rows of its side (a seeded sample of at most INPUT_FIT_ROWS)."""
    for name, proj in space.projectors.items():
        if not getattr(proj, "fits_inputs", False):  # a frozen target has nothing to fit
            continue
        rows = np.unique(train_pairs.rows_of(name, data))
        if len(rows) > INPUT_FIT_ROWS:
            rows = np.sort(np.random.default_rng([seed, 31]).choice(rows, INPUT_FIT_ROWS, replace=False))
        feats = data.side(name).rows(rows)
        proj.fit_inputs(feats[0] if len(feats) == 1 else feats)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":  # on these CPUs bf16 matmuls measured slower than fp32; on GPUs bf16 wins
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


# ---- batches -------------------------------------------------------------------------------------
def epoch_batches(pairs: Pairs, batch_size: int, epoch: int, seed: int, captions: str, world: int,
                  shuffle: str = "full") -> list[np.ndarray]:
    """The batches (indices into `pairs`) of one epoch: a function of (seed, epoch) only. `shuffle`
    "blocks" keeps runs of consecutive pairs (`block_permutation`), so the rows of a batch lie in a
    few stretches of each store."""
    rng = np.random.default_rng([seed, epoch])
    idx = np.arange(len(pairs))
    if captions == "one":  # one random caption per item this epoch
        order = rng.permutation(len(idx))
        _, first = np.unique(pairs.item[order], return_index=True)
        idx = order[first]
    idx = idx[rng.permutation(len(idx)) if shuffle == "full" else block_permutation(len(idx), rng)]
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size // 2:
        batches.pop()  # a tiny last batch gives a noisy contrastive step
    # every rank takes an equal slice: trim so the global batch divides by the world size
    return [b[: len(b) - len(b) % world] for b in batches if len(b) >= 2 * world]


def subsample_items(pairs: Pairs, n_items: int, seed: int) -> Pairs:
    """A seeded random subset of `n_items` items (all their pairs): the same items for a seed."""
    items = np.unique(pairs.item)
    if n_items >= len(items):
        return pairs
    if n_items < 2:
        raise AnybindError(f"max_train_pairs must be at least 2, not {n_items}")
    keep = np.random.default_rng([seed, 104729]).choice(items, size=n_items, replace=False)
    return pairs.select(np.isin(pairs.item, keep))


# ---- checkpoints ---------------------------------------------------------------------------------
def _training_part(recipe: dict) -> dict:
    """The settings the trained projectors depend on: not the correction (fitted after training);
    the blend counts, since validation and early stopping read the blended model."""
    return {k: v for k, v in recipe.items() if k not in ("name", "description", "correction")}


def _atomic_save(obj, path: Path) -> None:
    atomic.write_with(path, lambda tmp: torch.save(obj, tmp))


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and _step_of(line) <= step]
    atomic.write_text(path, "".join(line + "\n" for line in keep))


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:  # a line cut by a kill: written again after the resume
        return math.inf


# ---- one step's loss -----------------------------------------------------------------------------------
def batch_reader(side, device: torch.device, preload: bool) -> Callable[[np.ndarray], list[torch.Tensor]]:
    """Rows of one side for a training batch, on `device`.

    With `preload`, the side's in-memory features are copied to the device once and each batch is
    an index there: on a GPU this replaces a host gather plus a host-to-device copy per step.
    """
    if preload:
        on_device = [a.to(device) for a in side.arrays]
        return lambda rows: [a[torch.as_tensor(rows, dtype=torch.long, device=device)] for a in on_device]
    return lambda rows: [x.to(device, non_blocking=True) for x in side.rows(rows)]


def should_preload(data: PairedFeatures, device: torch.device, preload: bool | None) -> bool:
    """Preload (see `batch_reader`) on a GPU when the features are in memory and take at most a
    third of its free memory; `preload` True/False forces it."""
    arrays = [a for n in data.names for a in data.side(n).arrays]
    in_memory = all(isinstance(a, torch.Tensor) for a in arrays)
    if preload is not None:
        if preload and not in_memory:
            raise AnybindError("preload needs the features in memory; these stores are memory-mapped (too large)")
        return preload
    if device.type != "cuda" or not in_memory:
        return False
    need = sum(a.numel() * a.element_size() for a in arrays)
    return need <= torch.cuda.mem_get_info(device)[0] / 3


def step_loss(space: ProjectorSpace, objective, names: list[str], xa: list[torch.Tensor], xp: list[torch.Tensor],
              item: torch.Tensor, step: int, autocast, seed: int) -> tuple[torch.Tensor, dict]:
    """The training loss of one (local) batch: contrastive on the gathered global batch, plus
    lambda(step) x STRUCTURE on each side. Shared by the trainer and benchmarks/train_throughput.py."""
    with autocast:
        za = space.project(names[0], xa)
        zp = space.project(names[1], xp)
    za, zp = dist.gather_with_grad(za.float()), dist.gather_with_grad(zp.float())
    items = dist.gather(item)
    loss = objective.contrastive(za, zp, items[:, None] == items[None, :])
    record = {"contrastive": float(loss.detach())}
    if objective.structure is not None:
        g = torch.Generator().manual_seed(seed)
        # each projector's output geometry is compared with its own input's (the last layer it
        # reads stands for its input when several are mixed)
        reg = (objective.structure(dist.gather(xa[-1].float()), za, generator=g)
               + objective.structure(dist.gather(xp[-1].float()), zp, generator=g))
        record["structure"] = float(reg.detach())
        loss = loss + objective.weight(step) * reg
    return loss, record


def joint_step_loss(space: ProjectorSpace, objective, anchor: str, xs: dict[str, list[torch.Tensor]],
                    present: dict[str, torch.Tensor], item: torch.Tensor, step: int, autocast,
                    seed: int) -> tuple[torch.Tensor, dict]:
    """The loss of one batch of tuples (N modalities; an absent row is zeros, masked by `present`):
    a joint loss on the gathered global batch, plus lambda(step) x STRUCTURE on each modality's
    present rows."""
    with autocast:
        z = {m: space.project(m, x) for m, x in xs.items()}
    z = {m: dist.gather_with_grad(v.float()) for m, v in z.items()}
    present = {m: dist.gather(v) for m, v in present.items()}
    items = dist.gather(item)
    loss = objective.contrastive(z, present, items[:, None] == items[None, :], anchor=anchor)
    record = {"contrastive": float(loss.detach())}
    if objective.structure is not None:
        g = torch.Generator().manual_seed(seed)
        reg = sum(objective.structure(dist.gather(xs[m][-1].float())[present[m]], z[m][present[m]], generator=g)
                  for m in z if int(present[m].sum()) > 2)
        record["structure"] = float(reg.detach())
        loss = loss + objective.weight(step) * reg
    return loss, record


def is_joint(objective) -> bool:
    """Whether the objective's loss takes every modality at once (`align/joint_losses.py`)."""
    return bool(getattr(objective.contrastive, "joint", False))


# ---- the run: its parts, its state, its files ------------------------------------------------------
@dataclass
class _Run:
    """Everything one training run holds, built once by `_setup` (resumable through `_restore`)."""

    recipe: Recipe
    data: PairedFeatures
    train_pairs: Pairs
    val_pairs: Pairs
    space: ProjectorSpace
    objective: Any
    optimizer: Any
    scheduler: Any
    params: list
    baseline: Any  # the blend's fitted training-free space, or None
    weight: float  # the trained space's share of a blended cosine
    device: torch.device
    precision: str
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    out: Path
    split_key: dict
    rank: int = 0
    world: int = 1
    add: AddSpec | None = None
    state: dict = field(default_factory=lambda: {"step": 0, "best_metric": -1.0, "best_step": -1,
                                                 "bad_evals": 0, "stopped_early": False})
    loggers: Loggers = field(default_factory=Loggers)  # experiment loggers (anybind.tracking); empty: none

    def model(self, space: ProjectorSpace | None = None, correction=None) -> BoundModel:
        """The bound model as the recipe defines it: these projectors, the blend, a correction.
        With --add: the source model plus the new modality (the source's own correction kept)."""
        space = space or self.space
        if self.add is not None:
            new = self.trained(space)
            return self.add.source.with_added(self.add.modality, new, self.add.to, new.layers[self.add.modality])
        return BoundModel(self.data.layers, self.data.anchor_name, space=space, baseline=self.baseline,
                          weight=self.weight, correction=correction, recipe=self.recipe.to_dict())

    def trained(self, space: ProjectorSpace | None = None) -> ProjectorSpace:
        """The projectors this run trains (all of them, or the added modality's alone)."""
        space = space or self.space
        if self.add is None or list(space.projectors) == [self.add.modality]:
            return space
        m = self.add.modality
        return ProjectorSpace({m: space.projectors[m]}, {m: space.layers[m]})

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()

    @property
    def stores(self) -> dict[str, str]:
        return {n: str(self.data.side(n).store.path) for n in self.data.names}


def _setup(recipe: Recipe, stores: dict, out: Path, layers, fold, max_train_pairs, device, anchor,
           add: AddSpec | None = None, across_datasets: bool = False, train_items=None) -> _Run:
    rank, world = dist.rank_world()
    stores = {k: v if isinstance(v, FeatureStore) else FeatureStore.open(v) for k, v in stores.items()}
    if add is not None:
        layers, anchor = _add_layers(add, stores, layers), add.to
    _check_joint(recipe, stores, add)
    data = PairedFeatures(stores, layers, fold=fold, anchor=anchor, across_datasets=across_datasets)
    train_pairs, val_pairs, cfg = data.pairs("train"), data.pairs("val"), recipe.train
    if max_train_pairs is not None:
        train_pairs = subsample_items(train_pairs, max_train_pairs, seed=cfg.seed)
    if train_items is not None:  # a chosen subset (anybind curate's items.txt)
        from .curate import keep_items

        train_pairs = keep_items(train_pairs, data.side(data.anchor_name).store.item_ids, train_items)
    if cfg.batch_size % world:
        raise AnybindError(f"train.batch_size {cfg.batch_size} must divide by the {world} processes")
    # before training (validation reads the blend); with --add the source's blend is part of the target
    baseline, weight = fit_blend(recipe.blend, data, train_pairs) if add is None else (None, 1.0)
    torch.manual_seed(cfg.seed)  # the initial projector weights are part of the result
    space = build_model(recipe, data, add)
    fit_inputs(space, data, train_pairs, cfg.seed)
    space = space.to(device)
    objective = build_objective(recipe.loss)
    objective.contrastive.to(device)
    params = list(space.parameters()) + list(objective.contrastive.parameters())
    optimizer = build_optimizer(recipe.optimizer, params)
    batch_size = min(cfg.batch_size, len(train_pairs) - len(train_pairs) % world)
    steps_per_epoch = len(epoch_batches(train_pairs, batch_size, 0, cfg.seed, cfg.captions, world, cfg.shuffle))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe.optimizer, total_steps))
    split_key = {"fold": fold, "max_train_pairs": max_train_pairs, "splits": data.splits_fingerprint,
                 **({"source": add.fingerprint} if add else {}),
                 **({"across_datasets": True} if across_datasets else {}),
                 **({"train_items": hash_obj(sorted(train_items))} if train_items is not None else {})}
    return _Run(recipe, data, train_pairs, val_pairs, space, objective, optimizer, scheduler, params,
                baseline, weight, device, resolve_precision(cfg.precision, device), batch_size,
                steps_per_epoch, total_steps, out, split_key, rank, world, add)


def _check_joint(recipe: Recipe, stores: dict, add: AddSpec | None) -> None:
    """More than two modalities bind jointly: a joint loss, and no two-sided part (blend, correction)."""
    if len(stores) <= 2:
        return
    from .losses import LOSSES

    joint = [n for n in LOSSES.names() if getattr(LOSSES.get(n), "joint", False)]
    if add is not None:
        raise AnybindError(f"--add binds one modality onto a source model: give two stores, not {len(stores)}")
    if recipe.loss.name not in joint:
        raise AnybindError(f"{len(stores)} modalities ({', '.join(stores)}) bind jointly with a joint loss "
                           f"({', '.join(joint)}), not {recipe.loss.name}: --set loss.name=symile")
    for part in ("blend", "correction"):
        cfg = getattr(recipe, part) or {}
        if cfg.get("name", "none") != "none":
            raise AnybindError(f"the recipe's {part} ({cfg['name']}) pairs two sides; with {len(stores)} modalities "
                               f"use a recipe without one (freeze-align) or --set {part}.name=none")
    multilinear = getattr(LOSSES.get(recipe.loss.name), "query_rule", "") == "multilinear"
    if multilinear and not recipe.train.metric.startswith("mean_R@"):  # it validates by joint queries
        raise AnybindError(f"{recipe.loss.name} validates by its joint queries, whose mean is mean_R@k: "
                           f"train.metric={recipe.train.metric} names a direction of a pair; --set train.metric=mean_R@10")


def _add_layers(add: AddSpec, stores: dict, layers: dict | None) -> dict:
    """The layers of an --add run: the target reads what the source model reads; checked."""
    missing = {add.modality, add.to} - set(stores)
    if missing or len(stores) != 2:
        raise AnybindError(f"--add {add.modality} trains on two stores, {add.modality}=... and {add.to}=... "
                           f"(the target's features, extracted as the source model's {add.to} side was); "
                           f"got {', '.join(stores) or 'none'}")
    check_target_store(add, stores[add.to])
    want = add.source.layers_of(add.to)
    layers = dict(layers or {})
    if layers.get(add.to) not in (None, want):
        raise AnybindError(f"the {add.to} side reads {', '.join(want)} in the source model; it cannot change")
    layers[add.to] = want
    dims = [stores[add.to].layers.get(lay) for lay in want]
    need = add.source.input_dims(add.to)
    if need is not None and dims != need:
        raise AnybindError(f"the {add.to} store {stores[add.to].path.name} has dims {dims} at {', '.join(want)}, "
                           f"but the source model reads {need}: extract it with the source's {add.to} encoder")
    return layers


def _checkpoint_state(run: _Run) -> dict:
    return {"model": run.space.state_dict(), "loss": run.objective.contrastive.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "state": dict(run.state), "recipe": run.recipe.to_dict(), "stores": run.stores, "split": run.split_key}


def _restore(run: _Run, resume: bool) -> None:
    """Continue from the run folder's checkpoint, or start it afresh."""
    ckpt_path, log_path = run.out / CHECKPOINT, run.out / METRICS_LOG
    if run.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=run.device, weights_only=True)
        if (_training_part(ckpt["recipe"]) != _training_part(run.recipe.to_dict()) or ckpt["stores"] != run.stores
                or ckpt.get("split") != run.split_key):
            raise AnybindError(f"{run.out} holds a run with another recipe, other stores or another split (a "
                               "regrouped dataset): choose another --out, or pass --restart to overwrite it")
        run.space.load_state_dict(ckpt["model"])
        run.objective.contrastive.load_state_dict(ckpt["loss"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        run.state = ckpt["state"]
        log.info("resuming %s at step %d", run.out, run.state["step"])
        if run.rank == 0:
            _truncate_log(log_path, run.state["step"])
    elif run.rank == 0:
        log_path.unlink(missing_ok=True)
    if run.rank == 0:
        run.recipe.save(run.out / "recipe.yaml")
        atomic.write_json(run.out / "stores.json", run.stores)
        if run.add is not None:
            atomic.write_json(run.out / SOURCE_FILE, run.add.record())


def _checkpoint(run: _Run) -> None:
    if run.rank == 0:
        atomic.fsync_file(run.out / METRICS_LOG)  # the log up to the checkpoint outlives a power loss too
        _atomic_save(_checkpoint_state(run), run.out / CHECKPOINT)
    dist.barrier()


def _log(run: _Run, record: dict) -> None:
    if run.rank == 0:
        atomic.append_json(run.out / METRICS_LOG, record, fsync=False)  # made durable by each checkpoint
        if run.loggers:  # none without --logger: the step pays for nothing more
            run.loggers.log_metrics(record_metrics(record), record["step"])


def _validate_and_keep_best(run: _Run) -> None:
    """Score the bound model (projectors + blend) on val; keep the projectors when they improved."""
    metrics = _val_retrieval(run, run.model())
    value, state = metrics[run.recipe.train.metric], run.state
    if value > state["best_metric"]:
        state.update(best_metric=value, best_step=state["step"], bad_evals=0)
        if run.rank == 0:
            run.trained().save(run.out / BEST)
            atomic.write_json(run.out / BEST / "metrics.json", {"step": state["step"], "val": metrics})
    else:
        state["bad_evals"] += 1
    _log(run, {"step": state["step"], "split": "val", **metrics})


def _val_retrieval(run: _Run, model: BoundModel) -> dict:
    """Validation recall: of the two modalities; of every pair of N (and their mean); or, for a
    loss scored by the multilinear rule (Symile), of every joint query (and their mean)."""
    data, pairs = run.data, run.val_pairs
    if not data.extra_names:
        return split_retrieval(model, data, pairs)
    rule = getattr(run.objective.contrastive, "query_rule", "sum-cosine")
    return joint_retrieval(model, data, pairs, rule) if rule == "multilinear" else tuple_retrieval(model, data, pairs)


def _batch_loss(run: _Run, local: np.ndarray, readers: dict, step: int) -> tuple[torch.Tensor, dict]:
    """The loss of this rank's slice of a batch: pairs, or tuples of N modalities."""
    pairs, cfg, names = run.train_pairs, run.recipe.train, run.data.names
    item = torch.as_tensor(pairs.item[local], device=run.device)
    seed = cfg.seed * 7919 + step
    if not is_joint(run.objective):
        xa, xp = readers[names[0]](pairs.anchor_rows[local]), readers[names[1]](pairs.partner_rows[local])
        return step_loss(run.space, run.objective, names, xa, xp, item, step, run.autocast(), seed=seed)
    rows = {names[0]: pairs.anchor_rows[local], names[1]: pairs.partner_rows[local],
            **{m: r[local] for m, r in pairs.extra_rows.items()}}
    xs, present = {}, {}
    for m, r in rows.items():
        have = r >= 0
        present[m] = torch.as_tensor(have, device=run.device)
        read = readers[m](r[have])
        xs[m] = [torch.zeros((len(r), x.shape[1]), dtype=x.dtype, device=x.device).index_copy_(
            0, torch.as_tensor(np.nonzero(have)[0], device=x.device), x) for x in read]
    return joint_step_loss(run.space, run.objective, names[0], xs, present, item, step, run.autocast(), seed)


def _step(run: _Run, batch: np.ndarray, epoch: int, readers: dict) -> dict:
    """One optimiser step on one global batch; returns its log record."""
    step, cfg = run.state["step"], run.recipe.train
    torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout etc.: the same on resume
    local = np.array_split(batch, run.world)[run.rank]
    loss, record = _batch_loss(run, local, readers, step)
    if not torch.isfinite(loss):
        raise AnybindError(f"the loss became {float(loss)} at step {step}: lower optimizer.lr or use fp32")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    dist.average_gradients(run.params)
    if run.recipe.optimizer.grad_clip > 0:
        record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(run.params, run.recipe.optimizer.grad_clip))
    run.optimizer.step()
    run.scheduler.step()
    run.state["step"] = step + 1
    record = {"step": step + 1, "split": "train", **record, "loss": float(loss.detach()),
              "lr": run.scheduler.get_last_lr()[0], "epoch": epoch}
    if hasattr(run.objective.contrastive, "temperature_value"):
        record["temperature"] = float(run.objective.contrastive.temperature_value())
    return record


def _loop(run: _Run, progress: bool, preload: bool | None) -> None:
    from tqdm.auto import tqdm

    state, cfg = run.state, run.recipe.train
    bar = tqdm(total=run.total_steps, initial=state["step"], unit="step", desc=f"train {run.recipe.name}",
               disable=not progress or run.rank != 0)
    on_device = should_preload(run.data, run.device, preload)
    readers = {m: batch_reader(run.data.side(m), run.device, on_device) for m in run.data.names}
    run.space.train()
    while state["step"] < run.total_steps and not state["stopped_early"]:
        epoch, offset = divmod(state["step"], run.steps_per_epoch)
        for batch in epoch_batches(run.train_pairs, run.batch_size, epoch, cfg.seed, cfg.captions, run.world, cfg.shuffle)[offset:]:
            record = _step(run, batch, epoch, readers)
            _log(run, record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", best=f"{max(state['best_metric'], 0):.3f}")
            done = state["step"] >= run.total_steps
            if state["step"] % cfg.val_every == 0 or done:
                _validate_and_keep_best(run)
                state["stopped_early"] = state["bad_evals"] >= cfg.patience
            if state["step"] % cfg.checkpoint_every == 0 or done or state["stopped_early"]:
                _checkpoint(run)
            if done or state["stopped_early"]:
                break
    bar.close()


def _finish(run: _Run) -> BoundModel:
    """The deliverable: the best projectors + the blend + the correction fitted on them, saved as
    one bound model in ``out/model``."""
    if run.state["best_step"] < 0:  # resumed a finished run, or no validation happened
        _validate_and_keep_best(run)
    best = ProjectorSpace.load(run.out / BEST).to(run.device) if (run.out / BEST).exists() else run.space
    model = run.model(best)
    if run.add is None:  # an added modality ranks with the source's correction, unchanged
        model.correction = fit_correction(run.recipe.correction, model, run.data, run.train_pairs,
                                          run.recipe.train.seed)
    if run.rank == 0:
        model.save(run.out / MODEL)
    return model


def train(
    recipe: Recipe,
    stores: dict[str, FeatureStore | str | os.PathLike],
    *,
    out: str | os.PathLike,
    layers: dict[str, list[str]] | None = None,
    device: str | None = None,
    resume: bool = True,
    progress: bool = True,
    baselines: bool = True,
    fold: int | None = None,
    max_train_pairs: int | None = None,
    preload: bool | None = None,
    anchor: str | None = None,
    add: AddSpec | None = None,
    loggers: Sequence = (),
    across_datasets: bool = False, train_items: Sequence[str] | None = None,
) -> TrainResult:
    """Fit the recipe's bound model on two stores: train its projectors (validation and early
    stopping read the blended model), fit its correction, and save it to ``out/model``.

    `fold` trains on a cross-validation fold (`anybind.data.crossval`) instead of the index's
    fixed split; `max_train_pairs` keeps a seeded random subset of the train items (the
    data-efficiency sweep) and `train_items` those ids (`anybind curate`), with every caption. `preload` puts the features on
    the GPU once (default: when they fit in a third of its free memory; see `batch_reader`).
    `anchor` names the modality the other binds to (default: the store with one row per item).
    `result.val` is the saved model's retrieval on the val split, correction included.
    `add` (progressive binding, `AddSpec`) trains one new modality against the frozen bound space
    of a source model (`align/frozen.py`); ``out/model`` is then the source plus that modality.
    `loggers` (`anybind.tracking.open_loggers`) also get the resolved recipe, each metrics.jsonl
    record and the final results; the caller closes them.

    Three or more stores bind jointly (a joint loss); `across_datasets`: see `PairedFeatures`.
    """
    t0 = time.perf_counter()
    device = select_device(device)
    distributed = dist.init_from_env(device)
    run = _setup(recipe, stores, Path(out), layers, fold, max_train_pairs, device, anchor, add, across_datasets, train_items)
    _restore(run, resume)
    run.loggers = as_loggers(loggers if run.rank == 0 else ())
    run.loggers.log_params(run.recipe.to_dict())
    _loop(run, progress, preload)
    model = _finish(run)
    state = run.state
    result = TrainResult(run.out, state["best_step"], state["best_metric"], state["step"],
                         _val_retrieval(run, model), model=model,
                         chance=chance_retrieval_metrics(run.val_pairs.anchor_rows), stopped_early=state["stopped_early"])
    if baselines and run.add is not None:  # the training-free maps into the same frozen space
        for name in INTO_MAP_BASELINES:
            mapped = added_map_model(name, {}, run.add.source, run.add.modality, run.data, run.train_pairs)
            result.baselines[f"map: {name}"] = split_retrieval(mapped, run.data, run.val_pairs)
    elif baselines:
        result.baselines["nn-transfer"] = nn_transfer_baseline(run.data, run.train_pairs, run.val_pairs)
    result.seconds = time.perf_counter() - t0
    if run.rank == 0:
        _write_summary(run, result)
        run.loggers.log_summary(_final_results(result))
    if distributed:
        dist.barrier()
    return result


def _write_summary(run: _Run, result: TrainResult) -> None:
    atomic.write_json(run.out / "summary.json", {
        "recipe": run.recipe.name, "best_step": result.best_step, "steps": result.steps,
        "stopped_early": result.stopped_early, "metric": run.recipe.train.metric, "best_metric": result.best_metric,
        "selected_on": "val retrieval of the projectors with the blend, before the correction is fitted",
        "model": MODEL,
        "val": result.val, "baselines": result.baselines, "chance": result.chance,
        "seconds": round(result.seconds, 1), "data": run.data.summary(), "train_pairs": len(run.train_pairs),
        "precision": run.precision, "world_size": run.world})


def _final_results(result: TrainResult) -> dict:
    """What the experiment loggers record at the end (summary.json's numbers)."""
    return {"val": result.val, "baselines": result.baselines, "chance": result.chance, "best_step": result.best_step,
            "best_metric": result.best_metric, "steps": result.steps, "stopped_early": result.stopped_early,
            "seconds": result.seconds}


def nn_transfer_baseline(data: PairedFeatures, train_pairs: Pairs, val_pairs: Pairs) -> dict:
    """The floor every recipe must beat: nearest-neighbour caption transfer, fitted on train."""
    model = BoundModel(data.layers, data.anchor_name, baseline=fit_baseline("nn-transfer", {}, data, train_pairs))
    return split_retrieval(model, data, val_pairs)


def format_result(result: TrainResult, metric_ks=(1, 10), names: tuple[str, str] | None = None) -> str:
    """A small table: the trained model beside the baselines and chance, on the val split.
    `names` (anchor, partner) label the directions (default i2t / t2i)."""
    rows = [(f"trained (best, step {result.best_step})", result.val)]
    pairs = sorted({k.split("/", 1)[0] for k in result.val if "/" in k})  # joint: every pair of modalities
    if pairs:
        rows = [(f"trained, mean of {len(pairs)} pairs", result.val)]
        rows += [(f"  i2t = {pair.replace('-', '->')}",
                  {k.split("/", 1)[1]: v for k, v in result.val.items() if k.startswith(pair + "/")})
                 for pair in pairs]
    rows += [(f"baseline: {k}", v) for k, v in result.baselines.items()]
    rows += [("chance", result.chance)]
    a, p = names or ("i", "t")
    short = {"image_to_text": f"{a}2{p}", "text_to_image": f"{p}2{a}"}
    cols = [f"{d}_R@{k}" for k in metric_ks for d in ("image_to_text", "text_to_image", "mean")]
    labels = [c.replace("image_to_text", short["image_to_text"]).replace("text_to_image", short["text_to_image"])
              for c in cols]
    width = max(11, *(len(label) + 2 for label in labels))
    lines = ["val split".ljust(28) + "".join(label.rjust(width) for label in labels)]
    for name, m in rows:
        lines.append(name.ljust(28) + "".join(f"{100 * m.get(c, math.nan):{width - 1}.1f}%" for c in cols))
    return "\n".join(lines)
