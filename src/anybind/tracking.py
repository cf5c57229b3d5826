"""Experiment loggers: training losses, validation metrics, the resolved recipe and the final
results, sent to TensorBoard, MLflow or Weights & Biases beside the run folder's own files.

    with open_loggers(["tensorboard", "mlflow"], folder=run / "logs", run_name="default") as loggers:
        train(recipe, stores, out=run, loggers=loggers)

Off unless asked for (`anybind train|eval|run --logger NAME`), never required: each logger's
package is imported only when that logger is opened (`pip install 'anybind[tracking]'`). Nothing
leaves the machine by default: TensorBoard writes event files, MLflow a local ``file:`` store
(unless MLFLOW_TRACKING_URI names another), W&B runs offline (unless WANDB_MODE says otherwise).

A logger is any object with ``log_params(dict)``, ``log_metrics(dict, step)``,
``log_summary(dict)`` and ``close(failed=False)``; register a new one with
``LOGGERS.register("name", MyLogger)`` (built with ``folder``, ``run_name`` and ``quiet``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ._deps import require
from .errors import AnybindError
from .registry import Registry

log = logging.getLogger("anybind.tracking")
LOGGERS = Registry("logger")
EXTRA = "tracking"


# ---- what the loggers receive ----------------------------------------------------------------------
def flatten(tree: Mapping, sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a/b": 1}: nested settings and results as flat keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, sep, name))
        else:
            flat[name] = value
    return flat


def numbers(flat: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric values of a flat dict (booleans as 0/1), as floats."""
    out = {}
    for key, value in flat.items():
        if isinstance(value, (bool, int, float)) and not isinstance(value, str) and math.isfinite(value):
            out[key] = float(value)
    return out


