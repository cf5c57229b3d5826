"""Losses on embeddings: small cases worked out by hand, chunked == unchunked, STRUCTURE's invariances."""

from __future__ import annotations

import math

import pytest
import torch

from anybind.align.losses import (
    LOSSES,
    InfoNCE,
    LossError,
    SigLIP,
    build_loss,
    build_objective,
    register_loss,
    resolve_loss_section,
)
from anybind.align.structure import StructureRegulariser, structure_regulariser, warmup_weight
from anybind.errors import AnybindError

#: The two-modality losses, ``forward(za, zb, pos)`` (the joint ones, over N modalities, are
#: tested in tests/test_joint_losses.py).
PAIR_LOSSES = [n for n in sorted(LOSSES) if not getattr(LOSSES.get(n), "joint", False)]


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ---- InfoNCE -----------------------------------------------------------------------------------------
def test_infonce_two_by_two_by_hand():
    # a0 = (1, 0), a1 = (0, 1); b0 = (1, 0), b1 = (0.6, 0.8): cosines [[1, 0.6], [0, 0.8]].
    # temperature 0.5 -> logit scale 2 -> logits l = [[2, 1.2], [0, 1.6]].
    # a->b row 0: -log(e^2 / (e^2 + e^1.2))   = log(1 + e^-0.8)
    # a->b row 1: -log(e^1.6 / (e^0 + e^1.6)) = log(1 + e^-1.6)
    # b->a uses l.T = [[2, 0], [1.2, 1.6]]:
    # b->a row 0: -log(e^2 / (e^2 + e^0))     = log(1 + e^-2)
    # b->a row 1: -log(e^1.6 / (e^1.2 + e^1.6)) = log(1 + e^-0.4)
    # loss = mean over the two directions of the mean over rows = (sum of the four) / 4.
    expected = (softplus(-0.8) + softplus(-1.6) + softplus(-2.0) + softplus(-0.4)) / 4
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]]) * 3.0  # norms do not matter: normalised inside
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]]) * 0.5
    loss = InfoNCE(temperature=0.5)(a, b)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert InfoNCE(temperature=0.5, chunk_size=1)(a, b).item() == pytest.approx(expected, rel=1e-6)


def test_infonce_several_positives_by_hand():
    # 2 images, 3 captions: image 0 has captions 0 and 1, image 1 has caption 2.
    # a0 = (1, 0), a1 = (0, 1); b0 = (1, 0), b1 = (0, 1), b2 = (0, 1); temperature 1 -> scale 1.
    # logits l = a b^T = [[1, 0, 0], [0, 1, 1]];  pos = [[1, 1, 0], [0, 0, 1]].
    # a->b row 0: -log((e^1 + e^0) / (e^1 + e^0 + e^0)) = log((e + 2) / (e + 1))   (both captions count)
    # a->b row 1: -log(e^1 / (e^0 + e^1 + e^1))          = log((1 + 2e) / e)
    # b->a (l.T = [[1, 0], [0, 1], [0, 1]], pos.T = [[1, 0], [1, 0], [0, 1]]):
    #   row 0: -log(e / (e + 1)) = log((e + 1) / e);  row 1: -log(1 / (1 + e)) = log(1 + e);
    #   row 2: log((e + 1) / e)
    e = math.e
    a_to_b = (math.log((e + 2) / (e + 1)) + math.log((1 + 2 * e) / e)) / 2
    b_to_a = (2 * math.log((e + 1) / e) + math.log(1 + e)) / 3
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    pos = torch.tensor([[True, True, False], [False, False, True]])
    for chunk in (None, 1, 2):
        loss = InfoNCE(temperature=1.0, chunk_size=chunk)(a, b, pos)
        assert loss.item() == pytest.approx((a_to_b + b_to_a) / 2, rel=1e-6)


def reference_infonce(za, zb, pos, scale):
    """The definition, one row at a time."""
    a, b = torch.nn.functional.normalize(za, dim=-1), torch.nn.functional.normalize(zb, dim=-1)
    logits = scale * a @ b.T

    def direction(lg, ps):
        rows = [-(lg[i][ps[i]].exp().sum() / lg[i].exp().sum()).log() for i in range(len(lg))]
        return torch.stack(rows).mean()

    return (direction(logits, pos) + direction(logits.T, pos.T)) / 2


