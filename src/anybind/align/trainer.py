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
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import AnybindError
from ..metrics.retrieval import chance_recall, retrieval_metrics
from ..features import FeatureStore
from . import distributed as dist
from .data import PairedFeatures, Pairs
from .losses import StructureRegulariser, build_loss, warmup_weight
from .model import BoundModel
from .optim import build_optimizer, lr_lambda
from .projectors import build_projector
from .recipe import Recipe

log = logging.getLogger("anybind.train")
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainResult:
    out: Path
    best_step: int
    best_metric: float
    steps: int
    val: dict  # retrieval metrics of the best model on the val split
    baselines: dict = field(default_factory=dict)  # name -> val metrics
    chance: dict = field(default_factory=dict)
    stopped_early: bool = False
    seconds: float = 0.0


# ---- building the parts --------------------------------------------------------------------------
def build_model(recipe: Recipe, data: PairedFeatures) -> BoundModel:
    projectors, layers = {}, {}
    for name in data.names:
        side = data.side(name)
        spec = recipe.projector_for(name)
        kind = spec.pop("name")
        if len(side.layers) > 1 and kind != "layermix":
            raise AnybindError(f"the {name} side reads {len(side.layers)} layers ({', '.join(side.layers)}): "
                               f"use projector.{name}.name=layermix, or one layer")
        in_dim = side.dims if kind == "layermix" else side.dims[0]
        projectors[name] = build_projector(kind, in_dim, recipe.dim, **spec)
        layers[name] = side.layers
    return BoundModel(projectors, layers)


def build_contrastive(recipe: Recipe):
    cfg = recipe.loss
    if cfg.name == "infonce":
        return build_loss("infonce", temperature=cfg.temperature, learn_temperature=cfg.learn_temperature,
                          chunk_size=cfg.chunk_size)
    return build_loss(cfg.name, chunk_size=cfg.chunk_size)


def build_structure(recipe: Recipe) -> StructureRegulariser | None:
    cfg = recipe.loss
    if cfg.structure_weight <= 0:
        return None
    kw = {"levels": cfg.structure_levels, "level_weighting": cfg.structure_level_weighting,
          "max_batch": cfg.structure_max_batch}
    if cfg.structure_tau is not None:
        kw["tau"] = cfg.structure_tau
    return StructureRegulariser(**kw)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":  # on these CPUs bf16 matmuls measured slower than fp32; on GPUs bf16 wins
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


# ---- batches -------------------------------------------------------------------------------------
def epoch_batches(pairs: Pairs, batch_size: int, epoch: int, seed: int, captions: str, world: int) -> list[np.ndarray]:
    """The batches (indices into `pairs`) of one epoch: a function of (seed, epoch) only."""
    rng = np.random.default_rng([seed, epoch])
    idx = np.arange(len(pairs))
    if captions == "one":  # one random caption per item this epoch
        order = rng.permutation(len(idx))
        _, first = np.unique(pairs.item[order], return_index=True)
        idx = order[first]
    idx = idx[rng.permutation(len(idx))]
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
    sel = np.isin(pairs.item, keep)
    return Pairs(pairs.anchor_rows[sel], pairs.partner_rows[sel], pairs.item[sel])


