"""Hubness corrections: hand-worked hubs, dense reference implementations, save/load, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anybind.align.corrections import (
    CORRECTIONS,
    RetrievalCorrection,
    apply_correction,
    build_correction,
    correction_options,
    register_correction,
)
from anybind.errors import AnybindError
from anybind.metrics import recall_at_k, retrieval_metrics

# ---- a hand-made hub ---------------------------------------------------------------------------------
# 2-D unit vectors with exact cosines. Images: the hub h = (1, 0), a = (0.6, 0.8), b = (0.6, -0.8).
# Captions: t0 = (0.96, 0.28) of a, t1 = (0.96, -0.28) of b, t2 = (1, 0) of h.
# text -> image cosines:  h     a      b
#                   t0: 0.96  0.80  0.352     -> h first: t0 missed at R@1
#                   t1: 0.96  0.352 0.80      -> h first: t1 missed at R@1
#                   t2: 1.00  0.60  0.60      -> h first: hit
# The hub h is every caption's nearest image: text -> image R@1 = 1/3.
IMAGES = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
TEXTS = torch.tensor([[0.96, 0.28], [0.96, -0.28], [1.0, 0.0]])
T2I = torch.tensor([1, 2, 0])
# The bank (used for both modalities): three queries near h, one near a, one near b.
BANK = torch.tensor([[0.96, 0.28], [0.96, -0.28], [1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
# bank -> image cosines:  h: [0.96, 0.96, 1, 0.6, 0.6]
#                         a: [0.8, 0.352, 0.6, 1, -0.28]      b: the mirror image of a
E = math.exp
L_H = math.log(2 * E(0.96) + E(1.0) + 2 * E(0.6))  # = 2.4499 (beta = 1)
L_A = math.log(E(0.8) + E(0.352) + E(0.6) + E(1.0) + E(-0.28))  # = 2.1910 = L_B


def test_qb_norm_removes_the_hub_by_hand():
    qb = build_correction("qb-norm", beta=1.0).fit({"image": BANK, "text": BANK})
    emb, offset = qb.gallery("image", IMAGES)
    assert torch.equal(emb, IMAGES)  # qb-norm only offsets
    assert offset.tolist() == pytest.approx([L_H, L_A, L_A], abs=1e-5)
    # ranking keys s - offset:  t0: h 0.96 - 2.4499 = -1.490 < a 0.8 - 2.1910 = -1.391 -> a first
    #                           t1: the mirror image -> b first
    #                           t2: h 1 - 2.4499 = -1.450 > a, b 0.6 - 2.1910 = -1.591 -> h first
    keys = TEXTS @ IMAGES.T - offset
    assert keys.argmax(dim=1).tolist() == [1, 2, 0]
    plain = retrieval_metrics(IMAGES, TEXTS, T2I, ks=(1,))
    fixed = retrieval_metrics(**apply_correction(qb, IMAGES, TEXTS), text_to_image=T2I, ks=(1,))
    assert plain["text_to_image_R@1"] == pytest.approx(1 / 3)
    assert fixed["text_to_image_R@1"] == 1.0
    # offsets stay on the cosine scale: logsumexp(beta s) / beta
    qb2 = build_correction("qb-norm", beta=2.0).fit({"image": BANK, "text": BANK})
    l_h2 = math.log(2 * E(1.92) + E(2.0) + 2 * E(1.2)) / 2
    assert qb2.gallery("image", IMAGES)[1][0].item() == pytest.approx(l_h2, abs=1e-5)
    # as the gallery of image queries, texts use the image bank (here the same vectors):
    # t2 = (1, 0) has the cosines of h, so the offset of h
    assert qb.gallery("text", TEXTS)[1][2].item() == pytest.approx(L_H, abs=1e-5)


def test_dual_softmax_is_not_an_alias_of_qb_norm_by_hand():
    # DSL multiplies by the cosine as well: key = s exp(beta s - L_g). For t0 (beta = 1):
    #   h: 0.96 exp(0.96 - 2.4499) = 0.2164    a: 0.80 exp(0.80 - 2.1910) = 0.1990  -> h still first
    # where qb-norm puts a first: the two rank differently.
    dsl = build_correction("dual-softmax", beta=1.0).fit({"image": BANK, "text": BANK})
    kw = apply_correction(dsl, IMAGES, TEXTS)
    keys = kw["score_fn"](TEXTS @ IMAGES.T, kw["image_offset"])
    assert keys.dtype == torch.float64
    assert keys[0, 0].item() == pytest.approx(0.96 * E(0.96 - L_H), abs=1e-5)
    assert keys[0, 1].item() == pytest.approx(0.80 * E(0.80 - L_A), abs=1e-5)
    assert keys.argmax(dim=1).tolist() == [0, 0, 0]
    got = retrieval_metrics(**kw, text_to_image=T2I, ks=(1,))
    assert got["text_to_image_R@1"] == pytest.approx(1 / 3)


# ---- offsets in retrieval_metrics = dense corrected scores -------------------------------------------
def _paired(seed: int, n_img: int = 23, n_txt: int = 61, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=g)  # a common direction: hubs
    images = mean + torch.randn(n_img, dim, generator=g)
    t2i = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (n_txt - n_img,), generator=g)])
    texts = images[t2i] + 1.5 * torch.randn(n_txt, dim, generator=g)
    bank = {
        "image": F.normalize(mean + torch.randn(40, dim, generator=g), dim=-1),
        "text": F.normalize(mean + torch.randn(55, dim, generator=g), dim=-1),
    }
    return images, texts, t2i, bank


def _dense_metrics(keys_t2i, keys_i2t, t2i, ks):
    """retrieval_metrics' definition on full key matrices: (text -> image, image -> text)."""
    pos = t2i[:, None] == torch.arange(keys_t2i.shape[1])[None, :]
    return recall_at_k(keys_t2i, pos, ks), recall_at_k(keys_i2t, pos.T, ks)