def test_infonce_matches_the_definition_with_duplicated_items():
    # the trainer's case: several captions of one item in a batch -> pos = same item id
    g = torch.Generator().manual_seed(0)
    items = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    pos = items[:, None] == items[None, :]
    za, zb = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    loss = InfoNCE(temperature=0.1)(za, zb, pos)
    assert loss.item() == pytest.approx(reference_infonce(za, zb, pos, 10.0).item(), rel=1e-5)


def test_infonce_temperature_is_clamped_and_optionally_fixed():
    loss = InfoNCE()
    assert loss.temperature_value() == pytest.approx(0.07)
    with torch.no_grad():
        loss.log_logit_scale.fill_(math.log(1000.0))
    assert loss.logit_scale().item() == pytest.approx(100.0)
    with torch.no_grad():
        loss.log_logit_scale.fill_(math.log(0.1))
    assert loss.logit_scale().item() == pytest.approx(1.0)
    fixed = InfoNCE(temperature=0.05, learn_temperature=False)
    assert list(fixed.parameters()) == [] and "log_logit_scale" in fixed.state_dict()
    learned = InfoNCE()
    learned(torch.randn(4, 3), torch.randn(4, 3)).backward()
    assert learned.log_logit_scale.grad is not None and learned.log_logit_scale.grad != 0
    with pytest.raises(AnybindError, match="temperature must be in"):
        InfoNCE(temperature=2.0)


def test_losses_ignore_autocast():
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    for loss in (InfoNCE(), SigLIP()):
        full = loss(za, zb)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = loss(za.bfloat16(), zb.bfloat16())
        assert auto.dtype == torch.float32
        assert auto.item() == pytest.approx(
            loss(za.bfloat16().float(), zb.bfloat16().float()).item(), rel=1e-6
        )
        assert full.item() == pytest.approx(auto.item(), rel=2e-2)


# ---- SigLIP ------------------------------------------------------------------------------------------
def test_siglip_two_by_two_by_hand():
    # a = b = identity: cosines [[1, 0], [0, 1]]; t = 10, b = -10.
    # positives (diagonal): logit 10 * 1 - 10 = 0   -> -log sigmoid(0)            = log 2, twice
    # negatives:           logit 10 * 0 - 10 = -10 -> -log sigmoid(-1 * -10)      = log(1 + e^-10), twice
    # loss = (2 log 2 + 2 log(1 + e^-10)) / B, B = 2.
    expected = math.log(2.0) + softplus(-10.0)
    eye = torch.eye(2)
    assert SigLIP()(eye, eye).item() == pytest.approx(expected, rel=1e-6)
    assert SigLIP(chunk_size=1)(eye, eye).item() == pytest.approx(expected, rel=1e-6)


def test_siglip_several_positives_by_hand():
    # one image a0 = (1, 0), two captions b0 = (1, 0), b1 = (0, 1), both positives; t = 1, b = 0.
    # logits [1, 0], z = [+1, +1]: loss = -(log sigmoid(1) + log sigmoid(0)) / 1
    expected = softplus(-1.0) + math.log(2.0)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = SigLIP(scale_init=1.0, bias_init=0.0)(a, b, torch.tensor([[True, True]]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_siglip_scale_and_bias_learn():
    loss = SigLIP()
    assert loss.scale().item() == pytest.approx(10.0) and loss.bias.item() == -10.0
    loss(torch.randn(6, 4), torch.randn(6, 4)).backward()
    assert loss.log_scale.grad != 0 and loss.bias.grad != 0
    assert list(SigLIP(learn_scale_bias=False).parameters()) == []


# ---- chunking ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PAIR_LOSSES)
@pytest.mark.parametrize("with_pos", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 32])
def test_chunked_equals_unchunked(name, with_pos, chunk):
    g = torch.Generator().manual_seed(1)
    n = 33
    items = torch.randint(0, 20, (n,), generator=g)
    pos = (items[:, None] == items[None, :]) if with_pos else None
    base = torch.randn(n, 12, generator=g)

    def run(chunk_size):
        torch.manual_seed(0)
        loss_fn = build_loss(name, chunk_size=chunk_size)
        za = base.clone().requires_grad_(True)
        zb = (base.flip(0) + 0.5).requires_grad_(True)
        value = loss_fn(za, zb, pos)
        value.backward()
        return value.detach(), za.grad, zb.grad, [p.grad for p in loss_fn.parameters()]

    v0, ga0, gb0, gp0 = run(None)
    v1, ga1, gb1, gp1 = run(chunk)
    assert torch.allclose(v0, v1, rtol=1e-6, atol=1e-6)
    assert torch.allclose(ga0, ga1, atol=1e-6) and torch.allclose(gb0, gb1, atol=1e-6)
    assert len(gp0) == len(gp1) > 0
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(gp0, gp1))