# ---- validation ----------------------------------------------------------------------------------
def embed_split(model: BoundModel, data: PairedFeatures, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Shared-space embeddings of a split: unique anchors, every partner row, partner -> anchor."""
    anchors, inverse = np.unique(pairs.anchor_rows, return_inverse=True)
    a = data.side(data.anchor_name)
    p = data.side(data.partner_name)
    za = model.encode(data.anchor_name, a.rows(anchors))
    zp = model.encode(data.partner_name, p.rows(pairs.partner_rows))
    return za, zp, inverse.astype(np.int64)


def validate(model: BoundModel, data: PairedFeatures, pairs: Pairs) -> dict:
    za, zp, t2i = embed_split(model, data, pairs)
    return retrieval_metrics(za, zp, t2i, ks=(1, 5, 10))


def chance_metrics(pairs: Pairs, ks=(1, 5, 10)) -> dict:
    n_items = len(np.unique(pairs.anchor_rows))
    per_item = np.bincount(np.unique(pairs.anchor_rows, return_inverse=True)[1])
    out = {}
    for k in ks:
        i2t = float(np.mean([chance_recall(len(pairs), int(c), k) for c in per_item]))
        t2i = chance_recall(n_items, 1, k)
        out[f"image_to_text_R@{k}"], out[f"text_to_image_R@{k}"] = i2t, t2i
        out[f"mean_R@{k}"] = (i2t + t2i) / 2
    return out


# ---- checkpoints ---------------------------------------------------------------------------------
def _training_part(recipe: dict) -> dict:
    """The settings training depends on (the correction and blend are applied after training)."""
    return {k: v for k, v in recipe.items() if k not in ("name", "description", "correction", "blend")}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


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


def step_loss(model: BoundModel, contrastive, structure, names: list[str], xa: list[torch.Tensor],
              xp: list[torch.Tensor], item: torch.Tensor, lam: float, autocast, seed: int) -> tuple[torch.Tensor, dict]:
    """The training loss of one (local) batch: contrastive on the gathered global batch, plus
    lambda x STRUCTURE on each side. Shared by the trainer and benchmarks/train_throughput.py."""
    with autocast:
        za = model.project(names[0], xa)
        zp = model.project(names[1], xp)
    za, zp = dist.gather_with_grad(za.float()), dist.gather_with_grad(zp.float())
    items = dist.gather(item)
    pos = items[:, None] == items[None, :]
    loss = contrastive(za, zp, pos)
    record = {"contrastive": float(loss.detach())}
    if structure is not None:
        g = torch.Generator().manual_seed(seed)
        # each projector's output geometry is compared with its own input's (the last layer it
        # reads stands for its input when several are mixed)
        reg = (structure(dist.gather(xa[-1].float()), za, generator=g)
               + structure(dist.gather(xp[-1].float()), zp, generator=g))
        record["structure"] = float(reg.detach())
        loss = loss + lam * reg
    return loss, record


# ---- the loop --------------------------------------------------------------------------------------
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
) -> TrainResult:
    """Train the recipe's projectors on two stores; writes checkpoints, logs and the best model to `out`.

    `fold` trains on a cross-validation fold (`anybind.data.crossval`) instead of the index's
    fixed split; `max_train_pairs` keeps a seeded random subset of the train items (the
    data-efficiency sweep), every caption of a kept item included. `preload` puts the features on the GPU once
    (default: when they fit in a third of its free memory; see `batch_reader`).
    """
    t0 = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    distributed = dist.init_from_env(device)
    rank, world = dist.rank_world()
    stores = {k: v if isinstance(v, FeatureStore) else FeatureStore.open(v) for k, v in stores.items()}
    out = Path(out)
    data = PairedFeatures(stores, layers, fold=fold)
    train_pairs, val_pairs = data.pairs("train"), data.pairs("val")
    cfg = recipe.train
    if max_train_pairs is not None:
        train_pairs = subsample_items(train_pairs, max_train_pairs, seed=cfg.seed)
    if cfg.batch_size % world:
        raise AnybindError(f"train.batch_size {cfg.batch_size} must divide by the {world} processes")
    torch.manual_seed(cfg.seed)  # the initial projector weights are part of the result
    model = build_model(recipe, data).to(device)
    contrastive = build_contrastive(recipe).to(device)
    structure = build_structure(recipe)
    params = list(model.parameters()) + list(contrastive.parameters())
    optimizer = build_optimizer(recipe.optimizer, params)
    batch_size = min(cfg.batch_size, len(train_pairs) - len(train_pairs) % world)
    steps_per_epoch = len(epoch_batches(train_pairs, batch_size, 0, cfg.seed, cfg.captions, world))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe.optimizer, total_steps))
    precision = resolve_precision(cfg.precision, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    split_key = {"fold": fold, "max_train_pairs": max_train_pairs, "splits": data.splits_fingerprint}
    state = {"step": 0, "best_metric": -1.0, "best_step": -1, "bad_evals": 0, "stopped_early": False}
    ckpt_path, log_path = out / CHECKPOINT, out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if _training_part(ckpt["recipe"]) != _training_part(recipe.to_dict()) or ckpt["stores"] != {k: str(s.path) for k, s in stores.items()} \
                or ckpt.get("split") != split_key:
            raise AnybindError(f"{out} holds a run with another recipe, other stores or another split (a regrouped "
                               "dataset): choose another --out, or pass --restart to overwrite it")
        model.load_state_dict(ckpt["model"])
        contrastive.load_state_dict(ckpt["loss"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        log.info("resuming %s at step %d", out, state["step"])
        if rank == 0:
            _truncate_log(log_path, state["step"])
    elif rank == 0:
        log_path.unlink(missing_ok=True)
    if rank == 0:
        recipe.save(out / "recipe.yaml")
        (out / "stores.json").write_text(json.dumps({k: str(s.path) for k, s in stores.items()}, indent=1))

    def checkpoint() -> None:
        if rank == 0:
            _atomic_save({"model": model.state_dict(), "loss": contrastive.state_dict(),
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "state": dict(state), "recipe": recipe.to_dict(),
                          "stores": {k: str(s.path) for k, s in stores.items()}, "split": split_key}, ckpt_path)
        dist.barrier()

    def log_line(record: dict) -> None:
        if rank == 0:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def evaluate_and_keep_best() -> None:
        metrics = validate(model, data, val_pairs)
        value = metrics[cfg.metric]
        improved = value > state["best_metric"]
        if improved:
            state.update(best_metric=value, best_step=state["step"], bad_evals=0)
            if rank == 0:
                model.save(out / "best")
                (out / "best" / "metrics.json").write_text(json.dumps({"step": state["step"], "val": metrics}, indent=1))
        else:
            state["bad_evals"] += 1
        log_line({"step": state["step"], "split": "val", **metrics})

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=state["step"], unit="step", desc=f"train {recipe.name}",
               disable=not progress or rank != 0)
    a_side, p_side = data.side(data.anchor_name), data.side(data.partner_name)
    on_device = should_preload(data, device, preload)
    read_a, read_p = batch_reader(a_side, device, on_device), batch_reader(p_side, device, on_device)
    model.train()
    while state["step"] < total_steps and not state["stopped_early"]:
        epoch, offset = divmod(state["step"], steps_per_epoch)
        batches = epoch_batches(train_pairs, batch_size, epoch, cfg.seed, cfg.captions, world)
        for batch in batches[offset:]:
            step = state["step"]
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout etc.: the same on resume
            local = np.array_split(batch, world)[rank]
            xa, xp = read_a(train_pairs.anchor_rows[local]), read_p(train_pairs.partner_rows[local])
            item = torch.as_tensor(train_pairs.item[local], device=device)
            lam = warmup_weight(step, recipe.loss.structure_weight, recipe.loss.structure_warmup_steps)
            loss, record = step_loss(model, contrastive, structure, data.names, xa, xp, item, lam,
                                     autocast, seed=cfg.seed * 7919 + step)
            record = {"step": step + 1, "split": "train", **record}
            if not torch.isfinite(loss):
                raise AnybindError(f"the loss became {float(loss)} at step {step}: lower optimizer.lr or use fp32")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dist.average_gradients(params)
            if recipe.optimizer.grad_clip > 0:
                record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, recipe.optimizer.grad_clip))
            optimizer.step()
            scheduler.step()
            state["step"] = step + 1
            record.update(loss=float(loss.detach()), lr=scheduler.get_last_lr()[0], epoch=epoch)
            if hasattr(contrastive, "temperature_value"):
                record["temperature"] = float(contrastive.temperature_value())
            log_line(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", best=f"{max(state['best_metric'], 0):.3f}")
            done = state["step"] >= total_steps
            if state["step"] % cfg.val_every == 0 or done:
                evaluate_and_keep_best()
                if state["bad_evals"] >= cfg.patience:
                    state["stopped_early"] = True
            if state["step"] % cfg.checkpoint_every == 0 or done or state["stopped_early"]:
                checkpoint()
            if done or state["stopped_early"]:
                break
    bar.close()
    if state["best_step"] < 0:  # resumed a finished run, or no validation happened
        evaluate_and_keep_best()
    best = BoundModel.load(out / "best").to(device) if (out / "best" / "bound.json").exists() else model
    result = TrainResult(out, state["best_step"], state["best_metric"], state["step"],
                         validate(best, data, val_pairs), chance=chance_metrics(val_pairs),
                         stopped_early=state["stopped_early"])
    if baselines:
        result.baselines["nn-transfer"] = nn_transfer_baseline(data, train_pairs, val_pairs)
    result.seconds = time.perf_counter() - t0
    if rank == 0:
        (out / "summary.json").write_text(json.dumps({
            "recipe": recipe.name, "best_step": result.best_step, "steps": result.steps,
            "stopped_early": result.stopped_early, "metric": cfg.metric, "val": result.val,
            "baselines": result.baselines, "chance": result.chance, "seconds": round(result.seconds, 1),
            "data": data.summary(), "train_pairs": len(train_pairs), "precision": precision, "world_size": world,
        }, indent=1))
    if distributed:
        dist.barrier()
    return result


def nn_transfer_baseline(data: PairedFeatures, train_pairs: Pairs, val_pairs: Pairs) -> dict:
    """The floor every recipe must beat: nearest-neighbour caption transfer, fitted on train."""
    from .baselines import PairedArrays, build_baseline

    a, p = data.side(data.anchor_name), data.side(data.partner_name)
    anchors, inverse = np.unique(train_pairs.anchor_rows, return_inverse=True)
    fit = PairedArrays(a.rows(anchors)[-1].numpy(), p.rows(train_pairs.partner_rows)[-1].numpy(), inverse.astype(np.int64))
    base = build_baseline("nn-transfer").fit(fit)
    v_anchors, v_inverse = np.unique(val_pairs.anchor_rows, return_inverse=True)
    zi = base.encode("image", a.rows(v_anchors)[-1])
    zt = base.encode("text", p.rows(val_pairs.partner_rows)[-1])
    return retrieval_metrics(zi, zt, v_inverse.astype(np.int64), ks=(1, 5, 10))


def format_result(result: TrainResult, metric_ks=(1, 10)) -> str:
    """A small table: the trained model beside the baselines and chance, on the val split."""
    rows = [(f"trained (best, step {result.best_step})", result.val)]
    rows += [(f"baseline: {k}", v) for k, v in result.baselines.items()]
    rows += [("chance", result.chance)]
    cols = [f"{d}_R@{k}" for k in metric_ks for d in ("image_to_text", "text_to_image", "mean")]
    head = "val split".ljust(28) + "".join(c.replace("image_to_text", "i2t").replace("text_to_image", "t2i").rjust(11) for c in cols)
    lines = [head]
    for name, m in rows:
        lines.append(name.ljust(28) + "".join(f"{100 * m.get(c, math.nan):10.1f}%" for c in cols))
    return "\n".join(lines)
