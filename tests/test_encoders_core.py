"""Spec grammar, the registry, the Encoder contract on random encoders, pooling helpers."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from anybind.encoders import EncoderSpec, create_encoder, list_encoders, parse_spec, pool_tokens
from anybind.errors import AnybindError, LayerError, SpecError


@pytest.mark.parametrize(
    "text,expected",
    [
        ("hf:facebook/dinov2-small", EncoderSpec("hf", "facebook/dinov2-small")),
        ("hf:/local/dir:text", EncoderSpec("hf", "/local/dir", "text")),
        ("st:sentence-transformers/all-MiniLM-L6-v2", EncoderSpec("st", "sentence-transformers/all-MiniLM-L6-v2")),
        ("timm:vit_small_patch14_dinov2.lvd142m", EncoderSpec("timm", "vit_small_patch14_dinov2.lvd142m")),
        ("open_clip:ViT-B-32@laion2b_s34b_b79k:image", EncoderSpec("open_clip", "ViT-B-32@laion2b_s34b_b79k", "image")),
        ("onnx:/path/model.onnx#out1,out2", EncoderSpec("onnx", "/path/model.onnx#out1,out2")),
        ("efficientnet-lite0", EncoderSpec("packaged", "efficientnet-lite0")),
        ("minilm-l6", EncoderSpec("packaged", "minilm-l6")),
        ("random:text", EncoderSpec("random", "text")),
        ("random:image@3", EncoderSpec("random", "image@3")),
    ],
)
def test_parse_spec(text, expected):
    spec = parse_spec(text)
    assert spec == expected
    assert parse_spec(str(spec)) == spec  # round trip


@pytest.mark.parametrize(
    "text,message",
    [
        ("/models/dinov2", "put a backend prefix"),
        ("./model.onnx", "put a backend prefix"),
        ("facebook/dinov2-small", "hf:facebook/dinov2-small"),
        ("resnet50", "unknown encoder 'resnet50'"),
        ("torchhub:resnet50", "unknown encoder backend 'torchhub:'"),
        ("hf:", "names a backend but no model"),
        ("", "empty encoder spec"),
    ],
)
def test_bad_specs_say_what_to_type(text, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        parse_spec(text)


def test_list_encoders_names_packaged_and_backends():
    rows = {r["spec"]: r for r in list_encoders()}
    for name in ("efficientnet-lite0", "dinov2-s-focus", "minilm-l6", "mpnet-base"):
        assert rows[name]["kind"] == "packaged" and rows[name]["install"].startswith("pip install")
    assert {"hf:NAME-OR-PATH", "st:NAME-OR-PATH", "timm:NAME-OR-PATH", "onnx:NAME-OR-PATH"} <= set(rows)


def test_missing_backend_is_a_clear_error(monkeypatch):
    import builtins

    from anybind._deps import require
    from anybind.errors import MissingDependencyError

    real = builtins.__import__

    def no_such(name, *a, **k):
        if name.startswith("not_installed_pkg"):
            raise ImportError(name=name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_such)
    with pytest.raises(MissingDependencyError, match=r"pip install 'anybind\[hf\]'"):
        require("not_installed_pkg", "the hf: backend", "not-installed-pkg", extra="hf")


def test_import_anybind_imports_no_backend():
    code = ("import sys, anybind, anybind.encoders, anybind.features, anybind.cli; "
            "import anybind.data; anybind.encoders.create_encoder('random:text'); "
            "print(sorted(m for m in ('transformers','timm','open_clip','onnxruntime','sentence_transformers','torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("modality", ["image", "text", "audio"])
def test_random_encoders_follow_the_contract(modality):
    enc = create_encoder(f"random:{modality}")
    assert enc.modality == modality
    assert enc.layer_names == ["layer.0", "layer.1", "layer.2", "layer.3", "final"]
    items = {
        "image": [np.random.RandomState(i).randint(0, 255, (40, 50, 3), dtype=np.uint8) for i in range(3)],
        "text": ["a cat", "a dog on a mat", "three"],
        "audio": [np.random.RandomState(i).randn(100) for i in range(3)],
    }[modality]
    out = enc.embed(items, layers="all")
    for layer, dim in enc.layer_dims.items():
        assert out[layer].shape == (3, dim)
    assert torch.allclose(out["final"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(out["final"][0], out["final"][1])  # depends on the input
    again = create_encoder(f"random:{modality}").embed(items, layers="final")["final"]
    assert torch.equal(again, out["final"])  # deterministic
    assert create_encoder(f"random:{modality}@1").weights_hash() != enc.weights_hash()


def test_resolve_layers():
    enc = create_encoder("random:text")
    assert enc.resolve_layers(None) == ["final"]
    assert enc.resolve_layers("1, 2,final") == ["layer.1", "layer.2", "final"]
    assert enc.resolve_layers("last") == ["layer.3"]
    assert enc.resolve_layers("layer.-1") == ["layer.3"]
    assert enc.resolve_layers("all") == enc.layer_names
    assert enc.resolve_layers(["layer.2", 2]) == ["layer.2"]
    with pytest.raises(LayerError, match="has no layer '9'"):
        enc.resolve_layers("9")
    with pytest.raises(AnybindError, match="assessment"):
        enc.resolve_layers("auto")


LAYER_TEXTS = [None, "", "final", "1, 2,final", "last", "-1", "layer.-2", "all", ["layer.2", 2], 3, "9", "fnal",
               "layer.-9", "all,final", "3,auto", "layer.x"]


@pytest.mark.parametrize("text", LAYER_TEXTS, ids=repr)
def test_encoders_and_features_read_layers_with_one_parser(text):
    """Encoder.resolve_layers (encode, embed) and features.resolve_layers (extract, train, eval,
    run) give the same names for the same text, and the same message for a mistake."""
    from anybind.features.layers import resolve_layers

    enc = create_encoder("random:text")

    def outcome(fn):
        try:
            return fn()
        except AnybindError as e:
            return type(e).__name__, str(e)

    assert outcome(lambda: enc.resolve_layers(text)) == outcome(
        lambda: resolve_layers(text, enc.layer_dims, encoder=str(enc.spec)))


def test_an_encoder_names_the_layer_it_lacks_with_a_suggestion():
    enc = create_encoder("random:text")
    with pytest.raises(LayerError, match=r"has no layer 'fnal': it has layer.0 ... layer.3 and final "
                                         r"\(did you mean 'final'\?\)"):
        enc.resolve_layers("fnal")
    with pytest.raises(LayerError, match="'all' stands alone"):
        enc.resolve_layers("all,final")


def test_fingerprint_keys_everything_that_changes_features():
    enc = create_encoder("random:text")
    base = enc.fingerprint("mean", "fp32")
    assert base != enc.fingerprint("cls", "fp32")
    assert base != enc.fingerprint("mean", "bf16")
    assert base["weights"] != create_encoder("random:text@2").fingerprint("mean", "fp32")["weights"]
    with pytest.raises(AnybindError, match="does not support pooling"):
        create_encoder("random:image").fingerprint("cls")


def test_pool_tokens_by_hand():
    h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [100.0, 100.0]]])  # [1, 4, 2]
    mask = torch.tensor([[1, 1, 1, 0]])  # last token is padding
    assert pool_tokens(h, "cls").tolist() == [[1.0, 0.0]]
    assert pool_tokens(h, "mean", mask, num_prefix=0).tolist() == [[3.0, 2.0]]  # (1+3+5)/3, (0+2+4)/3
    assert pool_tokens(h, "mean", mask, num_prefix=1).tolist() == [[4.0, 3.0]]  # patch tokens only
    assert pool_tokens(h, "cls+mean", mask, num_prefix=1).tolist() == [[1.0, 0.0, 4.0, 3.0]]
    assert create_encoder("random:text").output_dim("layer.1", "cls+mean") == 64
    assert create_encoder("random:text").output_dim("final", "cls+mean") == 32


# ---- packaged mpnet: the unzip swaps a folder into place through anybind.atomic -------------------
_UNZIP_AND_HANG = """
import sys, time
from pathlib import Path
from anybind.encoders import packaged_text as pt
parts = [Path(p) for p in sys.argv[2:]]
pt.mpnet_zip_parts = lambda: parts
unzip = pt._extract
def unzip_then_hang(parts, dest):
    unzip(parts, dest)
    print("unzipped", flush=True)
    time.sleep(120)