# ---- errors ------------------------------------------------------------------------------------------
def test_build_loss_errors():
    assert isinstance(build_loss("infonce", temperature=0.05), InfoNCE)
    with pytest.raises(
        AnybindError,
        match=r"unknown loss 'infonc' \(did you mean 'infonce'\?\); registered losses: "
        r"all-pairs, anchor-infonce, anchor-siglip, infonce, siglip, symile",
    ):
        build_loss("infonc")
    with pytest.raises(
        AnybindError, match=r"no option 'temprature' \(did you mean 'temperature'\?\)"
    ):
        build_loss("infonce", temprature=0.1)
    with pytest.raises(AnybindError, match="chunk_size must be at least 1"):
        build_loss("siglip", chunk_size=0)


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_bad_inputs_are_clear_errors(name):
    loss = build_loss(name)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(AnybindError, match="same out_dim"):
        loss(a, torch.randn(3, 5))
    with pytest.raises(AnybindError, match="pass pos"):
        loss(a, torch.randn(2, 4))
    with pytest.raises(AnybindError, match="boolean"):
        loss(a, b, torch.eye(3))
    no_positive = torch.eye(3, dtype=torch.bool)
    no_positive[1, 1] = False
    with pytest.raises(AnybindError, match="at least one positive"):
        loss(a, b, no_positive)


# ---- STRUCTURE ---------------------------------------------------------------------------------------
def features(n=40, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_structure_is_zero_when_the_geometry_is_kept():
    x = features()
    assert structure_regulariser(x, x).item() == 0.0
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
    # rotations, isotropic scaling and per-row scaling survive normalisation + centring
    assert structure_regulariser(x, 3.0 * x @ q).item() == pytest.approx(0.0, abs=1e-6)
    row_scales = torch.rand(40, 1, generator=torch.Generator().manual_seed(2)) + 0.1
    assert structure_regulariser(x, row_scales * x).item() == pytest.approx(0.0, abs=1e-6)
    # an orthogonal map into a larger space too (z = x Q with Q 16 x 24, orthonormal rows)
    wide, _ = torch.linalg.qr(torch.randn(24, 16, generator=torch.Generator().manual_seed(3)))
    assert structure_regulariser(x, x @ wide.T).item() == pytest.approx(0.0, abs=1e-6)
    for levels in (2, 3):
        assert structure_regulariser(x, x @ q, levels=levels).item() == pytest.approx(0.0, abs=1e-6)


def test_structure_is_positive_when_the_geometry_changes():
    x = features()
    z = features(d=8, seed=5).requires_grad_(True)
    value = structure_regulariser(x, z)
    assert value.item() > 1e-3
    value.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # a shift is not an invariance: rows are normalised before the batch is centred
    assert structure_regulariser(x, x + 1.0).item() > 1e-4


def js_binary(p: float, q: float) -> float:
    m = (p + q) / 2
    kl = lambda a: a * math.log(a / m) + (1 - a) * math.log((1 - a) / (1 - m))  # noqa: E731
    return (kl(p) + kl(q)) / 2


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_structure_two_points_by_hand():
    # X: x1 = (1, 0), x2 = (0, 1) (unit). Centred: c1 = (.5, -.5) = -c2, so S_X = [[.5, -.5], [-.5, .5]]
    # and with tau = 1 row 1 of P_X = softmax(.5, -.5) = (sigmoid(1), sigmoid(-1)).
    # Z: z1 = (1, 0), z2 = (-1, 0): already centred, S_Z = [[1, -1], [-1, 1]], row 1 of P_Z =
    # (sigmoid(2), sigmoid(-2)). Row 2 is the mirror image, so the mean over rows is
    # JS(Bernoulli(sigmoid(1)) || Bernoulli(sigmoid(2))).
    # Level 2: P = [[p, 1-p], [1-p, p]] -> P^2 has p^2 + (1-p)^2 on the diagonal.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    p, q = sigmoid(1.0), sigmoid(2.0)
    js1 = js_binary(p, q)
    js2 = js_binary(p * p + (1 - p) ** 2, q * q + (1 - q) ** 2)
    got = structure_regulariser(x, z, tau=1.0)
    assert got.item() == pytest.approx(js1, rel=1e-5)
    uniform = structure_regulariser(x, z, tau=1.0, levels=2)
    assert uniform.item() == pytest.approx((js1 + js2) / 2, rel=1e-5)
    inverse = structure_regulariser(x, z, tau=1.0, levels=2, level_weighting="inverse")
    assert inverse.item() == pytest.approx((js1 + js2 / 2) / 1.5, rel=1e-5)
    # a smaller tau sharpens both rows: here, a different value
    assert structure_regulariser(x, z, tau=0.5).item() != pytest.approx(js1, rel=1e-3)


def test_structure_sub_batch_when_larger_than_max_batch():
    x, z = features(n=50), features(n=50, d=8, seed=7)
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    keep = torch.randperm(50, generator=g(3))[:20]
    sub = structure_regulariser(x, z, max_batch=20, generator=g(3))
    assert sub.item() == pytest.approx(structure_regulariser(x[keep], z[keep]).item(), rel=1e-6)
    assert (
        structure_regulariser(x, z, max_batch=20, generator=g(3)).item() == sub.item()
    )  # deterministic
    assert structure_regulariser(x, z, max_batch=20, generator=g(4)).item() != sub.item()
    # at or below max_batch the whole batch is used, whatever the generator
    full = structure_regulariser(x, z, max_batch=50, generator=g(3))
    assert full.item() == structure_regulariser(x, z).item()


def test_structure_module_and_warmup():
    x, z = features(), features(d=8, seed=9)
    reg = StructureRegulariser(
        levels=2, tau=0.1, level_weighting="inverse", weight=10.0, warmup_steps=100
    )
    assert (
        reg(x, z).item()
        == structure_regulariser(x, z, levels=2, tau=0.1, level_weighting="inverse").item()
    )
    assert [reg.weight(s) for s in (0, 50, 100, 250)] == [0.0, 5.0, 10.0, 10.0]
    assert warmup_weight(0, 10.0, 0) == 10.0 and warmup_weight(3, 2.0, 4) == 1.5
    assert StructureRegulariser().tau == 0.05


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"level_weighting": "log"}, "level_weighting must be one of uniform, inverse"),
        ({"tau": 0.0}, "tau must be above 0"),
        ({"tau": float("nan")}, "tau must be a finite number"),
        ({"levels": 0}, "levels must be at least 1"),
        ({"max_batch": 1}, "max_batch must be at least 2"),
    ],
)
def test_structure_bad_settings(kwargs, message):
    with pytest.raises(AnybindError, match=message):
        structure_regulariser(features(), features(), **kwargs)
    with pytest.raises(AnybindError, match=message):
        StructureRegulariser(**kwargs)


