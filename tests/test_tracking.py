"""Experiment loggers (`--logger tensorboard|mlflow|wandb`): a tiny run trained, evaluated and run
through the CLI with each logger, then read back with each tool's own reader (TensorBoard's
EventAccumulator, MlflowClient on the local file: store, W&B's `wandb leet inspect` on the offline
run) and compared with the run folder's metrics.jsonl, recipe.yaml, summary.json and results."""

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from anybind.cli import main
from anybind.errors import AnybindError, MissingDependencyError
from anybind.registry import RegistryError
from anybind.tracking import (
    LOGGERS,
    check_loggers,
    flatten,
    mlflow_name,
    open_loggers,
    parse_names,
    record_metrics,
)

sys.path.insert(0, str(Path(__file__).parent))
from _toy import replicas  # noqa: E402

TRAIN = ["--set", "train.max_steps=10", "--set", "train.batch_size=32", "--set", "train.val_every=5"]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A folder with the Karpathy replica, and the loggers' defaults (local only) for the module."""
    root = tmp_path_factory.mktemp("tracking")
    with pytest.MonkeyPatch.context() as mp:
        _local_only(mp, root)
        karpathy, *_ = replicas(root)
        yield root, karpathy


@pytest.fixture(scope="module")
def trained(local):
    """`anybind train` with all three loggers (a comma list and a repeat): its run folder."""
    root, karpathy = local
    run = root / "run"
    assert main(["train", "--recipe", "default", "--store", f"image=random:image+karpathy:{karpathy}",
                 "--store", f"text=random:text+karpathy:{karpathy}", *TRAIN, "--out", str(run), "-q",
                 "--logger", "tensorboard,mlflow", "--logger", "wandb"]) == 0
    return run


@pytest.fixture(scope="module")
def evaluated(local):
    """`anybind eval` of a recipe and a baseline with all three loggers: (its folder, the loggers' folder)."""
    root, karpathy = local
    ev, logs = root / "eval", root / "evlogs"
    assert main(["eval", "--data", f"karpathy:{karpathy}", "--image", "random:image", "--text", "random:text",
                 "--models", "linear,nn-transfer", *TRAIN, "--folds", "0,", "--seeds", "0,", "--tasks", "retrieval",
                 "--out", str(ev), "-q", "--logger", "tensorboard,mlflow,wandb", "--logger-dir", str(logs)]) == 0
    return ev, logs