def _assert_matches_dense(got, dense, ks):
    t2i_ref, i2t_ref = dense
    for k in ks:
        assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i_ref[k])
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t_ref[k])
        assert got[f"mean_R@{k}"] == pytest.approx((t2i_ref[k] + i2t_ref[k]) / 2)


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_offsets_equal_explicitly_corrected_dense_scores(chunk_size):
    images, texts, t2i, _ = _paired(0)
    g = torch.Generator().manual_seed(1)
    image_offset = 0.3 * torch.rand(len(images), generator=g)
    text_offset = 0.3 * torch.rand(len(texts), generator=g)
    ks = (1, 3, 10)
    got = retrieval_metrics(
        images,
        texts,
        t2i,
        ks=ks,
        chunk_size=chunk_size,
        image_offset=image_offset,
        text_offset=text_offset.numpy(),
    )
    a, b = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    s = b @ a.T  # [texts, images]
    dense = _dense_metrics(s - image_offset[None, :], s.T - text_offset[None, :], t2i, ks)
    _assert_matches_dense(got, dense, ks)
    plain = retrieval_metrics(images, texts, t2i, ks=ks)
    assert got != plain  # the offsets did change something
    # only one side offset: the other direction is untouched
    half = retrieval_metrics(images, texts, t2i, ks=ks, image_offset=image_offset)
    for k in ks:
        assert half[f"image_to_text_R@{k}"] == plain[f"image_to_text_R@{k}"]
        assert half[f"text_to_image_R@{k}"] == got[f"text_to_image_R@{k}"]


