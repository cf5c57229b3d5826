"""The fast paths of the losses give today's values and gradients: each is checked against a
verbatim copy of the implementation it replaced (issue 19), on random tensors, ties and zeros."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from anybind.align import blocks, losses, structure
from anybind.align.blocks import fp32 as _fp32
from anybind.align.losses import InfoNCE
from anybind.align.structure import _structure_settings, structure_regulariser
from anybind.errors import AnybindError


# ---- the reference: today's implementation, verbatim ------------------------------------------------
def reference_structure(x, z, *, levels=1, tau=0.05, level_weighting="uniform", max_batch=4096, generator=None):
    levels, tau, weights, max_batch = _structure_settings(levels, tau, level_weighting, max_batch)
    if x.shape[0] > max_batch:
        keep = torch.randperm(x.shape[0], generator=generator)[:max_batch].to(x.device)
        x, z = x[keep], z[keep.to(z.device)]
    with _fp32():
        p_x = _random_walk(x.float(), tau)
        p_z = _random_walk(z.float(), tau)
        total = z.new_zeros((), dtype=torch.float32)
        step_x, step_z = p_x, p_z
        for level, w in enumerate(weights, start=1):
            if level > 1:
                step_x, step_z = step_x @ p_x, step_z @ p_z
            total = total + w * _js_rows(step_x, step_z).mean()
        return total


def _random_walk(y: Tensor, tau: float) -> Tensor:
    """Row-stochastic P = softmax_rows(Y Y^T / tau) of L2-normalised, batch-centred rows."""
    y = F.normalize(y, dim=-1)
    y = y - y.mean(dim=0, keepdim=True)
    return torch.softmax((y @ y.T) / tau, dim=-1)


def _js_rows(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (natural log) between matching rows of two row-stochastic matrices."""
    m = 0.5 * (p + q)
    tiny = torch.finfo(p.dtype).tiny
    log_m = m.clamp_min(tiny).log()

    def kl_to_m(a: Tensor) -> Tensor:  # 0 * log 0 = 0
        return torch.where(a > 0, a * (a.clamp_min(tiny).log() - log_m), torch.zeros_like(a)).sum(
            dim=-1
        )

    return (0.5 * (kl_to_m(p) + kl_to_m(q))).clamp_min(0.0)  # rounding can dip below 0


def reference_infonce(loss: InfoNCE, za, zb, pos=None):
    with _fp32():
        a, b = F.normalize(za.float(), dim=-1), F.normalize(zb.float(), dim=-1)
        scale = loss.logit_scale().float()
        a_to_b = _infonce_rows(a, b, scale, pos, 0) / a.shape[0]
        b_to_a = _infonce_rows(b, a, scale, None if pos is None else pos.T, 0) / b.shape[0]
        return 0.5 * (a_to_b + b_to_a)


def _infonce_rows(q: Tensor, g: Tensor, scale: Tensor, pos: Tensor | None, offset: int) -> Tensor:
    """Sum over these query rows of -log(sum of positive softmax mass); rows start at `offset`."""
    logits = scale * (q @ g.T)
    if pos is None:  # row r's positive is column offset + r
        idx = torch.arange(offset, offset + q.shape[0], device=q.device)
        positive = logits.gather(1, idx[:, None]).squeeze(1)
    else:
        positive = logits.masked_fill(~pos, float("-inf")).logsumexp(dim=1)
    return (logits.logsumexp(dim=1) - positive).sum()