def _local_only(mp: pytest.MonkeyPatch, root: Path) -> None:
    """The defaults under test (no tracking URI, no W&B mode), W&B's own files kept in `root`."""
    mp.setenv("ANYBIND_CACHE", str(root / "cache"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        mp.setenv(name, str(root / "wandb-home"))
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ERROR_REPORTING", "MLFLOW_TRACKING_URI",
                 "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_DISABLE_TELEMETRY"):
        mp.setenv(name, "x")  # recorded, so that what the loggers set is undone afterwards
        mp.delenv(name)


def _expected(run: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as tag -> {step: value}: ``{"step": 5, "split": "val", "mean_R@10": x}`` -> val/mean_R@10."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for key, value in rec.items():
            if key not in ("step", "split"):
                out[f"{rec['split']}/{key}"][rec["step"]] = float(value)
    return out


# ---- TensorBoard ---------------------------------------------------------------------------------------
def _tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _text(acc, tag: str):
    block = acc.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()
    return json.loads(block.removeprefix("```json\n").removesuffix("\n```"))


def test_tensorboard_scalars_equal_the_metrics_log_and_hold_recipe_and_results(trained):
    pytest.importorskip("tensorboard")
    import numpy as np

    run = trained
    acc = _tensorboard(run / "logs" / "tensorboard")
    expected, summary = _expected(run), json.loads((run / "summary.json").read_text())
    tags = set(acc.Tags()["scalars"])
    assert {t for t in tags if not t.startswith("final/")} == set(expected)
    assert {"train/loss", "train/lr", "val/mean_R@10"} <= tags
    for tag, by_step in expected.items():  # event files hold float32
        assert {e.step: e.value for e in acc.Scalars(tag)} == {s: float(np.float32(v)) for s, v in by_step.items()}, tag
    last = max(expected["train/loss"])
    final = {e.step: e.value for e in acc.Scalars("final/val/mean_R@10")}
    assert final == {last: pytest.approx(summary["val"]["mean_R@10"], rel=1e-6)}
    assert acc.Scalars("final/best_step")[0].value == summary["best_step"]
    assert _text(acc, "params") == yaml.safe_load((run / "recipe.yaml").read_text())
    assert _text(acc, "summary")["val"] == summary["val"]


# ---- MLflow --------------------------------------------------------------------------------------------
def _mlflow_run(folder: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(folder / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("anybind")
    (found,) = client.search_runs([experiment.experiment_id])
    return client, found


def test_mlflow_params_are_the_recipe_and_its_metric_history_is_the_metrics_log(trained, monkeypatch):
    pytest.importorskip("mlflow")
    run = trained
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when told to
    client, found = _mlflow_run(run / "logs")
    assert found.info.status == "FINISHED" and found.info.run_name == run.name
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert found.data.params == {mlflow_name(k): v if isinstance(v, str) else json.dumps(v)
                                 for k, v in flatten(recipe, sep=".").items()}
    assert found.data.params["loss.name"] == recipe["loss"]["name"]
    expected = _expected(run)
    for tag, by_step in expected.items():
        history = client.get_metric_history(found.info.run_id, mlflow_name(tag))
        assert {m.step: m.value for m in history} == by_step, tag  # doubles: exactly the logged values
    summary = json.loads((run / "summary.json").read_text())
    assert found.data.metrics["final/val/mean_R_at_10"] == summary["val"]["mean_R@10"]
    assert found.data.metrics["final/best_metric"] == summary["best_metric"]
    assert found.data.metrics["final/steps"] == summary["steps"] == max(expected["train/loss"])


# ---- Weights & Biases ----------------------------------------------------------------------------------
def _wandb_inspect(run_dir: Path, *flags: str):
    """W&B's own reader of a run's .wandb log (works offline): `wandb leet inspect --json`."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(run_dir)],
                         capture_output=True, text=True, timeout=120, check=True, stdin=subprocess.DEVNULL).stdout
    return json.loads(out) if "--summary" in flags else [json.loads(line) for line in out.splitlines() if line.strip()]


def _offline_run(folder: Path) -> Path:
    (found,) = (folder / "wandb").glob("offline-run-*")  # offline: nothing was sent
    assert (found / f"run-{found.name.rsplit('-', 1)[1]}.wandb").is_file()
    return found


def test_wandb_offline_run_reads_back_config_history_and_summary(trained):
    pytest.importorskip("wandb")
    run = trained
    offline = _offline_run(run / "logs")
    history: dict[int, dict] = {}
    for rec in _wandb_inspect(offline):
        if rec["type"] == "history":
            item = rec["history"]["item"]
            history[rec["history"]["step"]["num"]] = {k: v for k, v in item.items() if not k.startswith("_")}
    rows: dict[int, dict] = defaultdict(dict)
    for tag, by_step in _expected(run).items():
        for step, value in by_step.items():
            rows[step][tag] = value
    assert history.keys() == rows.keys()
    for step, row in rows.items():
        assert history[step] == pytest.approx(row, rel=1e-12), step
    state = _wandb_inspect(offline, "--summary")
    assert state["state"] == "finished" and state["name"] == run.name and state["project"] == "anybind"
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert {k: v for k, v in state["config"].items() if k != "_wandb"} == recipe
    summary = json.loads((run / "summary.json").read_text())
    assert state["summary"]["final/val/mean_R@10"] == pytest.approx(summary["val"]["mean_R@10"], rel=1e-12)
    assert state["summary"]["final/best_step"] == summary["best_step"]


# ---- anybind eval: the final results -------------------------------------------------------------------
def test_eval_logs_each_models_settings_and_summary_to_every_logger(evaluated, monkeypatch):
    for package in ("tensorboard", "mlflow", "wandb"):
        pytest.importorskip(package)
    from anybind.evaluate.results import read_results

    ev, logs = evaluated
    docs = {m: read_results(ev / "results" / f"{m}.json") for m in ("linear", "nn-transfer")}
    linear = docs["linear"]["summary"]["retrieval/mean_R@10"]["mean"]
    baseline = docs["nn-transfer"]["summary"]["retrieval/mean_R@10"]["mean"]
    assert not list((ev / "runs").glob("*/logs"))  # the suite's own training runs log to their folders only
    acc = _tensorboard(logs / "tensorboard")
    assert acc.Scalars("final/linear/retrieval/mean_R@10/mean")[0].value == pytest.approx(linear, rel=1e-6)
    assert acc.Scalars("final/nn-transfer/retrieval/mean_R@10/mean")[0].value == pytest.approx(baseline, rel=1e-6)
    assert _text(acc, "params")["linear"] == docs["linear"]["model"]["recipe"]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    _, found = _mlflow_run(logs)
    assert found.data.metrics["final/linear/retrieval/mean_R_at_10/mean"] == linear
    assert found.data.metrics["final/nn-transfer/retrieval/mean_R_at_10/n"] == 1
    assert json.loads(found.data.params["folds"]) == [0] and json.loads(found.data.params["tasks"]) == ["retrieval"]
    assert found.data.params["linear.loss.name"] == docs["linear"]["model"]["recipe"]["loss"]["name"] == "infonce"
    state = _wandb_inspect(_offline_run(logs), "--summary")
    assert state["summary"]["final/linear/retrieval/mean_R@10/mean"] == pytest.approx(linear, rel=1e-12)
    assert state["config"]["linear"] == docs["linear"]["model"]["recipe"]


def test_run_logs_the_run_file_the_recipe_and_the_final_results(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    _local_only(monkeypatch, tmp_path)
    karpathy, *_ = replicas(tmp_path)
    runfile = tmp_path / "tiny.yaml"
    runfile.write_text(f"""
name: tiny
data: karpathy:{karpathy}
encoders: {{image: {{spec: "random:image"}}, text: {{spec: "random:text"}}}}
assess: {{enabled: false}}
recipe: linear
overrides: [train.max_steps=6, train.val_every=3, train.batch_size=32]
evaluate: {{suite: custom, tasks: [retrieval], baselines: [nn-transfer]}}
export: false
""")
    out = tmp_path / "run"
    assert main(["run", str(runfile), "--out", str(out), "-q", "--logger", "mlflow"]) == 0
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    _, found = _mlflow_run(out / "logs")
    doc = json.loads((out / "eval" / "results" / "linear.json").read_text())
    assert found.data.params["run.name"] == "tiny" and found.data.params["run.recipe"] == "linear"
    assert found.data.params["recipe.train.max_steps"] == "6" == str(doc["model"]["recipe"]["train"]["max_steps"])
    assert found.data.metrics["final/linear/retrieval/mean_R_at_10/mean"] == doc["summary"]["retrieval/mean_R@10"]["mean"]
    assert "final/nn-transfer/retrieval/mean_R_at_10/mean" in found.data.metrics


# ---- names, refusals, missing packages -----------------------------------------------------------------
def test_logger_names_repeat_or_comma_and_typos_get_a_did_you_mean():
    assert parse_names(["tensorboard,mlflow", "wandb", "mlflow"]) == ["tensorboard", "mlflow", "wandb"]
    assert parse_names(None) == [] and parse_names("wandb") == ["wandb"]
    with pytest.raises(RegistryError, match="did you mean 'tensorboard'"):
        parse_names(["tensorbord"])
    with pytest.raises(AnybindError, match="--logger is empty"):
        parse_names([" , "])
    assert open_loggers(None, "/nonexistent", run_name="x") == []  # off: nothing opened, nothing written


def test_metrics_records_become_split_tags_and_mlflow_names_are_valid():
    rec = {"step": 5, "split": "val", "mean_R@10": 0.5, "image_to_text_R@1": 1, "note": "x", "nan": float("nan")}
    assert record_metrics(rec) == {"val/mean_R@10": 0.5, "val/image_to_text_R@1": 1.0}
    assert mlflow_name("val/mean_R@10") == "val/mean_R_at_10" and mlflow_name("a b:c.d-e/f") == "a b:c.d-e/f"
    assert mlflow_name("x(y)") == "x_y_"
    assert flatten({"a": {"b": 1, "c": {}}, "d": [1]}, sep=".") == {"a.b": 1, "a.c": {}, "d": [1]}


class _NeedsAMissingPackage:
    def __init__(self, folder, run_name, quiet=False):
        raise AssertionError("never built: its package is checked first")


def test_a_missing_logger_package_is_a_clear_error_before_any_work(tmp_path, capsys):
    LOGGERS.register("needs-missing", _NeedsAMissingPackage, module="anybind_no_such_package_xyz",
                     package="no-such-package")
    try:
        with pytest.raises(MissingDependencyError, match=r"--logger needs-missing needs the package 'no-such-package'"
                                                         r".*pip install 'anybind\[tracking\]'"):
            check_loggers(["needs-missing"])
        # the CLI refuses before it opens a store (these stores do not exist)
        assert main(["train", "--store", "image=/no/store", "--store", "text=/no/store", "--logger", "needs-missing",
                     "--out", str(tmp_path / "run"), "-q"]) == 2
        assert "pip install 'anybind[tracking]'" in capsys.readouterr().err and not (tmp_path / "run").exists()
    finally:
        LOGGERS.unregister("needs-missing")
    assert main(["eval", "--models", "default", "--speech", "openclipart-speech", "--logger", "mlflow", "-q"]) == 2
    assert "--logger records an evaluation of --models" in capsys.readouterr().err


def test_a_failed_run_is_marked_failed(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    _local_only(monkeypatch, tmp_path)
    with pytest.raises(RuntimeError), open_loggers(["mlflow"], tmp_path / "logs", run_name="broken") as loggers:
        loggers.log_metrics({"train/loss": 1.0}, 1)
        raise RuntimeError("training failed")
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"  # set for MLflow's file store; undone after the test
    _, found = _mlflow_run(tmp_path / "logs")
    assert found.info.status == "FAILED" and found.data.metrics == {"train/loss": 1.0}


class _BrokenLogger:
    """A logger whose backend fails (a full disk, an unreachable server) from its second record on."""

    def __init__(self):
        self.calls, self.closed = [], None

    def log_params(self, params):
        self.calls.append(params)

    def log_metrics(self, metrics, step):
        if step > 1:
            raise OSError("No space left on device")
        self.calls.append(metrics)

    def log_summary(self, summary):
        self.calls.append(summary)

    def close(self, failed=False):
        self.closed = failed


def test_a_failing_logger_is_dropped_with_a_warning_and_the_others_go_on(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    broken = _BrokenLogger()
    with open_loggers(["tensorboard"], tmp_path, run_name="r") as loggers:
        loggers.append(broken)
        for step in (1, 2, 3):
            loggers.log_metrics({"train/loss": 1.0 / step}, step)
        assert broken not in loggers and broken.closed is True and len(loggers) == 1
        loggers.log_summary({"val": {"mean_R@10": 0.5}})
    assert "_BrokenLogger failed in log_metrics (OSError: No space left on device)" in caplog.text
    acc = _tensorboard(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert acc.Scalars("final/val/mean_R@10")[0].value == 0.5
