"""`extract --engine ray` on a local Ray cluster (started once for the module): the store is the local
engine's byte for byte, a lost actor is restarted and its shard redone, a killed driver resumes with
only the unfinished shards, and bad options or a missing Ray are clear errors."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")  # the `scale` extra (in `dev`)

from anybind.cli import main  # noqa: E402
from anybind.encoders import create_encoder  # noqa: E402
from anybind.encoders.random import RandomEncoder  # noqa: E402
from anybind.errors import AnybindError, MissingDependencyError, StoreError  # noqa: E402
from anybind.features import extract  # noqa: E402
from anybind.run import RunFileError, load_run_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _toy import toy_text_index  # noqa: E402

# 200 items x 2 captions = 400 rows in 13 shards of 32; fp32 compute so no calibration runs
OPTIONS = {"layers": "all", "shard_size": 32, "batch_size": 8, "progress": False, "precision": "fp32"}
NUM_SHARDS = 13


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (its start-up is most of the module's time)."""
    # the actors unpickle this module's encoders by reference: let them import it
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    context = ray.init(address="local", num_cpus=2,  # "local": never a cluster `ray start` left running object_store_memory=200 * 1024**2, include_dashboard=False,
                       runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield context.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def local_text(tmp_path_factory):
    """The reference: the same extraction by the local engine."""
    root = tmp_path_factory.mktemp("local")
    return extract("random:text", toy_text_index(200), out=root / "store", cache=root / "cache", **OPTIONS)


def store_files(path: Path) -> dict:
    """Every file of a finished store, as bytes; the manifest without its time stamp and duration
    (`created`, `seconds`: the only fields that differ between two extractions)."""
    out = {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file() and p.name != "manifest.json"}
    manifest = json.loads((path / "manifest.json").read_text())
    out["manifest.json"] = {k: v for k, v in manifest.items() if k not in ("created", "seconds")}
    return out


def captions_table(root: Path, n: int = 200) -> Path:
    """A JSONL table of n captions of varied length (batched by length inside each shard), one empty."""
    rows = [{"caption": "" if i == 7 else f"caption {i} " + "word " * (i % 9), "image": f"{i}.png"} for i in range(n)]
    table = root / "captions.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in rows))
    return table


def test_ray_store_is_the_local_store_byte_for_byte(cluster, tmp_path, capsys):
    """`anybind extract --engine ray` (on the module's cluster, joined by address) against the local engine."""
    args = ["extract", "-e", "random:text", "-d", f"table:{captions_table(tmp_path)}", "--layers", "all", "-q",
            "--shard-size", "16", "--batch-size", "5", "--precision", "fp32"]
    assert main(args + ["--cache", str(tmp_path / "local")]) == 0
    local = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args + ["--cache", str(tmp_path / "ray"), "--engine", "ray", "--actors", "2",
                        "--ray-address", cluster]) == 0
    out = capsys.readouterr().out
    remote = Path(out.strip().splitlines()[-1])
    assert "extracted" in out and "1 skipped" in out and remote.name == local.name
    files = store_files(remote)
    assert {f"shard-{s:05d}.safetensors" for s in range(13)} <= set(files)  # 200 rows in 13 shards of 16
    assert {"rows.parquet", "skipped.jsonl", "request.json"} <= set(files)
    assert files == store_files(local)


def image_index(root: Path, n: int = 120):
    from PIL import Image

    from anybind.data.index import DatasetIndex

    root.mkdir()
    records = []
    for i in range(n):
        Image.new("RGB", (12, 10), ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256)).save(root / f"{i}.png")
        records.append({"item_id": f"im{i:03d}", "image": str(root / f"{i}.png")})
    records[5]["image"] = str(root / "missing.png")  # a skipped item, reported the same by both engines
    return DatasetIndex.from_records("toyimages", records, {"image": "image"})


class DiesOnce(RandomEncoder):
    """A `random:` encoder whose process exits at its third batch, the first time only (a lost worker);
    every batch it finishes is logged, a line each, in `marker`.log."""

    def __init__(self, spec: str, marker: Path):
        super().__init__(create_encoder(spec).spec)
        self.marker, self.calls = marker, 0

    def encode(self, batch, layers, pooling=None):
        self.calls += 1
        if self.calls == 3 and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        with open(f"{self.marker}.log", "a") as log:
            log.write(f"{os.getpid()}\n")
        return super().encode(batch, layers, pooling)


@pytest.mark.slow
def test_a_lost_actor_is_restarted_and_its_shard_redone(cluster, tmp_path):
    """Images this time: an actor dies mid-shard, Ray restarts it, the shard is computed again."""
    index, marker = image_index(tmp_path / "images"), tmp_path / "died"
    options = {**OPTIONS, "layers": "1,final", "shard_size": 16}
    local = extract("random:image", index, cache=tmp_path / "local", **options)
    remote = extract(DiesOnce("random:image", marker), index, cache=tmp_path / "ray", engine="ray", actors=2,
                     **options)
    assert marker.exists()  # an actor process did die, mid-shard
    # 15 batches (2 a shard, 1 in the last); redone after the loss: at most the batch its shard had done
    batches = Path(f"{marker}.log").read_text().split()
    assert 15 <= len(batches) <= 16 and marker.read_text() in batches and len(set(batches)) >= 2
    assert remote.path.name == local.path.name  # the same key: the same folder name in any cache
    assert remote.manifest["skipped"] == 1 and len(remote) == 119 and remote.report["shards_computed"] == 8
    assert store_files(remote.path) == store_files(local.path)
    again = extract("random:image", index, cache=tmp_path / "ray", engine="ray", **options)
    assert again.report["hit"]  # a finished store is a hit: no cluster work at all


