"""Projectors: every registered kind builds, learns (all parameters get gradient), saves and loads."""

from __future__ import annotations

import json

import pytest
import torch

from anybind.align.losses import InfoNCE
from anybind.align.projectors import (
    PROJECTORS,
    LayerMixProjector,
    LinearProjector,
    LowRankProjector,
    Projector,
    build_projector,
    projector_options,
    register_projector,
)
from anybind.errors import AnybindError

LAYER_DIMS = [5, 7, 6]


def make(name: str, **options) -> Projector:
    in_dim = LAYER_DIMS if PROJECTORS.get(name).takes_layers else 6
    return build_projector(name, in_dim, 4, **options)


def example_input(projector: Projector, batch: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if projector.takes_layers:
        # layers on very different scales, as cached layers are: the per-layer LayerNorm copes
        return [
            torch.randn(batch, d, generator=g) * (10.0**i) for i, d in enumerate(projector.in_dim)
        ]
    return torch.randn(batch, projector.in_dim, generator=g)


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_output_shape_and_config_is_json(name):
    proj = make(name)
    out = proj(example_input(proj))
    assert out.shape == (16, 4)
    assert torch.isfinite(out).all()
    config = json.loads(json.dumps(proj.config))
    assert config["name"] == name and config["out_dim"] == 4
    assert set(config) == {"name", "in_dim", "out_dim", *projector_options(name)}


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_every_parameter_gets_gradient_on_the_first_step(name):
    torch.manual_seed(0)
    proj = make(name)
    proj.train()
    x = example_input(proj, batch=32)
    target = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    loss = InfoNCE()(proj(x), target)  # a real first step: contrastive loss against fixed targets
    loss.backward()
    for pname, p in proj.named_parameters():
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name}.{pname} got an all-zero gradient"


def test_lowrank_gate_and_residual_learn():
    # the reference head starts its gate at exactly 0 and its up-projection at zero: neither can
    # ever move. Here one optimiser step moves both the gate and the up-projection.
    torch.manual_seed(0)
    proj = make("lowrank", rank=3)
    gate0, up0 = proj.gate().item(), proj.up.weight.detach().clone()
    assert 0 < gate0 < 1 and gate0 == pytest.approx(0.1)
    opt = torch.optim.SGD(proj.parameters(), lr=0.5)
    InfoNCE()(proj(example_input(proj)), torch.randn(16, 4)).backward()
    opt.step()
    assert proj.gate().item() != pytest.approx(gate0, abs=1e-7)
    assert not torch.equal(proj.up.weight, up0)


def test_lowrank_skip_starts_orthogonal():
    wide = LowRankProjector(6, 4)  # out <= in: rows orthonormal
    assert torch.allclose(wide.skip.weight @ wide.skip.weight.T, torch.eye(4), atol=1e-5)
    tall = LowRankProjector(4, 6)  # out > in: columns orthonormal
    assert torch.allclose(tall.skip.weight.T @ tall.skip.weight, torch.eye(4), atol=1e-5)


def test_star_is_the_gated_product():
    torch.manual_seed(0)
    proj = make("star")
    assert proj.w1.out_features == 6 * 8  # hidden width 8x input by default
    x = example_input(proj)
    h = proj.norm(x)
    expected = proj.g(torch.clamp(proj.w1(h), 0, 6) * proj.w2(h))
    assert torch.allclose(proj(x), expected)
    assert make("star", hidden_mult=2).w1.out_features == 12


def test_mlp_depth_width_and_layernorm():
    proj = make("mlp", depth=3, hidden_dim=10, layernorm=False)
    linears = [m for m in proj.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 10), (10, 10), (10, 4)]
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in proj.modules())
    assert make("mlp").config["hidden_dim"] == 12  # 2 * max(in, out)
    assert len([m for m in make("mlp", depth=1).modules() if isinstance(m, torch.nn.Linear)]) == 1


def test_layermix_weights_and_inputs():
    torch.manual_seed(0)
    proj = make("layermix")
    w = proj.layer_weights()
    assert torch.allclose(w, torch.full((3,), 1 / 3)) and w.sum().item() == pytest.approx(1.0)
    x = example_input(proj)
    names = {"layer.4": x[0], "layer.8": x[1], "final": x[2]}
    assert torch.equal(proj(x), proj(names))
    assert torch.equal(proj(x), proj(tuple(x)))
    with torch.no_grad():
        proj.mix_logits.copy_(torch.tensor([0.0, 0.0, 50.0]))  # all weight on the last layer
    only_last = proj.heads[2](proj.norms[2](x[2]))
    assert torch.allclose(proj(x), only_last, atol=1e-5)
    with pytest.raises(AnybindError, match="3 layers"):
        proj(x[:2])
    with pytest.raises(AnybindError, match="layer 1 should have dimension 7"):
        proj([x[0], x[2], x[1]])
    one = LayerMixProjector([5], 4)
    assert one(torch.randn(2, 5)).shape == (2, 4)  # one layer may come as a bare tensor