def test_structure_bad_shapes():
    with pytest.raises(AnybindError, match="same rows"):
        structure_regulariser(features(n=4), features(n=5))
    with pytest.raises(AnybindError, match="at least 2 rows"):
        structure_regulariser(features(n=1), features(n=1))
    with pytest.raises(AnybindError, match="step and warmup_steps"):
        warmup_weight(-1, 1.0, 10)


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_chunked_loss_keeps_no_batch_by_batch_tensor_for_backward(name):
    # what autograd keeps between forward and backward: with chunks, at most chunk x B per tensor
    # (each chunk is recomputed in backward), so a 32k batch never holds 32k x 32k logits
    n, chunk = 256, 16
    za, zb = torch.randn(n, 8, requires_grad=True), torch.randn(n, 8, requires_grad=True)
    for chunk_size in (None, chunk):
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = build_loss(name, chunk_size=chunk_size)(za, zb)
        loss.backward()
        if chunk_size is None:
            assert max(saved) == n * n  # the full logits: what chunking avoids
        else:
            assert max(saved) <= chunk * n


# ---- the registry, a recipe's loss section, the objective ---------------------------------------------
def test_losses_are_a_registry_of_modules():
    assert LOSSES.names() == ["all-pairs", "anchor-infonce", "anchor-siglip", "infonce", "siglip", "symile"]
    assert PAIR_LOSSES == ["infonce", "siglip"]
    assert LOSSES.get("infonce") is InfoNCE and LOSSES.get("siglip") is SigLIP
    assert LOSSES.options("infonce") == {"temperature": 0.07, "learn_temperature": True, "chunk_size": None}


def test_loss_section_is_resolved_with_every_default():
    section = resolve_loss_section({"temperature": "1e-1", "structure_weight": 5, "structure_tau": None})
    assert dict(section) == {
        "name": "infonce", "temperature": 0.1, "learn_temperature": True, "chunk_size": None,
        "structure_weight": 5.0, "structure_levels": 1, "structure_tau": 0.05,
        "structure_level_weighting": "uniform", "structure_warmup_steps": 0, "structure_max_batch": 4096,
    }
    assert section.name == "infonce" and section.structure_weight == 5.0  # attribute access too
    assert resolve_loss_section(section) == section  # resolving is idempotent: a saved recipe reloads
    assert resolve_loss_section({"name": "siglip"})["scale_init"] == 10.0
    with pytest.raises(AttributeError, match="no 'temprature'"):
        section.temprature  # noqa: B018