# ---- STRUCTURE ---------------------------------------------------------------------------------------
def value_and_grad(fn, x, z, **kwargs):
    z = z.detach().clone().requires_grad_(True)
    value = fn(x, z, **kwargs)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def assert_same(x, z, **kwargs):
    v_ref, g_ref = value_and_grad(reference_structure, x, z, **kwargs)
    v_new, g_new = value_and_grad(structure_regulariser, x, z, **kwargs)
    assert torch.allclose(v_new, v_ref, rtol=1e-5, atol=1e-8), (v_new, v_ref)
    # a zero row's gradient is its normalised row's divided by F.normalize's eps (1e-12): the
    # rounding of a sum that cancels, magnified; compare it to its own size, the rest together
    zero = (z == 0).all(dim=1)
    error = (g_new - g_ref).norm(dim=1)
    scale = g_ref[~zero].norm(dim=1).max().clamp_min(1e-12)
    assert (error[~zero].max() / scale).item() < 2e-5
    assert bool((error[zero] <= 2e-3 * g_ref[zero].norm(dim=1)).all())


def random_pair(n, dx, dz, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g)
    return x, x[:, :dz] @ torch.randn(dz, dz, generator=g) + 0.7 * torch.randn(n, dz, generator=g)


# batches across the strip (512) and tile (128) sizes of the symmetric Gram, not multiples of them
@pytest.mark.parametrize("n", [2, 3, 37, 129, 700])
@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("level_weighting", ["uniform", "inverse"])
def test_structure_equals_the_reference(n, levels, level_weighting):
    x, z = random_pair(n, 24, 12, seed=n)
    assert_same(x, z, levels=levels, level_weighting=level_weighting)


@pytest.fixture
def small_blocks(monkeypatch):
    """Row blocks of a few rows, so a small batch goes through many blocks and a ragged last one."""
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 1000)


@pytest.mark.parametrize("n", [37, 300])
def test_structure_in_many_row_blocks_equals_the_reference(small_blocks, n):
    x, z = random_pair(n, 20, 10, seed=11)
    assert_same(x, z)
    assert_same(x, z, tau=0.01)


@pytest.mark.parametrize("tau", [0.01, 0.05, 0.3, 2.0])
@pytest.mark.parametrize("levels", [1, 2])
def test_structure_equals_the_reference_for_each_tau(tau, levels):
    # tau 0.01 sends many probabilities to exactly 0 (their logits are 100s apart)
    x, z = random_pair(300, 16, 8, seed=5)
    assert_same(x, z, tau=tau, levels=levels)


def test_structure_with_ties_zeros_and_underflow():
    x, z = random_pair(200, 16, 8, seed=9)
    x[10:20], z[30:40] = x[0], z[1]  # tied rows: tied logits in both walks
    x[50], z[60] = 0.0, 0.0  # zero rows normalise to zero
    z[70:80] = 0.0
    assert_same(x, z)
    assert_same(x, z, tau=0.005)  # rows whose softmax has exact zeros on both sides
    p = torch.softmax(blocks.gram_logits(structure._centred_rows(z), 0.005), dim=1)
    assert bool((p == 0).any())  # the case is exercised


def test_structure_sub_batch_equals_the_reference():
    x, z = random_pair(900, 20, 10, seed=2)
    for levels in (1, 2):
        kwargs = dict(levels=levels, max_batch=600)
        v_ref, g_ref = value_and_grad(reference_structure, x, z, generator=torch.Generator().manual_seed(4), **kwargs)
        v_new, g_new = value_and_grad(structure_regulariser, x, z, generator=torch.Generator().manual_seed(4), **kwargs)
        assert torch.allclose(v_new, v_ref, rtol=1e-5)
        assert ((g_new - g_ref).abs().max() / g_ref.abs().max()).item() < 2e-5
        assert int((g_new != 0).any(dim=1).sum()) == 600  # only the sub-batch's rows get a gradient


def test_structure_kept_geometry_is_exactly_zero_with_zero_gradient():
    x = random_pair(150, 12, 12, seed=3)[0]
    value, grad = value_and_grad(structure_regulariser, x, x.clone())
    assert value.item() == 0.0 and grad.abs().max().item() == 0.0


def test_structure_gradient_w_r_t_x_still_flows_when_x_requires_it():
    x, z = random_pair(64, 10, 6, seed=4)
    xr, xn = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    reference_structure(xr, z).backward()
    structure_regulariser(xn, z).backward()  # the general path: x is not frozen here
    assert torch.allclose(xn.grad, xr.grad, rtol=1e-4, atol=1e-9)