def record_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as the loggers get it: ``{"step": 5, "split": "train", "loss": 0.7}``
    -> ``{"train/loss": 0.7}`` (logged at step 5)."""
    split = record.get("split", "train")
    return numbers({f"{split}/{k}": v for k, v in record.items() if k not in ("step", "split")})


# ---- the set of loggers a run was given ------------------------------------------------------------------
class Loggers(list):
    """The loggers of one run: a list (empty: no logging at all) that closes them all on exit.

    A logger is never required: one that fails (a full disk, an unreachable server) is dropped with
    a warning and the run goes on; its own files (metrics.jsonl, summary.json, results) hold it all."""

    def log_params(self, params: Mapping) -> None:
        self._each("log_params", dict(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._each("log_metrics", dict(metrics), step)

    def log_summary(self, summary: Mapping) -> None:
        self._each("log_summary", dict(summary))

    def close(self, failed: bool = False) -> None:
        self._each("close", failed)
        self.clear()

    def _each(self, method: str, *args: Any) -> None:
        for logger in list(self):
            try:
                getattr(logger, method)(*args)
            except Exception as e:
                log.warning("logger %s failed in %s (%s: %s); the run goes on without it",
                            type(logger).__name__, method, type(e).__name__, e)
                self.remove(logger)
                if method != "close":
                    Loggers([logger]).close(failed=True)

    def __enter__(self) -> Loggers:
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.close(failed=kind is not None)


def as_loggers(loggers: Iterable | None) -> Loggers:
    """`loggers` itself when it is a `Loggers` (so that a logger dropped on failure is dropped for
    the caller too), else a `Loggers` of them."""
    return loggers if isinstance(loggers, Loggers) else Loggers(loggers or ())


def parse_names(values: Iterable[str] | str | None) -> list[str]:
    """`--logger` values (repeated and/or comma lists) -> registered logger names, checked."""
    if isinstance(values, str):
        values = [values]
    names: list[str] = []
    for value in values or ():
        for name in (part.strip() for part in value.split(",")):
            if name and name not in names:
                LOGGERS.entry(name)  # an unknown name is refused with a did-you-mean
                names.append(name)
    if values and not names:
        raise AnybindError(f"--logger is empty: name one of {', '.join(LOGGERS.names())}")
    return names


def check_loggers(values: Iterable[str] | str | None) -> list[str]:
    """Parse `--logger` values and import each logger's package now, so that a typo or a missing
    package is refused before any work."""
    names = parse_names(values)
    for name in names:
        _require(name)
    return names


def _require(name: str):
    """The package a registered logger needs (its ``module`` meta), or a MissingDependencyError."""
    meta = LOGGERS.entry(name).meta
    if "module" not in meta:
        return None
    return require(meta["module"], f"--logger {name}", package=meta.get("package"), extra=EXTRA)


def open_loggers(names: Iterable[str] | str | None, folder: str | os.PathLike, run_name: str,
                 quiet: bool = False) -> Loggers:
    """The named loggers, each writing under `folder` (its own sub-folder). Only the first process
    of a distributed run logs (the others would each open a copy of the same run)."""
    names = parse_names(names)
    loggers = Loggers()
    if not names or int(os.environ.get("RANK", "0")) != 0:
        return loggers
    folder = Path(folder)
    try:
        for name in names:
            logger = LOGGERS.build(name, folder=folder, run_name=run_name, quiet=quiet)
            log.info("logger %s: %s", name, logger.location)
            loggers.append(logger)
    except BaseException:
        loggers.close(failed=True)
        raise
    return loggers


# ---- TensorBoard -------------------------------------------------------------------------------------------
@LOGGERS.register("tensorboard", help="TensorBoard event files (scalars; the recipe and results as text)",
                  module="tensorboard")
class TensorBoardLogger:
    """Scalars per step under ``train/...`` and ``val/...``, the final results as ``final/...``
    scalars at the last step, the recipe and the results as JSON text (tags ``params``, ``summary``;
    each write holds everything logged so far, so the latest text event is the whole record)."""

    def __init__(self, folder: Path, run_name: str, quiet: bool = False):
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.location = str(Path(folder) / "tensorboard")
        self._writer = SummaryWriter(log_dir=self.location)
        self._step = 0
        self._texts: dict[str, list] = {"params": [{}, 0], "summary": [{}, 0]}  # merged so far, writes

    def log_params(self, params: dict) -> None:
        self._add_text("params", params)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self._step = max(self._step, step)
        for tag, value in metrics.items():
            self._writer.add_scalar(tag, value, step)

    def log_summary(self, summary: dict) -> None:
        for tag, value in numbers(flatten({"final": summary})).items():
            self._writer.add_scalar(tag, value, self._step)
        self._add_text("summary", summary)

    def _add_text(self, tag: str, values: dict) -> None:
        merged = self._texts[tag]
        merged[0].update(values)
        merged[1] += 1
        self._writer.add_text(tag, _json_block(merged[0]), merged[1])

    def close(self, failed: bool = False) -> None:
        self._writer.close()


def _json_block(obj: Any) -> str:
    """JSON in a Markdown code block: TensorBoard's text tab renders Markdown."""
    return "```json\n" + json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n```"


# ---- MLflow ------------------------------------------------------------------------------------------------
@LOGGERS.register("mlflow", help="MLflow (a local file: store, or MLFLOW_TRACKING_URI): params, metrics",
                  module="mlflow", package="mlflow-skinny")
class MLflowLogger:
    """The recipe as params (``loss.name``), metrics per step (``train/loss``), the final results
    as metrics ``final/...`` at the last step. MLflow's names allow no ``@``: ``R@10`` is logged
    as ``R_at_10`` (`mlflow_name`)."""

    def __init__(self, folder: Path, run_name: str, quiet: bool = False):
        _require("mlflow")
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # local: nothing leaves the machine, MLflow's usage telemetry included
            uri = (Path(folder) / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        if uri.startswith("file:"):  # MLflow 3 refuses its file store unless opted in; it needs no server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "anybind")
        found = self._client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self._client.create_experiment(name)
        self.run_id = self._client.create_run(experiment, run_name=run_name).info.run_id
        self.location = f"{uri} (experiment {name}, run {self.run_id})"
        self._step = 0

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        flat = [Param(mlflow_name(k), _param_text(v)[:MAX_PARAM_VAL_LENGTH])
                for k, v in flatten(params, sep=".").items()]
        for i in range(0, len(flat), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=flat[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        self._step = max(self._step, step)
        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(mlflow_name(k), v, now, step) for k, v in metrics.items()])

    def log_summary(self, summary: dict) -> None:
        self.log_metrics(numbers(flatten({"final": summary})), self._step)

    def close(self, failed: bool = False) -> None:
        self._client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def mlflow_name(key: str) -> str:
    """A key as MLflow accepts it (alphanumerics and ``_-. :/``): ``val/mean_R@10`` -> ``val/mean_R_at_10``."""
    return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_"))


def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


# ---- Weights & Biases --------------------------------------------------------------------------------------
@LOGGERS.register("wandb", help="Weights & Biases, offline unless WANDB_MODE is set: config, history, summary",
                  module="wandb")
class WandbLogger:
    """The recipe as the run's config, metrics as its history (one row per step), the final
    results in its summary under ``final/...``. Offline by default: ``wandb sync`` uploads later."""

    def __init__(self, folder: Path, run_name: str, quiet: bool = False):
        wandb = _require("wandb")
        Path(folder).mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE") or "offline"
        if mode == "offline":  # nothing leaves the machine, W&B's error reports included
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        settings = wandb.Settings(console="off", silent=quiet, x_disable_stats=True)
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "anybind"), name=run_name, dir=str(folder),
                               mode=mode, settings=settings)
        self.location = f"{self._run.dir} ({mode})"

    def log_params(self, params: dict) -> None:
        self._run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self._run.log(metrics, step=step)

    def log_summary(self, summary: dict) -> None:
        self._run.summary.update(numbers(flatten({"final": summary})))

    def close(self, failed: bool = False) -> None:
        self._run.finish(exit_code=1 if failed else 0)