@pytest.mark.parametrize("name", ["qb-norm", "dual-softmax"])
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_bank_softmax_corrections_equal_their_dense_definitions(name, chunk_size):
    images, texts, t2i, bank = _paired(2)
    beta = 7.0
    corr = build_correction(name, beta=beta).fit(bank)
    ks = (1, 5)
    kw = apply_correction(corr, images, texts, chunk_size=chunk_size)
    got = retrieval_metrics(**kw, text_to_image=t2i, ks=ks, chunk_size=chunk_size)
    a, b = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    s = (b @ a.T).double()  # [texts, images]
    # the prior is a softmax over the bank of the *query* modality
    l_img = torch.logsumexp(beta * (bank["text"] @ a.T).double(), dim=0)  # per image
    l_txt = torch.logsumexp(beta * (bank["image"] @ b.T).double(), dim=0)  # per caption
    assert torch.allclose(kw["image_offset"].double(), l_img / beta, atol=1e-5)
    assert torch.allclose(kw["text_offset"].double(), l_txt / beta, atol=1e-5)
    if name == "qb-norm":  # exp(beta s) / sum_b exp(beta s_b), the inverted softmax
        t2i_keys = torch.exp(beta * s - l_img[None, :])
        i2t_keys = torch.exp(beta * s.T - l_txt[None, :])
        assert kw["score_fn"] is None
    else:  # s * exp(beta s) / sum_b exp(beta s_b)
        t2i_keys = s * torch.exp(beta * s - l_img[None, :])
        i2t_keys = s.T * torch.exp(beta * s.T - l_txt[None, :])
    _assert_matches_dense(got, _dense_metrics(t2i_keys, i2t_keys, t2i, ks), ks)


# ---- InvGC against a dense implementation --------------------------------------------------------------
def _dense_invgc(gallery, gallery_bank, query_bank, r_g, r_q, k):
    g = F.normalize(gallery, dim=-1)
    out = g.clone()
    for rate, bank in ((r_g, gallery_bank), (r_q, query_bank)):
        s = g @ bank.T
        kk = min(k, len(bank))
        top = s.topk(kk, dim=1).indices
        adj = torch.zeros_like(s).scatter(1, top, s.gather(1, top)) / kk  # LocalAdj, rows / k
        out = out - rate * adj @ bank
    return F.normalize(out, dim=-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
@pytest.mark.parametrize(("r_g", "r_q", "k"), [(0.5, 0.5, 3), (1.0, 0.0, 2), (0.2, 0.7, 100)])
def test_invgc_equals_a_dense_implementation(chunk_size, r_g, r_q, k):
    images, texts, t2i, bank = _paired(3)
    corr = build_correction("invgc", r_g=r_g, r_q=r_q, k=k).fit(bank)
    emb, offset = corr.gallery("image", images, chunk_size=chunk_size)
    assert offset is None
    ref = _dense_invgc(images, bank["image"], bank["text"], r_g, r_q, k)
    assert torch.allclose(emb, ref, atol=1e-6)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(emb)), atol=1e-6)
    emb_t, _ = corr.gallery("text", texts, chunk_size=chunk_size)
    assert torch.allclose(
        emb_t, _dense_invgc(texts, bank["text"], bank["image"], r_g, r_q, k), atol=1e-6
    )
    # through retrieval_metrics: raw queries against the corrected gallery, in both directions
    kw = apply_correction(corr, images, texts, chunk_size=chunk_size)
    assert torch.equal(kw["image_emb"], images) and torch.equal(kw["text_emb"], texts)
    got = retrieval_metrics(**kw, text_to_image=t2i, ks=(1, 5), chunk_size=chunk_size)
    a, b = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    dense = _dense_metrics(b @ ref.T, a @ emb_t.T, t2i, (1, 5))
    _assert_matches_dense(got, dense, (1, 5))


def test_invgc_with_zero_rates_is_the_identity_up_to_normalisation():
    images, _, _, bank = _paired(4)
    corr = build_correction("invgc", r_g=0.0, r_q=0.0).fit(bank)
    assert torch.allclose(corr.gallery("image", images)[0], F.normalize(images, dim=-1))