pt._extract = unzip_then_hang
pt.mpnet_base_dir(Path(sys.argv[1]))
"""


def _mpnet_parts(folder, n: int = 3) -> list:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            zf.writestr(f"all-mpnet-base-v2/{name}", name.encode() * 1000)
    blob, step = buf.getvalue(), len(buf.getvalue()) // n + 1
    paths = [folder / f"all-mpnet-base-v2.zip.00{i + 1}" for i in range(n)]
    for i, p in enumerate(paths):
        p.write_bytes(blob[i * step: (i + 1) * step])
    return paths


@pytest.mark.parametrize("stale", [False, True], ids=["first-unzip", "replacing-a-broken-folder"])
def test_a_killed_mpnet_unzip_leaves_nothing_behind(tmp_path, monkeypatch, stale):
    """SIGKILL mid-unzip: the folder there was stays as it was, and the next call removes the
    killed process's staging folder (a 420 MB copy for the real model) and unzips once."""
    import signal

    from anybind.encoders import packaged_text

    parts, root = _mpnet_parts(tmp_path), tmp_path / "cache"
    final = root / "models" / "mpnet-base"
    if stale:
        final.mkdir(parents=True)
        (final / "config.json").write_text("{}")  # no model, no source stamp: a broken folder
    proc = subprocess.Popen([sys.executable, "-c", _UNZIP_AND_HANG, str(root), *map(str, parts)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "unzipped"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(list((root / "models").iterdir())) == 1 + stale  # its staging folder, left by the kill
    assert not stale or sorted(p.name for p in final.iterdir()) == ["config.json"]  # untouched
    monkeypatch.setattr(packaged_text, "mpnet_zip_parts", lambda: parts)
    assert packaged_text.mpnet_base_dir(root) == final
    assert [p.name for p in (root / "models").iterdir()] == ["mpnet-base"]
    assert (final / "model.safetensors").read_bytes() == b"model.safetensors" * 1000