KILLED_DRIVER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import ray
    from _toy import toy_text_index
    from anybind.encoders import create_encoder
    from anybind.encoders.random import RandomEncoder
    from anybind.features import extract

    class Slow(RandomEncoder):  # pickled by value to the actors (defined in __main__)
        def encode(self, batch, layers, pooling=None):
            time.sleep(0.25)
            return super().encode(batch, layers, pooling)

    ray.init(address={address!r})
    extract(Slow(create_encoder("random:text").spec), toy_text_index(200), out={out!r}, cache={cache!r},
            engine="ray", actors=1, **{options!r})
""")


@pytest.mark.slow
def test_a_killed_driver_resumes_with_only_the_unfinished_shards(cluster, local_text, tmp_path):
    out = tmp_path / "ray"
    code = KILLED_DRIVER.format(tests=str(Path(__file__).parent), address=cluster, out=str(out),
                                cache=str(tmp_path / "cache"), options=OPTIONS)
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while len(list(out.glob("shard-*.safetensors"))) < 3 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    assert 3 <= len(before) < NUM_SHARDS, driver.stderr.read().decode()[-3000:]
    assert not (out / "manifest.json").exists()
    store = extract("random:text", toy_text_index(200), out=out, cache=tmp_path / "cache", engine="ray",
                    ray_address=cluster, **OPTIONS)
    assert store.report["shards_computed"] == NUM_SHARDS - len(before)
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before  # not recomputed
    assert store_files(store.path) == store_files(local_text.path)
    assert not list(out.glob(".*.tmp"))


def test_bad_options_are_clear_errors_before_any_work(cluster, tmp_path):
    index = toy_text_index(10)
    for bad, message in (({"actors": 0}, "actors must be at least 1"),
                         ({"num_gpus": -1}, "num_gpus"),
                         ({"engine": "spark"}, "engine"),
                         ({"engine": "local", "actors": 2}, "engine 'ray' only")):
        with pytest.raises(AnybindError, match=message):
            extract("random:text", index, cache=tmp_path, **({"engine": "ray"} | bad))
    with pytest.raises(AnybindError, match="GPUs"):  # the cluster has none
        extract("random:text", index, cache=tmp_path, engine="ray", num_gpus=1, precision="fp32")
    with pytest.raises(AnybindError, match="each actor takes a CPU, and the Ray cluster has 2"):
        extract("random:text", index, cache=tmp_path, engine="ray", actors=3, shard_size=4, precision="fp32")
    assert not list(tmp_path.rglob("shard-*"))


class WrongDims(RandomEncoder):
    """An adapter bug: fewer dims than it declares (the local engine's StoreError, raised in an actor)."""

    def encode(self, batch, layers, pooling=None):
        return {k: v[:, :3] for k, v in super().encode(batch, layers, pooling).items()}


def test_an_error_in_an_actor_is_raised_as_itself(cluster, tmp_path):
    enc = WrongDims(create_encoder("random:text").spec)
    with pytest.raises(StoreError, match=r"returned shape \(\d+, 3\) for layer layer.0; expected"):
        extract(enc, toy_text_index(20), cache=tmp_path, engine="ray", actors=1, **OPTIONS)


def test_a_missing_ray_names_the_scale_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    with pytest.raises(MissingDependencyError, match=r"anybind\[scale\]"):
        extract("random:text", toy_text_index(10), cache=tmp_path, engine="ray")
    run = tmp_path / "run.yaml"  # a run file says so when it is read, before any work
    run.write_text("name: x\nencoders: {image: {spec: random:image}, text: {spec: random:text}}\nengine: ray\n")
    with pytest.raises(MissingDependencyError, match=r"anybind\[scale\]"):
        load_run_file(run)
    assert not list(tmp_path.rglob("request.json"))


def test_cli_and_run_file_refuse_bad_engine_options(tmp_path, capsys):
    table = captions_table(tmp_path, 10)
    args = ["extract", "-e", "random:text", "-d", f"table:{table}", "-q", "--cache", str(tmp_path)]
    assert main(args + ["--engine", "ray", "--actors", "0"]) == 2
    assert "actors must be at least 1" in capsys.readouterr().err
    assert main(args + ["--actors", "2"]) == 2  # the local engine has no actors
    assert "engine 'ray' only" in capsys.readouterr().err
    run = tmp_path / "run.yaml"
    base = "name: x\nencoders: {image: {spec: random:image}, text: {spec: random:text}}\n"
    run.write_text(base + "engine: ray\n")
    loaded = load_run_file(run)
    assert loaded.engine == "ray" and loaded.to_dict()["engine"] == "ray"
    run.write_text(base)
    assert "engine" not in load_run_file(run).to_dict()  # a local run dumps as it always did
    run.write_text(base + "engine: spark\n")
    with pytest.raises(RunFileError, match="engine"):
        load_run_file(run)