# ---- none, save / load, config -------------------------------------------------------------------------
def test_none_changes_nothing():
    images, texts, t2i, bank = _paired(5)
    none = build_correction("none")
    assert none.fitted and none.fit(bank) is none and none.bank is None
    kw = apply_correction(none, images, texts)
    assert torch.equal(kw["image_emb"], images) and torch.equal(kw["text_emb"], texts)
    assert kw["image_gallery_emb"] is None and kw["text_gallery_emb"] is None
    assert kw["image_offset"] is None and kw["text_offset"] is None and kw["score_fn"] is None
    ks = (1, 5, 10)
    assert retrieval_metrics(**kw, text_to_image=t2i, ks=ks) == retrieval_metrics(
        images, texts, t2i, ks=ks
    )


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("none", {}),
        ("qb-norm", {"beta": 13.5}),
        ("dual-softmax", {"beta": 3.0}),
        ("invgc", {"r_g": 0.3, "r_q": 0.6, "k": 4}),
    ],
)
def test_save_load_round_trip_gives_identical_outputs(tmp_path, name, params):
    images, texts, t2i, bank = _paired(6)
    corr = build_correction(name, **params).fit(bank)
    corr.save(tmp_path / "c")
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == (["config.json"] if name == "none" else ["config.json", "weights.safetensors"])
    assert json.loads((tmp_path / "c" / "config.json").read_text()) == {
        "format": 2, "kind": "correction", "name": name, "options": params,
    }
    same = RetrievalCorrection.load(tmp_path / "c")
    assert type(same) is type(corr) and same.config() == corr.config() == {"name": name, **params}
    before, after = apply_correction(corr, images, texts), apply_correction(same, images, texts)
    assert set(before) == set(after)
    for key in set(before) - {"score_fn"}:
        assert (before[key] is None and after[key] is None) or torch.equal(before[key], after[key])
    ks = (1, 5)
    assert retrieval_metrics(**before, text_to_image=t2i, ks=ks) == retrieval_metrics(
        **after, text_to_image=t2i, ks=ks
    )
    # and a subclass loads only its own kind
    assert type(corr).load(tmp_path / "c").config() == corr.config()


def test_registry_and_config_rebuild():
    assert set(CORRECTIONS) == {"none", "qb-norm", "dual-softmax", "invgc"}
    assert correction_options("qb-norm") == {"beta": 20.0}
    assert correction_options("invgc") == {"r_g": 0.1, "r_q": 0.1, "k": 10}
    corr = build_correction("invgc", k=7)
    assert build_correction(**corr.config()).config() == corr.config()
    assert not corr.fitted and "unfitted" in repr(corr)


