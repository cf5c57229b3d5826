"""Losses over N modalities (anybind.align.joint_losses): small cases worked out by hand or with
explicit loops over the formulas (never the code under test), missing modalities, several
positives, equality with the authors' `symile` package, and joint-query scores."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from anybind.align.joint_losses import (
    AllPairs,
    AnchorInfoNCE,
    AnchorSigLIP,
    JointLoss,
    Symile,
    joint_rule,
    joint_scores,
)
from anybind.align.losses import LOSSES, LossError, build_objective, resolve_loss_section

JOINT = ("anchor-infonce", "anchor-siglip", "all-pairs", "symile")


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def lse(values: list[float]) -> float:
    peak = max(values)
    return peak + math.log(sum(math.exp(v - peak) for v in values))


def unit(rows: list[list[float]]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


# ---- explicit formulas (python floats, loops), the references of the tests -------------------------
def mip(*vectors: list[float]) -> float:
    """MIP(a, b, c, ...) = sum_d a_d b_d c_d ..."""
    return sum(math.prod(v[d] for v in vectors) for d in range(len(vectors[0])))


def ce_row(logits: list[float], positive: list[bool]) -> float:
    """-log(softmax mass on the positives)."""
    return lse(logits) - lse([v for v, p in zip(logits, positive) if p])


def ref_symile_all(reps: list[list[list[float]]], scale: float, pos: list[list[bool]]) -> float:
    """Mean over query modalities of the mean over rows of the cross-entropy over every
    combination (j1, j2, ...) of the other modalities' rows; positive iff every j is i's item."""
    m, n = len(reps), len(reps[0])
    per_query = []
    for q in range(m):
        others = [reps[k] for k in range(m) if k != q]
        rows = []
        for i in range(n):
            combos = list(itertools.product(range(n), repeat=m - 1))
            logits = [scale * mip(reps[q][i], *[others[f][j] for f, j in enumerate(c)]) for c in combos]
            rows.append(ce_row(logits, [all(pos[i][j] for j in c) for c in combos]))
        per_query.append(sum(rows) / n)
    return sum(per_query) / m


def ref_symile_n(reps, scale: float, perms: list[list[int]], pos=None) -> float:
    """The O(B) candidates: column j != i of row i is (others[f][perm_f[j]])_f, column i the
    positive tuple; `perms` are the permutations drawn, per query, per other modality in order."""
    m, n = len(reps), len(reps[0])
    per_query, draws = [], iter(perms)
    for q in range(m):
        others = [reps[k] for k in range(m) if k != q]
        shuffles = [next(draws) for _ in others]
        rows = []
        for i in range(n):
            logits, positive = [], []
            for j in range(n):
                picks = [i] * len(others) if j == i else [s[j] for s in shuffles]
                logits.append(scale * mip(reps[q][i], *[o[p] for o, p in zip(others, picks)]))
                positive.append(j == i or (pos is not None and all(pos[i][p] for p in picks)))
            rows.append(ce_row(logits, positive))
        per_query.append(sum(rows) / n)
    return sum(per_query) / m


def ref_infonce(a, b, scale: float, pos=None) -> float:
    """Symmetric InfoNCE: mean of the a->b and b->a row means."""
    n = len(a)
    pos = pos or [[i == j for j in range(n)] for i in range(n)]
    logits = [[scale * mip(a[i], b[j]) for j in range(n)] for i in range(n)]
    a_to_b = sum(ce_row(logits[i], pos[i]) for i in range(n)) / n
    b_to_a = sum(ce_row([logits[i][j] for i in range(n)], [pos[i][j] for i in range(n)]) for j in range(n)) / n
    return 0.5 * (a_to_b + b_to_a)


def drawn_perms(seed: int, n: int, count: int) -> list[list[int]]:
    torch.manual_seed(seed)
    return [torch.randperm(n).tolist() for _ in range(count)]


# ---- a tiny batch worked out by hand ---------------------------------------------------------------
# a0 = (1, 0), a1 = (0, 1);  b = a;  c0 = (1, 0), c1 = (0.6, 0.8)   (D = 2, B = 2, unit rows)
A = [[1.0, 0.0], [0.0, 1.0]]
C = [[1.0, 0.0], [0.6, 0.8]]


def tiny() -> dict[str, torch.Tensor]:
    return {"a": torch.tensor(A) * 2.0, "b": torch.tensor(A), "c": torch.tensor(C) * 3.0}  # norms: normalised


def test_symile_all_negatives_by_hand():
    # MIP(x, y, z) with x = a0 = (1, 0) keeps d = 0 only: y_0 z_0.
    # query a, row 0: (b_j, c_k) over (0,0) (0,1) (1,0) (1,1) -> 1, 0.6, 0, 0; positive (0,0) = 1
    # query a, row 1 (d = 1 only: y_1 z_1): 0, 0, 0, 0.8; positive (1,1) = 0.8
    # query b: b = a, the same two rows.
    # query c, row 0 (c0 = (1, 0)): (a_j, b_k) -> 1, 0, 0, 0; positive 1
    # query c, row 1 (c1: 0.6 a_j0 b_k0 + 0.8 a_j1 b_k1) -> 0.6, 0, 0, 0.8; positive 0.8
    e = math.exp
    a_rows = (math.log(e(1) + e(0.6) + 2) - 1) + (math.log(e(0.8) + 3) - 0.8)
    c_rows = (math.log(e(1) + 3) - 1) + (math.log(e(0.6) + e(0.8) + 2) - 0.8)
    expected = (2 * a_rows / 2 + c_rows / 2) / 3  # temperature 1: logit scale 1
    loss = Symile(normalise="l2", negatives="all", temperature=1.0)(tiny(), anchor="a")
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(ref_symile_all([A, A, C], 1.0, [[1, 0], [0, 1]]), rel=1e-12)


def test_symile_n_negatives_by_hand():
    # B = 2: row i's other column is the shuffled tuple (b[p(j)], c[q(j)]), or its positive
    # when p(j) = q(j) = i (counted a negative without pos, as the package does).
    perms = drawn_perms(3, 2, 6)
    torch.manual_seed(3)
    loss = Symile(normalise="l2", negatives="n", temperature=0.5)(tiny(), anchor="b")
    assert loss.item() == pytest.approx(ref_symile_n([A, A, C], 2.0, perms), rel=1e-6)
    # query a with p = q = identity: row 0 scores (1 | MIP(a0, b1, c1) = 0) -> log(1 + e^-2);
    # with both swapped, column 1 of row 0 holds (b0, c0): MIP 1 -> log 2, the package's false negative
    assert ref_symile_n([A, A, C], 2.0, [[0, 1]] * 6) != ref_symile_n([A, A, C], 2.0, [[1, 0]] * 6)


@pytest.mark.parametrize("negatives", ["n", "all"])
def test_symile_with_several_positives(negatives):
    # samples 0 and 1 are one item (two captions of one image), sample 2 another
    torch.manual_seed(0)
    z = {m: F.normalize(torch.randn(3, 4), dim=-1) for m in "abc"}
    pos = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    reps, plist = [z[m].tolist() for m in "abc"], pos.tolist()
    perms = drawn_perms(5, 3, 6)
    torch.manual_seed(5)
    loss = Symile(normalise="l2", negatives=negatives, temperature=0.25)(z, pos=pos, anchor="a")
    expected = (ref_symile_all(reps, 4.0, plist) if negatives == "all"
                else ref_symile_n(reps, 4.0, perms, plist))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the identity as pos counts a shuffled copy of the query's own tuple as a positive
    if negatives == "all":
        eye = torch.eye(3, dtype=torch.bool)
        assert Symile(negatives="all")(z, pos=eye, anchor="a").item() == pytest.approx(
            Symile(negatives="all")(z, anchor="a").item(), rel=1e-6)


def test_symile_of_two_modalities_is_infonce():
    torch.manual_seed(1)
    z = {m: torch.randn(5, 3) for m in "ab"}
    reps = [F.normalize(z[m], dim=-1).tolist() for m in "ab"]
    for negatives in ("n", "all"):
        loss = Symile(negatives=negatives, temperature=0.1)(z, anchor="a")
        assert loss.item() == pytest.approx(ref_infonce(*reps, 10.0), rel=1e-5)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_symile_rms_is_the_l2_mip_at_a_cosine_scale(m):
    # rms: the mean over d of RMS-normalised rows' product = the L2 MIP x D^((M-2)/2); for M = 2
    # that factor is 1 (a cosine); written as l2 with the temperature divided by the factor
    torch.manual_seed(4)
    d = 8
    z = {f"m{k}": torch.randn(6, d) for k in range(m)}
    factor = d ** ((m - 2) / 2)
    for negatives in ("n", "all"):
        torch.manual_seed(9)
        rms = Symile(negatives=negatives, normalise="rms", temperature=0.5)(z, anchor="m0")
        torch.manual_seed(9)
        l2 = Symile(negatives=negatives, normalise="l2", temperature=0.5 / factor, max_logit_scale=100 * factor)(
            z, anchor="m0")
        assert rms.item() == pytest.approx(l2.item(), rel=1e-5)
    # dense, equal-signed unit rows: the rms MIP of a perfectly aligned tuple is 1, as a cosine
    ones = {f"m{k}": torch.ones(1, d) for k in range(m)}
    assert joint_scores({k: v for k, v in ones.items() if k != "m0"}, ones["m0"], rule="multilinear").item() * factor \
        == pytest.approx(1.0)


def test_symile_normalise_is_checked():
    with pytest.raises(LossError, match="normalise must be one of l2, rms, not 'layernorm'"):
        Symile(normalise="layernorm")


# ---- missing modalities ----------------------------------------------------------------------------
def missing_batch(seed: int = 2):
    """B = 6: rows 0-2 have a, b, c; rows 3-4 a and b (c absent: NaN); row 5 only a."""
    torch.manual_seed(seed)
    z = {m: torch.randn(6, 4) for m in "abc"}
    z["c"][3:] = float("nan")
    z["b"][5] = float("nan")
    present = {"a": torch.ones(6, dtype=torch.bool), "b": torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool),
               "c": torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)}
    return z, present


def rows_of(z, m, rows):
    return F.normalize(z[m][rows], dim=-1).tolist()


@pytest.mark.parametrize("negatives", ["n", "all"])
def test_symile_missing_modality_rule(negatives):
    # full rows 0-2: the Symile term (weight 3); rows 3-4 (a, b): InfoNCE of a and b (weight 2);
    # row 5 (a alone): nothing. loss = (3 S + 2 I) / 5.
    z, present = missing_batch()
    full, pair = [0, 1, 2], [3, 4]
    reps = [rows_of(z, m, full) for m in "abc"]
    perms = drawn_perms(7, 3, 6)
    symile = (ref_symile_all(reps, 5.0, [[i == j for j in range(3)] for i in range(3)]) if negatives == "all"
              else ref_symile_n(reps, 5.0, perms))
    infonce = ref_infonce(rows_of(z, "a", pair), rows_of(z, "b", pair), 5.0)
    leaves = {m: v.clone().requires_grad_(True) for m, v in z.items()}
    torch.manual_seed(7)
    loss = Symile(normalise="l2", negatives=negatives, temperature=0.2)(leaves, present, anchor="c")
    assert loss.item() == pytest.approx((3 * symile + 2 * infonce) / 5, rel=1e-5)
    loss.backward()
    for m, leaf in leaves.items():  # NaN rows get no gradient, the others a finite one
        assert torch.isfinite(leaf.grad).all()
        assert not leaf.grad[~present[m]].any()


def test_pair_losses_missing_modality_rule():
    # anchor a: (a, b) over rows 0-4, (a, c) over rows 0-2, each InfoNCE; all-pairs adds (b, c) over 0-2
    z, present = missing_batch()
    ab = ref_infonce(rows_of(z, "a", [0, 1, 2, 3, 4]), rows_of(z, "b", [0, 1, 2, 3, 4]), 10.0)
    ac = ref_infonce(rows_of(z, "a", [0, 1, 2]), rows_of(z, "c", [0, 1, 2]), 10.0)
    bc = ref_infonce(rows_of(z, "b", [0, 1, 2]), rows_of(z, "c", [0, 1, 2]), 10.0)
    anchor = AnchorInfoNCE(temperature=0.1)(z, present, anchor="a")
    assert anchor.item() == pytest.approx((ab + ac) / 2, rel=1e-5)
    assert AllPairs(temperature=0.1)(z, present, anchor="a").item() == pytest.approx((ab + ac + bc) / 3, rel=1e-5)
    summed = AllPairs(temperature=0.1, reduction="sum")(z, present, anchor="a")
    assert summed.item() == pytest.approx(ab + ac + bc, rel=1e-5)


@pytest.mark.parametrize("name", JOINT)
def test_nan_in_absent_rows_changes_nothing(name):
    z, present = missing_batch()
    clean = {m: torch.where(torch.isnan(v), torch.zeros_like(v), v) for m, v in z.items()}
    losses, grads = [], []
    for batch in (z, clean):
        leaves = {m: v.clone().requires_grad_(True) for m, v in batch.items()}
        torch.manual_seed(0)
        loss = LOSSES.build(name)(leaves, present, anchor="a")
        loss.backward()
        losses.append(loss.item())
        grads.append({m: leaf.grad for m, leaf in leaves.items()})
    assert math.isfinite(losses[0]) and losses[0] == losses[1]
    for m in z:
        assert torch.equal(grads[0][m], grads[1][m])
        assert not grads[0][m][~present[m]].any()


@pytest.mark.parametrize("name", JOINT)
def test_a_batch_without_any_term_is_a_zero_that_backpropagates(name):
    z = {m: torch.randn(3, 4, requires_grad=True) for m in "abc"}
    present = {"a": torch.tensor([1, 0, 0], dtype=torch.bool), "b": torch.tensor([1, 1, 0], dtype=torch.bool),
               "c": torch.tensor([0, 0, 1], dtype=torch.bool)}  # no pair shares 2 rows
    loss = LOSSES.build(name)(z, present, anchor="a")
    loss.backward()
    assert loss.item() == 0.0 and all(not v.grad.any() for v in z.values())


# ---- anchor and all-pairs by hand ------------------------------------------------------------------
def test_anchor_and_all_pairs_infonce_by_hand():
    # temperature 0.5 (scale 2). (a, b): logits 2I -> every row and column log(1 + e^-2).
    # (a, c): cosines [[1, 0.6], [0, 0.8]] -> logits [[2, 1.2], [0, 1.6]]: a->c rows
    # log(1 + e^-0.8), log(1 + e^-1.6); c->a rows log(1 + e^-2), log(1 + e^-0.4) (mean of 4).
    # (b, c) = (a, c) since b = a.
    ab = softplus(-2.0)
    ac = (softplus(-0.8) + softplus(-1.6) + softplus(-2.0) + softplus(-0.4)) / 4
    assert AnchorInfoNCE(temperature=0.5)(tiny(), anchor="a").item() == pytest.approx((ab + ac) / 2, rel=1e-6)
    assert AllPairs(temperature=0.5)(tiny(), anchor="a").item() == pytest.approx((ab + 2 * ac) / 3, rel=1e-6)
    # anchor c: (c, a) and (c, b), both = ac
    assert AnchorInfoNCE(temperature=0.5)(tiny(), anchor="c").item() == pytest.approx(ac, rel=1e-6)


def test_anchor_and_all_pairs_siglip_by_hand():
    # scale t = 1, bias 0: loss of a pair = (1/B) sum_ij softplus(-z_ij cos_ij), z = +1 on the diagonal.
    # (a, b): cos I -> (2 softplus(-1) + 2 softplus(0)) / 2
    # (a, c): cos [[1, 0.6], [0, 0.8]] -> (softplus(-1) + softplus(-0.8) + softplus(0.6) + softplus(0)) / 2
    ab = (2 * softplus(-1.0) + 2 * softplus(0.0)) / 2
    ac = (softplus(-1.0) + softplus(-0.8) + softplus(0.6) + softplus(0.0)) / 2
    loss = AnchorSigLIP(scale_init=1.0, bias_init=0.0)(tiny(), anchor="a")
    assert loss.item() == pytest.approx((ab + ac) / 2, rel=1e-6)
    pairs = AllPairs(pair_loss="siglip", scale_init=1.0, bias_init=0.0)(tiny(), anchor="b")
    assert pairs.item() == pytest.approx((ab + 2 * ac) / 3, rel=1e-6)


def test_anchor_infonce_several_positives_and_chunks():
    torch.manual_seed(4)
    z = {m: torch.randn(4, 3) for m in "abc"}
    pos = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    reps = {m: F.normalize(v, dim=-1).tolist() for m, v in z.items()}
    expected = (ref_infonce(reps["b"], reps["a"], 1 / 0.07, pos.tolist())
                + ref_infonce(reps["b"], reps["c"], 1 / 0.07, pos.tolist())) / 2
    for chunk in (None, 1):
        loss = AnchorInfoNCE(chunk_size=chunk)(z, pos=pos, anchor="b")
        assert loss.item() == pytest.approx(expected, rel=1e-5)


# ---- equality with the authors' package ------------------------------------------------------------
@pytest.mark.parametrize("m, n, negatives", [(3, 2, "n"), (3, 7, "n"), (3, 32, "n"), (3, 2, "all"),
                                             (3, 7, "all"), (3, 16, "all"), (4, 5, "n"), (4, 5, "all")])
def test_symile_equals_the_authors_package(m, n, negatives):
    symile = pytest.importorskip("symile", reason="the `symile` package (pip install symile; in the dev extra) "
                                                  "is the reference of this comparison")
    torch.manual_seed(100 + n)
    raw = [torch.randn(n, 8) for _ in range(m)]
    ours_in = {f"m{k}": r.clone().requires_grad_(True) for k, r in enumerate(raw)}
    theirs_in = [r.clone().requires_grad_(True) for r in raw]
    ours = Symile(normalise="l2", negatives=negatives, temperature=0.2)
    scale = torch.tensor(5.0, requires_grad=True)
    torch.manual_seed(7)
    value = ours(ours_in, anchor="m0")
    torch.manual_seed(7)
    reference = symile.Symile({"n": "n", "all": "n_squared"}[negatives])(
        [F.normalize(r, dim=1) for r in theirs_in], scale)
    assert value.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    value.backward()
    reference.backward()
    for leaf, their in zip(ours_in.values(), theirs_in):
        torch.testing.assert_close(leaf.grad, their.grad, rtol=1e-5, atol=1e-6)
    # d/d log s = s d/ds
    assert ours.log_logit_scale.grad.item() == pytest.approx(5.0 * scale.grad.item(), rel=1e-5, abs=1e-6)


# ---- the registry, recipes, checks -----------------------------------------------------------------
@pytest.mark.parametrize("name", JOINT)
def test_registered_lazily_and_built_from_a_recipe_section(name):
    section = resolve_loss_section({"name": name})
    objective = build_objective(section)
    assert isinstance(objective.contrastive, JointLoss) and objective.contrastive.joint
    assert section.learn_temperature is True
    assert 0 < objective.contrastive.temperature_value() <= 1


def test_recipe_options_are_checked():
    assert resolve_loss_section({"name": "symile", "negatives": "all"}).negatives == "all"
    assert resolve_loss_section({"name": "anchor-infonce", "temperature": "5e-2"}).temperature == 0.05
    with pytest.raises(LossError, match="loss.negatives.*did you mean 'all'"):
        build_objective({"name": "symile", "negatives": "al"})
    with pytest.raises(LossError, match="unknown recipe key 'loss.negativs'"):
        resolve_loss_section({"name": "symile", "negativs": "all"})
    with pytest.raises(LossError, match="temperature"):
        build_objective({"name": "symile", "temperature": 0.001})
    with pytest.raises(LossError, match="temperature is an option of the other pair loss"):
        build_objective({"name": "all-pairs", "pair_loss": "siglip", "temperature": 0.1})
    with pytest.raises(LossError, match="pair_loss must be one of infonce, siglip"):
        build_objective({"name": "all-pairs", "pair_loss": "clip"})
    # a larger scale than CLIP's 100 for Symile's small MIPs
    assert Symile(temperature=0.002, max_logit_scale=1000.0).logit_scale().item() == pytest.approx(500.0)


def test_learn_temperature_off_keeps_no_parameter():
    for loss in (Symile(learn_temperature=False), AnchorInfoNCE(learn_temperature=False),
                 AnchorSigLIP(learn_temperature=False), AllPairs(learn_temperature=False)):
        assert not list(loss.parameters())
    assert len(list(Symile().parameters())) == 1 and len(list(AnchorSigLIP().parameters())) == 2


def test_bad_batches_get_clear_errors():
    z = {m: torch.randn(3, 4) for m in "abc"}
    loss = Symile()
    with pytest.raises(LossError, match="anchor 'imgae' is not among"):
        loss(z, anchor="imgae")
    with pytest.raises(LossError, match=r"z\['c'\] is \(3, 5\)"):
        loss({**z, "c": torch.randn(3, 5)}, anchor="a")
    with pytest.raises(LossError, match="two or more modality"):
        loss({"a": z["a"]}, anchor="a")
    with pytest.raises(LossError, match=r"present\['b'\] must be a boolean \[3\]"):
        loss(z, {"b": torch.ones(3)}, anchor="a")
    with pytest.raises(LossError, match="present names d"):
        loss(z, {"d": torch.ones(3, dtype=torch.bool)}, anchor="a")
    with pytest.raises(LossError, match="pos must hold its diagonal"):
        loss(z, pos=torch.zeros(3, 3, dtype=torch.bool), anchor="a")
    with pytest.raises(LossError, match=r"pos must be a boolean \[3, 3\]"):
        AnchorInfoNCE()(z, pos=torch.ones(3, 2, dtype=torch.bool), anchor="a")


def test_all_negatives_warns_with_its_cost(caplog):
    z = {m: torch.randn(4, 3) for m in "abc"}
    with caplog.at_level("WARNING", logger="anybind.align.joint_losses"):
        Symile(negatives="all")(z, anchor="a")
    assert "4^2 = 16 logits per row" in caplog.text


# ---- joint queries ---------------------------------------------------------------------------------
def test_joint_scores_by_hand():
    # two queries (text, audio), gallery of three, D = 2, unit rows:
    # t0 = (1, 0), t1 = (0.6, 0.8); s0 = (0.6, 0.8), s1 = (0, 1); g0 = (1, 0), g1 = (0, 1), g2 = (0.8, 0.6)
    # multilinear: query 0 = t0 * s0 = (0.6, 0) -> g: 0.6, 0, 0.48
    #              query 1 = t1 * s1 = (0, 0.8) -> g: 0, 0.8, 0.48
    # sum-cosine: query 0: (1 + 0.6, 0 + 0.8, 0.8 + 0.96) = (1.6, 0.8, 1.76)
    #             query 1: (0.6 + 0, 0.8 + 1, 0.96 + 0.6) = (0.6, 1.8, 1.56)
    queries = {"text": torch.tensor([[2.0, 0.0], [0.6, 0.8]]), "audio": torch.tensor([[0.6, 0.8], [0.0, 3.0]])}
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    torch.testing.assert_close(joint_scores(queries, gallery, rule="multilinear"),
                               torch.tensor([[0.6, 0.0, 0.48], [0.0, 0.8, 0.48]]))
    torch.testing.assert_close(joint_scores(queries, gallery, rule="sum-cosine"),
                               torch.tensor([[1.6, 0.8, 1.76], [0.6, 1.8, 1.56]]))
    # the two rules rank differently: query 0's best is g0 by MIP, g2 by the summed cosines
    assert joint_scores(queries, gallery, rule="multilinear")[0].argmax() == 0
    assert joint_scores(queries, gallery, rule="sum-cosine")[0].argmax() == 2


def test_joint_rule_and_bad_queries():
    assert joint_rule("symile") == "multilinear"
    assert {joint_rule(n) for n in ("anchor-infonce", "anchor-siglip", "all-pairs", "infonce", "siglip")} == {
        "sum-cosine"}
    with pytest.raises(LossError, match="did you mean 'symile'"):
        joint_rule("symil")
    gallery = torch.randn(3, 2)
    with pytest.raises(LossError, match="did you mean 'multilinear'"):
        joint_scores({"t": torch.randn(2, 2)}, gallery, rule="multilinar")
    with pytest.raises(LossError, match="query 'a' is"):
        joint_scores({"t": torch.randn(2, 2), "a": torch.randn(3, 2)}, gallery, rule="sum-cosine")
