"""The trainer on synthetic stores: it learns a planted correspondence, resumes exactly, runs under
torchrun with results equal to one process, and refuses bad input before training."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from anybind.align import load_recipe
from anybind.align.data import PairingError
from anybind.align.recipe import RecipeError
from anybind.align.trainer import train
from anybind.features import write_store

sys.path.insert(0, str(Path(__file__).parent))
from _synthetic import planted_stores  # noqa: E402

FAST = ["train.batch_size=256", "train.val_every=10", "train.checkpoint_every=10", "optimizer.warmup_steps=5"]


@pytest.fixture()
def stores(tmp_path):
    img, txt = planted_stores(tmp_path / "stores")
    return {"image": img, "text": txt}


def test_learns_a_planted_correspondence(stores, tmp_path):
    recipe = load_recipe("linear", FAST + ["train.max_steps=120", "optimizer.lr=0.01", "train.patience=100"])
    result = train(recipe, stores, out=tmp_path / "run", progress=False)
    assert result.val["mean_R@1"] >= 0.9, result.val
    assert result.val["mean_R@1"] > 10 * result.chance["mean_R@1"]
    out = tmp_path / "run"
    for name in ("recipe.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "best/config.json",
                 "best/image/weights.safetensors", "best/text/config.json", "model/config.json",
                 "model/projectors/image/weights.safetensors"):
        assert (out / name).exists(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == list(range(1, 121))
    assert {r["step"] for r in lines if r["split"] == "val"} == set(range(10, 121, 10))
    first, last = lines[0]["loss"], [r for r in lines if r["split"] == "train"][-1]["loss"]
    assert last < 0.5 * first
    summary = json.loads((out / "summary.json").read_text())
    assert "nn-transfer" in summary["baselines"] and summary["val"] == result.val
    assert load_recipe(out / "recipe.yaml").to_dict() == recipe.to_dict()  # the resolved recipe


@pytest.mark.parametrize("name", ["default", "structure", "sail", "freeze-align", "linear"])
def test_every_recipe_trains_a_few_steps(name, stores, tmp_path):
    recipe = load_recipe(name, FAST + ["train.max_steps=6", "train.val_every=3"])
    result = train(recipe, stores, out=tmp_path / name, progress=False, baselines=False)
    lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r["split"] == "train"]
    assert len(train_lines) == 6 and all(np.isfinite(r["loss"]) for r in train_lines)
    if recipe.loss.structure_weight:
        assert all("structure" in r for r in train_lines)
    assert 0 <= result.val["mean_R@10"] <= 1


def test_layer_mixing_projector(stores, tmp_path):
    recipe = load_recipe("linear", FAST + ["train.max_steps=5", "projector.image.name=layermix"])
    result = train(recipe, stores, out=tmp_path / "mix", layers={"image": ["layer.1", "final"]},
                   progress=False, baselines=False)
    assert result.steps == 5
    with pytest.raises(Exception, match="layermix"):
        train(load_recipe("linear", FAST + ["train.max_steps=2"]), stores, out=tmp_path / "mix2",
              layers={"image": ["layer.1", "final"]}, progress=False)


RUN_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from anybind.align import load_recipe
    from anybind.align.trainer import train
    from anybind.features import FeatureStore
    import time, torch
    stores = {{"image": FeatureStore.open({img!r}), "text": FeatureStore.open({txt!r})}}
    recipe = load_recipe({recipe!r}, {overrides!r})
    if {slow}:
        real = torch.optim.AdamW.step
        def slow_step(self, *a, **k):
            time.sleep({slow})
            return real(self, *a, **k)
        torch.optim.AdamW.step = slow_step
    r = train(recipe, stores, out={out!r}, progress=False, baselines=False)
    print("DONE", r.steps, r.best_step)
""")


def _script(stores, out, recipe, overrides, slow=0.0):
    return RUN_SCRIPT.format(tests=str(Path(__file__).parent), img=str(stores["image"].path),
                             txt=str(stores["text"].path), out=str(out), recipe=recipe,
                             overrides=overrides, slow=slow)


def _weights(run: Path) -> dict:
    return {m: load_file(run / "best" / m / "weights.safetensors") for m in ("image", "text")}