def test_structure_fast_path_ignores_autocast_and_runs_under_no_grad():
    x, z = random_pair(80, 10, 6, seed=6)
    expected = reference_structure(x, z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.allclose(structure_regulariser(x, z), expected, rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(structure_regulariser(x, z), expected, rtol=1e-5)


def test_structure_fast_path_refuses_a_second_backward():
    x, z = random_pair(20, 6, 4, seed=7)
    z.requires_grad_(True)
    value = structure_regulariser(x, z)
    value.backward(retain_graph=True)
    with pytest.raises(AnybindError, match="one backward"):
        value.backward()


def test_symmetric_gram_and_blocked_reductions_equal_the_plain_ones(small_blocks):
    m = torch.randn(300, 200) * 30
    rows, cols = losses._row_and_column_logsumexp(m)
    assert torch.allclose(rows, m.logsumexp(1)) and torch.allclose(cols, m.logsumexp(0))
    assert torch.allclose(blocks.softmax_rows_(m.clone()), torch.softmax(m, 1))
    segment = torch.tensor([0, 2, 2, 1, 0, 2])
    values = torch.tensor([1.0, -3.0, 50.0, 7.0, 2.0, 49.0])
    expected = torch.stack([values[segment == k].logsumexp(0) for k in range(3)])
    assert torch.allclose(losses._segment_logsumexp(values, segment, 3), expected)
    y = torch.randn(1030, 9)
    assert torch.allclose(blocks.gram_logits(y, 0.1), (y @ y.T) / 0.1, rtol=1e-5, atol=1e-4)
    m = torch.randn(300, 300)
    assert torch.equal(blocks.add_transpose_(m.clone()), m + m.T)


# ---- InfoNCE: one logits matrix for both directions --------------------------------------------------
def infonce_value_and_grads(fn, loss, za, zb, pos):
    za, zb = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    value = fn(loss, za, zb, pos)
    grads = torch.autograd.grad(value, [za, zb, loss.log_logit_scale])
    return value.detach(), grads


@pytest.mark.parametrize("case", ["diagonal", "duplicates", "unequal rows"])
@pytest.mark.parametrize("chunk_size", [None, 64, 7])  # 64 >= the batch: the fused path too
@pytest.mark.parametrize("row_blocks", ["one block", "many blocks"])
def test_infonce_equals_the_reference(case, chunk_size, row_blocks, monkeypatch):
    if row_blocks == "many blocks":
        monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 200)
    g = torch.Generator().manual_seed(0)
    na, nb = (50, 30) if case == "unequal rows" else (50, 50)
    za, zb = torch.randn(na, 16, generator=g), torch.randn(nb, 16, generator=g)
    pos = None
    if case != "diagonal":
        items_a, items_b = torch.randint(0, 20, (na,), generator=g), torch.arange(nb) % 20
        items_b[:20] = torch.arange(20)  # every item on both sides
        items_a[:20] = torch.arange(20)
        pos = items_a[:, None] == items_b[None, :]
    loss = InfoNCE(temperature=0.05, chunk_size=chunk_size)
    v_ref, g_ref = infonce_value_and_grads(reference_infonce, loss, za, zb, pos)
    v_new, g_new = infonce_value_and_grads(lambda m, a, b, p: m(a, b, p), loss, za, zb, pos)
    assert torch.allclose(v_new, v_ref, rtol=1e-6, atol=1e-6)
    for new, ref in zip(g_new, g_ref):
        assert torch.allclose(new, ref, rtol=1e-5, atol=1e-6)


def test_infonce_fused_path_refuses_a_second_backward():
    za, zb = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4)
    value = InfoNCE()(za, zb)
    value.backward(retain_graph=True)
    with pytest.raises(AnybindError, match="one backward"):
        value.backward()