def test_fp16_features_are_accepted():
    proj = make("linear")
    x = example_input(proj)
    assert torch.allclose(proj(x.half()), proj(x.half().float()))


def test_wrong_feature_dimension_is_a_clear_error():
    with pytest.raises(AnybindError, match="dimension 6"):
        make("mlp")(torch.randn(3, 5))


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_save_load_round_trip(name, tmp_path):
    torch.manual_seed(0)
    proj = make(name)
    with torch.no_grad():  # move every weight off its initial value so the test sees real weights
        for p in proj.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    proj.save(tmp_path / name)
    assert sorted(f.name for f in (tmp_path / name).iterdir()) == [
        "config.json",
        "weights.safetensors",
    ]
    torch.manual_seed(123)  # a different init: only the saved weights can make outputs equal
    back = Projector.load(tmp_path / name)
    assert type(back) is type(proj) and back.config == proj.config
    proj.eval(), back.eval()
    x = example_input(proj)
    assert torch.equal(proj(x), back(x))


def test_load_through_a_subclass_checks_the_kind(tmp_path):
    make("linear").save(tmp_path / "p")
    assert isinstance(LinearProjector.load(tmp_path / "p"), LinearProjector)
    with pytest.raises(AnybindError, match="holds a 'linear' projector"):
        LowRankProjector.load(tmp_path / "p")


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(AnybindError, match="no config.json"):
        Projector.load(tmp_path / "nothing")
    make("mlp").save(tmp_path / "p")
    (tmp_path / "p" / "weights.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AnybindError, match="weights.safetensors is unreadable"):
        Projector.load(tmp_path / "p")
    (tmp_path / "p" / "weights.safetensors").unlink()
    with pytest.raises(AnybindError, match="no weights.safetensors.*interrupted"):
        Projector.load(tmp_path / "p")
    (tmp_path / "p" / "config.json").write_text("{not json")
    with pytest.raises(AnybindError, match="config.json is unreadable"):
        Projector.load(tmp_path / "p")
    # weights that do not fit the config: strict load refuses
    make("mlp").save(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    options = {**config["options"], "hidden_dim": 5}
    (tmp_path / "q" / "config.json").write_text(json.dumps({**config, "options": options}))
    with pytest.raises(AnybindError, match="do not fit"):
        Projector.load(tmp_path / "q")
    (tmp_path / "q" / "config.json").write_text(json.dumps({**config, "name": "nope"}))
    with pytest.raises(AnybindError, match="unknown projector 'nope'"):
        Projector.load(tmp_path / "q")


def test_unknown_names_and_options_are_clear_errors():
    with pytest.raises(
        AnybindError,
        match=r"unknown projector 'mpl' \(did you mean 'mlp'\?\); registered projectors: "
        r"layermix, linear, lowrank, mlp, star",
    ):
        build_projector("mpl", 6, 4)
    with pytest.raises(
        AnybindError,
        match=r"no option 'dept' \(did you mean 'depth'\?\); it accepts: "
        r"depth, dropout, hidden_dim, layernorm",
    ):
        build_projector("mlp", 6, 4, dept=3)
    with pytest.raises(AnybindError, match="accepts: no options"):
        build_projector("layermix", [4, 4], 4, rank=3)


@pytest.mark.parametrize(
    ("name", "in_dim", "options", "message"),
    [
        ("mlp", 6, {"depth": 0}, "depth must be at least 1"),
        ("mlp", 6, {"dropout": 1.5}, "dropout must be below 1"),
        ("mlp", 6, {"dropout": 1.0}, "dropout must be below 1"),
        ("lowrank", 6, {"dropout": -0.1}, "dropout must be at least 0"),
        ("mlp", 6, {"layernorm": "yes"}, "layernorm must be true or false"),
        ("mlp", 6, {"pca": 0}, "pca must be at least 1"),
        ("mlp", 6, {"pca": 2, "pca_whiten": "yes"}, "pca_whiten must be true or false"),
        ("lowrank", 6, {"gate_init": 0.0}, "gate_init must be strictly between 0 and 1"),
        ("star", 6, {"hidden_mult": -1}, "hidden_mult must be above 0"),
        ("linear", [6, 6], {}, "use the 'layermix' projector"),
        ("layermix", 6, {}, "list of per-layer dims"),
        ("linear", 0, {}, "in_dim must be at least 1"),
    ],
)
def test_bad_values_are_clear_errors(name, in_dim, options, message):
    with pytest.raises(AnybindError, match=message):
        build_projector(name, in_dim, 4, **options)


def test_register_a_new_projector():
    @register_projector("_test_scaled")
    class Scaled(Projector):
        def __init__(self, in_dim: int, out_dim: int, *, factor: float = 2.0):
            super().__init__(in_dim, out_dim, {"factor": factor})
            self.linear = torch.nn.Linear(in_dim, out_dim)
            self.factor = factor

        def forward(self, x):
            return self.factor * self.linear(self._prepare(x))

    try:
        proj = build_projector("_test_scaled", 3, 2, factor=3.0)
        assert proj.config == {"name": "_test_scaled", "in_dim": 3, "out_dim": 2, "factor": 3.0}
        with pytest.raises(AnybindError, match="already registered"):
            register_projector("_test_scaled")(LinearProjector)
        assert LinearProjector.name == "linear"  # a refused registration renames nothing
        with pytest.raises(AnybindError, match="decorates Projector subclasses"):
            register_projector("_test_not_a_projector")(torch.nn.Linear)
        assert "_test_not_a_projector" not in PROJECTORS
    finally:
        PROJECTORS.unregister("_test_scaled")


def test_registry_lists_options_and_help():
    assert projector_options("mlp") == {"depth": 2, "hidden_dim": None, "dropout": 0.0, "layernorm": True, "pca": None,
                                        "pca_whiten": False}
    assert projector_options("layermix") == {}  # in_dim and out_dim are not options
    assert {e.name: e.help for e in PROJECTORS.describe()}["linear"].startswith("One linear map")


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_two_saves_of_the_same_projector_are_byte_identical(name, tmp_path):
    proj = make(name)
    proj.save(tmp_path / "a")
    proj.save(tmp_path / "b")
    for file in ("config.json", "weights.safetensors"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_the_saved_config_is_the_saved_part_contract(tmp_path):
    make("lowrank", rank=3).save(tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config == {"format": 2, "kind": "projector", "name": "lowrank",
                      "options": {"rank": 3, "gate_init": 0.1, "dropout": 0.0}, "in_dim": 6, "out_dim": 4}


def test_a_projector_saved_in_the_old_format_is_refused_with_what_to_do(tmp_path):
    old = tmp_path / "old"
    old.mkdir()  # format 1: config.json without "format", weights in model.safetensors
    (old / "config.json").write_text(json.dumps({"name": "linear", "in_dim": 6, "out_dim": 4, "bias": True}))
    (old / "model.safetensors").write_bytes(b"")
    with pytest.raises(AnybindError, match=r"format 1; this anybind reads format 2: train or export it again"):
        Projector.load(old)


def test_another_kind_of_saved_part_is_refused(tmp_path):
    from anybind.saving import save_part

    save_part(tmp_path / "c", "correction", "none")
    with pytest.raises(AnybindError, match="holds a saved 'correction', not a projector"):
        Projector.load(tmp_path / "c")


# ---- mlp with pca: the k leading principal directions of the training inputs, fitted once ----------
def _anisotropic(n: int = 400, d: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([5.0, 3.0, 2.0, 0.5, 0.2, 0.1])[:d]
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales @ rotation.T + 7.0).float()


def test_pca_keeps_the_leading_principal_directions():
    x = _anisotropic()
    proj = build_projector("mlp", 6, 4, pca=2)
    proj.fit_inputs(x)
    # the same subspace as numpy's SVD of the centred data (up to each direction's sign)
    xc = (x.double() - x.double().mean(0)).numpy()
    _, s, vt = __import__("numpy").linalg.svd(xc, full_matrices=False)
    basis = proj.pca.basis.double().numpy()
    assert abs(abs(basis[:, 0] @ vt[0]) - 1) < 1e-5 and abs(abs(basis[:, 1] @ vt[1]) - 1) < 1e-5
    z = proj.pca(x)
    assert z.shape == (400, 2) and abs(float(z.mean(0).abs().max())) < 1e-4  # centred
    # the variance kept per direction is the top singular values' share
    assert torch.allclose(z.double().var(0), torch.tensor(s[:2] ** 2 / 399), rtol=1e-4)
    assert proj.config["pca"] == 2 and proj.config["pca_whiten"] is False
    assert proj.net[0].normalized_shape == (2,)  # the LayerNorm and first layer read the k directions


def test_pca_whiten_gives_unit_variance_and_fits_reproducibly():
    x = _anisotropic()
    a, b = build_projector("mlp", 6, 4, pca=3, pca_whiten=True), build_projector("mlp", 6, 4, pca=3, pca_whiten=True)
    a.fit_inputs(x), b.fit_inputs(x.clone())
    assert torch.allclose(a.pca(x).var(0), torch.ones(3), atol=1e-3)
    assert torch.equal(a.pca.basis, b.pca.basis)  # signs fixed: the same fit twice


def test_pca_unfitted_or_too_large_is_a_clear_error(tmp_path):
    proj = build_projector("mlp", 6, 4, pca=2)
    with pytest.raises(AnybindError, match="never fitted"):
        proj(torch.randn(3, 6))
    with pytest.raises(AnybindError, match="exceeds the input dimension"):
        build_projector("mlp", 6, 4, pca=7)
    with pytest.raises(AnybindError, match="at least 2 training rows"):
        proj.fit_inputs(torch.randn(1, 6))


def test_pca_is_saved_with_the_weights(tmp_path):
    x = _anisotropic()
    proj = build_projector("mlp", 6, 4, pca=2, pca_whiten=True)
    proj.fit_inputs(x)
    proj.save(tmp_path / "p")
    back = Projector.load(tmp_path / "p")
    proj.eval(), back.eval()
    assert torch.equal(proj(x), back(x)) and int(back.pca.fitted_rows) == 400