def test_killed_run_resumes_to_the_same_result(stores, tmp_path):
    overrides = FAST + ["train.max_steps=60", "train.patience=100"]
    code_ref = _script(stores, tmp_path / "ref", "structure", overrides)
    ref = subprocess.run([sys.executable, "-c", code_ref], capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    victim = subprocess.Popen([sys.executable, "-c", _script(stores, tmp_path / "run", "structure", overrides, 0.05)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the step-20 checkpoint, then kill mid-way to 30
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["state"]["step"] >= 20:
            break
        time.sleep(0.05)
    time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert torch.load(ckpt, weights_only=True)["state"]["step"] < 60
    resumed = subprocess.run([sys.executable, "-c", _script(stores, tmp_path / "run", "structure", overrides)],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.split() == ref.stdout.split()
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    for m in a:
        for k in a[m]:
            torch.testing.assert_close(a[m][k], b[m][k], rtol=0, atol=0)
    log_a = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    log_b = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert log_a == log_b


def test_torchrun_equals_one_process(stores, tmp_path):
    """2 processes (gloo), each half the global batch, gathered with gradients == 1 process."""
    overrides = FAST + ["train.max_steps=12", "train.patience=100", "loss.structure_weight=1.0"]
    script = tmp_path / "run.py"
    script.write_text(_script(stores, tmp_path / "ddp", "structure", overrides))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--standalone", str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, "-c", _script(stores, tmp_path / "one", "structure", overrides)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "one")
    for m in a:
        for k in a[m]:
            torch.testing.assert_close(a[m][k], b[m][k], rtol=1e-4, atol=1e-5)
    la = [json.loads(x)["loss"] for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    np.testing.assert_allclose(la, lb, rtol=1e-4)


def test_bad_input_is_refused_before_training(stores, tmp_path):
    recipe = load_recipe("linear", FAST + ["train.max_steps=2"])
    other = write_store(tmp_path / "other", {"final": np.ones((5, 32), np.float32)}, [f"x{i}" for i in range(5)],
                        modality="text", field="caption", dataset="another-dataset")
    with pytest.raises(PairingError, match="different datasets"):
        train(recipe, {"image": stores["image"], "text": other}, out=tmp_path / "r1", progress=False)
    bad = np.ones((600, 32), np.float32)
    bad[7, 3] = np.nan
    nan_store = write_store(tmp_path / "nan", {"final": bad}, stores["image"].item_ids, modality="text",
                            field="caption", dataset="planted")
    with pytest.raises(PairingError, match="NaN or inf"):
        train(recipe, {"image": stores["image"], "text": nan_store}, out=tmp_path / "r2", progress=False)
    disjoint = write_store(tmp_path / "disjoint", {"final": np.ones((5, 32), np.float32)},
                           [f"x{i}" for i in range(5)], modality="text", field="caption", dataset="planted")
    with pytest.raises(PairingError, match="share no item ids"):
        train(recipe, {"image": stores["image"], "text": disjoint}, out=tmp_path / "r3", progress=False)
    half = write_store(tmp_path / "half", {"final": np.ones((300, 32), np.float32)}, stores["image"].item_ids[:300],
                       modality="text", field="caption", dataset="planted")
    with pytest.raises(PairingError, match="different item sets: 300 of 600 image items"):
        train(recipe, {"image": stores["image"], "text": half}, out=tmp_path / "r5", progress=False)
    with pytest.raises(PairingError, match="no layer layer.9"):
        train(recipe, stores, out=tmp_path / "r4", layers={"image": ["layer.9"]}, progress=False)
    with pytest.raises(RecipeError, match="unknown recipe key 'loss.nope'"):
        load_recipe("linear", ["loss.nope=1"])
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_resume_refuses_another_recipe(stores, tmp_path):
    train(load_recipe("linear", FAST + ["train.max_steps=3"]), stores, out=tmp_path / "run", progress=False, baselines=False)
    with pytest.raises(Exception, match="another recipe"):
        train(load_recipe("linear", FAST + ["train.max_steps=4"]), stores, out=tmp_path / "run", progress=False)
    r = train(load_recipe("linear", FAST + ["train.max_steps=4"]), stores, out=tmp_path / "run", progress=False,
              resume=False, baselines=False)
    assert r.steps == 4


def test_preloaded_features_train_exactly_as_read_per_step(stores, tmp_path):
    # preload copies the features to the device once (the GPU path); here the device is the CPU,
    # so both runs must give the same weights bit for bit
    recipe = load_recipe("freeze-align", FAST + ["train.max_steps=12"])
    for preload in (False, True):
        train(recipe, stores, out=tmp_path / f"p{preload}", progress=False, baselines=False, preload=preload)
    a, b = _weights(tmp_path / "pFalse"), _weights(tmp_path / "pTrue")
    for m in a:
        assert a[m].keys() == b[m].keys() and all(torch.equal(a[m][k], b[m][k]) for k in a[m])


def test_preload_of_memory_mapped_features_is_refused(stores, tmp_path):
    from anybind.align.data import PairedFeatures
    from anybind.align.trainer import should_preload
    from anybind.errors import AnybindError
    data = PairedFeatures(dict(stores), in_memory=False)
    assert should_preload(data, torch.device("cpu"), None) is False  # auto: only on a GPU
    with pytest.raises(AnybindError, match="memory-mapped"):
        should_preload(data, torch.device("cpu"), True)


def test_pca_projectors_are_fitted_on_the_training_split_and_resume(stores, tmp_path):
    recipe = load_recipe("default", FAST + ["train.max_steps=6", "train.val_every=3", "projector.default.pca=8",
                                            "projector.default.pca_whiten=true"])
    result = train(recipe, stores, out=tmp_path / "pca", progress=False, baselines=False)
    image = result.model.space.projectors["image"]
    from anybind.align.data import PairedFeatures

    data = PairedFeatures(stores)
    train_rows = np.unique(data.pairs("train").anchor_rows)
    assert int(image.pca.fitted_rows) == len(train_rows)  # the training split's distinct images, no others
    assert image.config["pca"] == 8 and 0 <= result.val["mean_R@10"] <= 1
    again = train(recipe, stores, out=tmp_path / "pca", progress=False, baselines=False)  # a finished run reads back
    assert torch.equal(again.model.space.projectors["image"].pca.basis, image.pca.basis)


def test_block_shuffle_reads_pairs_in_runs_and_still_learns(stores, tmp_path):
    from anybind.align.data import Pairs
    from anybind.align.trainer import epoch_batches

    rows = np.arange(80 * 256)
    pairs = Pairs(rows, rows, rows)  # 20,480 items, one caption each, in store order: 80 full batches
    full = epoch_batches(pairs, 256, 0, 0, "all", 1)
    blocks = epoch_batches(pairs, 256, 0, 0, "all", 1, "blocks")
    assert sorted(np.concatenate(blocks).tolist()) == rows.tolist() == sorted(np.concatenate(full).tolist())  # each once
    assert blocks[1].tolist() == epoch_batches(pairs, 256, 0, 0, "all", 1, "blocks")[1].tolist()  # seeded
    runs = [len(np.unique(b // 256)) for b in blocks]  # 256-pair stretches a batch touches
    assert max(runs) <= 17 and np.mean([len(np.unique(b // 256)) for b in full]) > 60
    recipe = load_recipe("linear", FAST + ["train.max_steps=120", "optimizer.lr=0.01", "train.patience=100",
                                            "train.shuffle=blocks"])
    assert recipe.to_dict()["train"]["shuffle"] == "blocks"
    assert "shuffle" not in load_recipe("linear").to_dict()["train"]  # at its default: earlier results' keys hold
    result = train(recipe, stores, out=tmp_path / "blocks", progress=False)
    assert result.val["mean_R@1"] >= 0.9, result.val
    with pytest.raises(RecipeError, match="train.shuffle"):
        load_recipe("linear", ["train.shuffle=sometimes"])


@pytest.mark.parametrize("by_row", [False, True])
def test_pairing_is_the_row_by_row_join(tmp_path, by_row):
    """Pairs, items and splits as a dict join row by row gives them: stores in different orders,
    a few rows on either side without a partner; `by_row`: both sides have several rows an item."""
    from anybind.align.data import PairedFeatures

    rng = np.random.default_rng(1)
    items = [f"it{i:03d}" for i in range(100)]
    split_of = {i: ("train", "val", "test")[k % 3] for k, i in enumerate(items)}
    a_keys = [(i, j) for i in items[:98] for j in range(2 if by_row else 1)]  # it098, it099: no anchor
    a_keys = [a_keys[r] for r in rng.permutation(len(a_keys))]
    p_keys = [(i, j) for i in items if i not in ("it000", "it001") for j in range(2)]  # it000/1: no partner
    p_keys = [p_keys[r] for r in rng.permutation(len(p_keys))]

    def store(name, keys, modality, field):
        caption = {"caption_index": [j for _, j in keys]} if field == "caption" else {}
        return write_store(tmp_path / name, {"final": rng.standard_normal((len(keys), 4)).astype(np.float32)},
                           [i for i, _ in keys], modality=modality, field=field, dataset="d",
                           splits=[split_of[i] for i, _ in keys], **caption)

    a = store("a", a_keys, "audio" if by_row else "image", "caption" if by_row else "image")
    p = store("p", p_keys, "text", "caption")
    data = PairedFeatures({"a": a, "p": p}, anchor="a")
    a_row = {key: r for r, key in enumerate(a_keys)}
    want = [(a_row[key if by_row else (key[0], 0)], r) for r, key in enumerate(p_keys)
            if (key if by_row else (key[0], 0)) in a_row]
    assert list(zip(data.anchor_rows_all.tolist(), data.partner_rows_all.tolist())) == want
    first_of_item = {}
    for anchor_row, _ in want:
        first_of_item.setdefault(a_keys[anchor_row][0], anchor_row)
    assert data.item_of_pair.tolist() == [first_of_item[a_keys[r][0]] for r, _ in want]
    assert data.split_of_pair.tolist() == [split_of[a_keys[r][0]] for r, _ in want]