# ---- errors ----------------------------------------------------------------------------------------------
def test_bad_inputs_are_clear_errors(tmp_path):
    images, texts, t2i, bank = _paired(7)
    with pytest.raises(AnybindError, match=r"unknown correction 'qbnorm' \(did you mean 'qb-norm'"):
        build_correction("qbnorm")
    with pytest.raises(AnybindError, match="has no option 'temperature'.*accepts: beta"):
        build_correction("qb-norm", temperature=0.05)
    with pytest.raises(AnybindError, match="beta must be above 0"):
        build_correction("qb-norm", beta=0)
    with pytest.raises(AnybindError, match="beta must be a finite number"):
        build_correction("dual-softmax", beta=float("nan"))
    with pytest.raises(AnybindError, match="k must be at least 1"):
        build_correction("invgc", k=0)
    with pytest.raises(AnybindError, match="r_q must be at least 0"):
        build_correction("invgc", r_q=-0.1)
    qb = build_correction("qb-norm")
    with pytest.raises(AnybindError, match="not fitted: call fit"):
        qb.gallery("image", images)
    with pytest.raises(AnybindError, match="not fitted: call fit"):
        qb.save(tmp_path / "x")
    with pytest.raises(AnybindError, match="lacks 'text'"):
        qb.fit({"image": bank["image"]})
    with pytest.raises(AnybindError, match="has unknown 'audio'"):
        qb.fit({**bank, "audio": bank["image"]})
    with pytest.raises(AnybindError, match="share the embedding dimension"):
        qb.fit({"image": bank["image"], "text": bank["text"][:, :4]})
    with pytest.raises(AnybindError, match=r"bank\['text'\] must be a non-empty"):
        qb.fit({"image": bank["image"], "text": bank["text"][0]})
    with pytest.raises(AnybindError, match="fits on a bank"):
        qb.fit([bank["image"], bank["text"]])
    qb.fit(bank)
    with pytest.raises(
        AnybindError, match="fitted on 6-dim embeddings, but the image gallery is 4-dim"
    ):
        qb.gallery("image", images[:, :4])
    with pytest.raises(AnybindError, match="modality must be one of image, text"):
        qb.gallery("audio", images)
    with pytest.raises(AnybindError, match="takes a RetrievalCorrection"):
        apply_correction("qb-norm", images, texts)
    # retrieval_metrics' own checks on offsets and score_fn
    with pytest.raises(AnybindError, match=r"image_offset must give one value per image \(23\)"):
        retrieval_metrics(images, texts, t2i, image_offset=np.zeros(len(texts)))
    with pytest.raises(AnybindError, match="text_offset must give one value per caption"):
        retrieval_metrics(images, texts, t2i, text_offset=np.zeros((len(texts), 1)))
    with pytest.raises(AnybindError, match="image_offset holds NaN"):
        retrieval_metrics(images, texts, t2i, image_offset=np.full(len(images), np.nan))
    with pytest.raises(AnybindError, match=r"image_gallery_emb must have the shape of image_emb"):
        retrieval_metrics(images, texts, t2i, image_gallery_emb=images[:5])
    with pytest.raises(AnybindError, match="text_gallery_emb holds NaN"):
        retrieval_metrics(images, texts, t2i, text_gallery_emb=texts * np.nan)
    with pytest.raises(AnybindError, match="score_fn must be a function"):
        retrieval_metrics(images, texts, t2i, score_fn=3)
    with pytest.raises(AnybindError, match="score_fn returned shape"):
        retrieval_metrics(images, texts, t2i, score_fn=lambda s, o: s[:, :1])
    # loading
    with pytest.raises(AnybindError, match="no config.json"):
        RetrievalCorrection.load(tmp_path / "nothing")
    qb.save(tmp_path / "qb")
    (tmp_path / "qb" / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(AnybindError, match="weights.safetensors is unreadable"):
        RetrievalCorrection.load(tmp_path / "qb")
    (tmp_path / "qb" / "weights.safetensors").unlink()
    with pytest.raises(AnybindError, match="no weights.safetensors.*interrupted"):
        RetrievalCorrection.load(tmp_path / "qb")
    build_correction("invgc").fit(bank).save(tmp_path / "inv")
    with pytest.raises(AnybindError, match="holds a 'invgc' correction, not a QBNorm"):
        type(qb).load(tmp_path / "inv")


def test_two_saves_of_the_same_correction_are_byte_identical(tmp_path):
    *_, bank = _paired(6)
    corr = build_correction("invgc", k=3).fit(bank)
    corr.save(tmp_path / "a")
    corr.save(tmp_path / "b")
    for file in ("config.json", "weights.safetensors"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_a_correction_saved_in_the_old_format_is_refused_with_what_to_do(tmp_path):
    old = tmp_path / "old"
    old.mkdir()  # format 1: correction.json + bank.safetensors
    (old / "correction.json").write_text(json.dumps({"format": 1, "name": "qb-norm", "beta": 20.0}))
    (old / "bank.safetensors").write_bytes(b"")
    with pytest.raises(AnybindError, match=r"format 1 \(correction.json\); this anybind reads format 2: fit"):
        RetrievalCorrection.load(old)


def test_the_sides_take_the_pair_aliases_and_a_registered_correction_is_listed():
    images, texts, _, bank = _paired(6)
    by_name = build_correction("qb-norm").fit(bank)
    by_alias = build_correction("qb-norm").fit({"first": bank["image"], 1: bank["text"]})
    assert torch.equal(by_name.bank["image"], by_alias.bank["image"])
    assert torch.equal(by_name.gallery("text", texts)[1], by_alias.gallery("second", texts)[1])
    with pytest.raises(AnybindError, match="gives the image side twice"):
        build_correction("qb-norm").fit({**bank, "first": bank["image"]})
    assert {e.name for e in CORRECTIONS.describe()} == {"none", "qb-norm", "dual-softmax", "invgc"}
    with pytest.raises(AnybindError, match="already registered"):
        register_correction("qb-norm")(type(build_correction("invgc")))
    assert build_correction("invgc").name == "invgc"