def test_objective_from_a_section():
    objective = build_objective({"name": "infonce", "temperature": 0.05, "learn_temperature": False,
                                 "structure_weight": 10, "structure_warmup_steps": 100, "structure_levels": 2})
    assert isinstance(objective.contrastive, InfoNCE) and objective.contrastive.temperature_value() == pytest.approx(0.05)
    assert isinstance(objective.structure, StructureRegulariser) and objective.structure.levels == 2
    assert [objective.weight(s) for s in (0, 50, 100, 200)] == [0.0, 5.0, 10.0, 10.0]
    off = build_objective({"name": "siglip", "chunk_size": 8})  # structure_weight 0: no regulariser
    assert isinstance(off.contrastive, SigLIP) and off.contrastive.chunk_size == 8
    assert off.structure is None and off.weight(10) == 0.0
    assert isinstance(build_objective().contrastive, InfoNCE)


@pytest.mark.parametrize(("section", "message"), [
    ({"name": "infonc"}, r"loss.name must be one of all-pairs, anchor-infonce, anchor-siglip, infonce, siglip, symile, not 'infonc' \(did you mean 'infonce'\?\)"),
    ({"temprature": 0.1}, r"unknown recipe key 'loss.temprature' \(did you mean 'temperature'\?\)"),
    ({"structure_levle": 2}, r"unknown recipe key 'loss.structure_levle' \(did you mean 'structure_levels'\?\)"),
    ({"name": "siglip", "temperature": 0.1}, r"'loss.temperature': loss 'siglip' takes scale_init"),
    ({"temperature": float("nan")}, "loss.temperature: infonce: temperature must be a finite number, not nan"),
    ({"temperature": "inf"}, "loss.temperature: .*finite number, not inf"),
    ({"structure_weight": -1}, "loss.structure_weight: structure: weight must be at least 0"),
    ({"structure_tau": "nan"}, "loss.structure_tau: .*finite number"),
    ({"structure_level_weighting": "log"}, "loss.structure_level_weighting: .*one of uniform, inverse"),
    ({"chunk_size": 0, "temperature": 0.1}, "loss.chunk_size: infonce: chunk_size must be at least 1"),
    ([1, 2], "loss must be a mapping"),
])
def test_bad_loss_sections_name_the_key(section, message):
    with pytest.raises(LossError, match=message):
        build_objective(section)
    with pytest.raises(LossError, match=message):
        resolve_loss_section(section)


def test_a_registered_loss_owns_its_options():
    @register_loss("test-margin")
    class Margin(torch.nn.Module):
        """A toy loss with one option."""

        def __init__(self, *, margin: float = 0.0):
            super().__init__()
            self.margin = margin

        def forward(self, za, zb, pos=None):
            return (1 - torch.nn.functional.cosine_similarity(za, zb) - self.margin).clamp_min(0).mean()

    try:
        objective = build_objective({"name": "test-margin", "margin": "2e-1", "structure_weight": 1})
        assert objective.contrastive.margin == 0.2 and objective.structure is not None
        assert resolve_loss_section({"name": "test-margin"}) == {"name": "test-margin", "margin": 0.0,
                                                                   **{k: v for k, v in resolve_loss_section().items()
                                                                      if k.startswith("structure_")}}
        with pytest.raises(LossError, match=r"'loss.margn' \(did you mean 'margin'\?\)"):
            build_objective({"name": "test-margin", "margn": 0.1})
        with pytest.raises(AnybindError, match="already registered"):
            register_loss("test-margin", InfoNCE)
    finally:
        LOSSES.unregister("test-margin")
    assert "test-margin" not in LOSSES


def test_a_required_loss_option_is_asked_for():
    class Needs(torch.nn.Module):
        def __init__(self, *, width: int, scale: float = 1.0):
            super().__init__()
            self.width, self.scale = width, scale

    register_loss("test-needs", Needs)
    try:
        assert resolve_loss_section({"name": "test-needs", "width": 3})["scale"] == 1.0
        with pytest.raises(LossError, match="loss: .*missing 1 required keyword-only argument: 'width'"):
            build_objective({"name": "test-needs", "scale": 2.0})
    finally:
        LOSSES.unregister("test-needs")
