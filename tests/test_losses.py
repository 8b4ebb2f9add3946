"""kdray.losses: hand-computed values, independent references (F.cross_entropy, F.kl_div, brute-force loops) and
edge cases (T = 1, alpha in {0, 1}, masks, all-masked rows, ties, argument errors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdray.distill import losses
from kdray.distill.losses import (
    DISTILL_LOSSES,
    bce,
    bpr,
    distill_loss,
    ensemble_teacher_logits,
    kl_distill,
    listwise_distill,
    mse_distill,
    ranking_distill,
    relaxed_ranking_distill,
    sampled_softmax_ce,
    soft_bce_distill,
    softmax_ce,
    total_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def _random(b: int = 5, c: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * 2, torch.randn(b, c, generator=g) * 2


# ----------------------------------------------------------------------------------------------------------------
# Hard losses


def test_softmax_ce_hand_computed():
    # row 0: logits [0, 0, ln2] -> softmax [1/4, 1/4, 1/2]; positives 0 and 2 -> -ln(1/4) = ln4, -ln(1/2) = ln2
    # row 1: logits [ln3, 0, 0] -> softmax [3/5, 1/5, 1/5]; positive 1 -> -ln(1/5) = ln5
    # mean over the 3 positives: (ln4 + ln2 + ln5) / 3 = ln(40) / 3 = 1.229626
    logits = torch.tensor([[0.0, 0.0, LN2], [LN3, 0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert softmax_ce(logits, targets).item() == pytest.approx(math.log(40.0) / 3, abs=1e-6)
    assert math.log(40.0) / 3 == pytest.approx(1.229626, abs=1e-6)


def test_softmax_ce_equals_one_cross_entropy_per_pair():
    # batches of users: one log_softmax per user == the mean of F.cross_entropy over (user, item) pairs
    logits, _ = _random(6, 9)
    targets = (torch.rand(6, 9, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    rows, cols = targets.nonzero(as_tuple=True)
    reference = F.cross_entropy(logits[rows], cols)
    assert softmax_ce(logits, targets).item() == pytest.approx(reference.item(), abs=1e-6)


def test_softmax_ce_without_positives_is_zero_with_finite_gradient():
    logits = torch.randn(3, 4, requires_grad=True)
    loss = softmax_ce(logits, torch.zeros(3, 4))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(3, 4))


def test_sampled_softmax_logq_correction_hand_computed():
    # logits [0, 0] minus log Q = [ln 1/4, ln 3/4] -> [ln4, ln 4/3] -> softmax [3/4, 1/4]; target 0 -> ln(4/3)
    loss = sampled_softmax_ce(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.tensor([0.25, 0.75]).log())
    assert loss.item() == pytest.approx(math.log(4 / 3), abs=1e-6)  # 0.287682
    # a uniform proposal is a constant shift per row: no correction at all
    logits, _ = _random(3, 5)
    targets = torch.eye(3, 5)
    uniform = torch.full((5,), math.log(1 / 5))
    assert sampled_softmax_ce(logits, targets, uniform).item() == pytest.approx(softmax_ce(logits, targets).item())


def test_bpr_hand_computed_and_stable():
    # -log sigmoid(2 - 0) = ln(1 + e^-2) = 0.126928; -log sigmoid(0) = ln2 = 0.693147; mean 0.410038
    loss = bpr(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + LN2) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.410038, abs=1e-6)
    # a gap of 200 neither overflows nor underflows
    assert bpr(torch.tensor([100.0]), torch.tensor([-100.0])).item() == pytest.approx(0.0, abs=1e-30)
    assert bpr(torch.tensor([-100.0]), torch.tensor([100.0])).item() == pytest.approx(200.0)
    assert bpr(torch.zeros(0), torch.zeros(0)).item() == 0.0


def test_bce_hand_computed_and_reference():
    # logit 0 (p = 1/2), label 1 -> ln2; logit ln3 (p = 3/4), label 0 -> -ln(1/4) = ln4; mean 1.5 ln2 = 1.039721
    assert bce(torch.tensor([0.0, LN3]), torch.tensor([1.0, 0.0])).item() == pytest.approx(1.5 * LN2, abs=1e-6)
    logits, _ = _random(4, 3)
    labels = (logits > 0.3).float()
    reference = F.binary_cross_entropy(torch.sigmoid(logits), labels)
    assert bce(logits, labels).item() == pytest.approx(reference.item(), abs=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# KL (Hinton et al.)


def test_kl_hand_computed_t1_and_t2():
    # teacher [ln3, 0] -> p = [3/4, 1/4]; student [0, 0] -> q = [1/2, 1/2]
    # KL(p || q) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kl == pytest.approx(0.130812, abs=1e-6)
    assert kl_distill(torch.zeros(1, 2), torch.tensor([[LN3, 0.0]]), 1.0).item() == pytest.approx(kl, abs=1e-6)
    # at T = 2 the teacher [2 ln3, 0] gives the same p; the loss is scaled by T^2 = 4 -> 0.523248
    loss = kl_distill(torch.zeros(1, 2), torch.tensor([[2 * LN3, 0.0]]), 2.0)
    assert loss.item() == pytest.approx(4 * kl, abs=1e-6)


def test_kl_gradient_hand_computed():
    # d/ds [T^2 KL(p || softmax(s / T))] = T (q - p) / B; T = 1, B = 1: q - p = [1/2 - 3/4, 1/2 - 1/4]
    s = torch.zeros(1, 2, requires_grad=True)
    kl_distill(s, torch.tensor([[LN3, 0.0]]), 1.0).backward()
    assert torch.allclose(s.grad, torch.tensor([[-0.25, 0.25]]))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 4.0])
def test_kl_matches_torch_kl_div(temperature):
    s, t = _random()
    reference = F.kl_div(torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1),
                         log_target=True, reduction="batchmean") * temperature**2
    assert kl_distill(s, t, temperature).item() == pytest.approx(reference.item(), rel=1e-5)


def test_kl_mask_drops_entries_from_both_distributions():
    s, t = _random(4, 6)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 4:] = True  # the last two candidates are every user's training positives
    s_far, t_far = s.clone(), t.clone()
    s_far[:, 4:], t_far[:, 4:] = -50.0, 80.0  # whatever masked entries hold must not matter
    reference = F.kl_div(torch.log_softmax(s[:, :4] / 2, -1), torch.log_softmax(t[:, :4] / 2, -1), log_target=True,
                         reduction="batchmean") * 4
    assert kl_distill(s_far, t_far, 2.0, mask).item() == pytest.approx(reference.item(), rel=1e-5)


def test_identical_student_and_teacher_give_zero_kl_and_mse():
    s, _ = _random()
    assert kl_distill(s, s.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert mse_distill(s, s.clone()).item() == 0.0


# ----------------------------------------------------------------------------------------------------------------
# MSE, soft BCE


def test_mse_hand_computed():
    s, t = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 2)
    assert mse_distill(s, t).item() == pytest.approx(7.5)  # (1 + 4 + 9 + 16) / 4
    mask = torch.tensor([[False, False], [False, True]])
    assert mse_distill(s, t, mask).item() == pytest.approx(14 / 3)  # (1 + 4 + 9) / 3


def test_soft_bce_hand_computed():
    # s = 0 (q = 1/2), t = ln3 (p = 3/4): -(3/4 ln 1/2 + 1/4 ln 1/2) = ln2
    assert soft_bce_distill(torch.zeros(1, 1), torch.tensor([[LN3]]), 1.0).item() == pytest.approx(LN2, abs=1e-6)
    # s = ln3 (q = 3/4), t = 0 (p = 1/2): -(1/2 ln 3/4 + 1/2 ln 1/4) = (0.287682 + 1.386294) / 2 = 0.836988
    expected = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    assert soft_bce_distill(torch.tensor([[LN3]]), torch.zeros(1, 1), 1.0).item() == pytest.approx(expected)
    # T = 2 on doubled logits gives the same probabilities; soft BCE is not scaled by T^2
    assert soft_bce_distill(torch.tensor([[2 * LN3]]), torch.zeros(1, 1), 2.0).item() == pytest.approx(expected)


def test_soft_bce_matches_reference_with_mask():
    s, t = _random()
    mask = torch.rand(s.shape, generator=torch.Generator().manual_seed(3)) < 0.3
    keep = ~mask
    reference = F.binary_cross_entropy(torch.sigmoid(s[keep] / 1.5), torch.sigmoid(t[keep] / 1.5))
    assert soft_bce_distill(s, t, 1.5, mask).item() == pytest.approx(reference.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Ranking distillation (Tang & Wang)


def _rd_reference(s: torch.Tensor, t: torch.Tensor, k: int, mask: torch.Tensor | None, lam: float = 1.0) -> float:
    """Brute force, one row at a time, straight from the formula in the docstring."""
    per_row = []
    for b in range(s.shape[0]):
        allowed = [c for c in range(s.shape[1]) if mask is None or not mask[b, c]]
        if not allowed:
            continue
        top = sorted(allowed, key=lambda c: -float(t[b, c]))[:k]
        w = [math.exp(-(r + 1) / lam) for r in range(len(top))]
        pos = sum(wi / sum(w) * -math.log(torch.sigmoid(s[b, c]).item()) for wi, c in zip(w, top))
        others = [c for c in allowed if c not in top]
        neg = sum(-math.log(1 - torch.sigmoid(s[b, c]).item()) for c in others) / max(1, len(others))
        per_row.append(pos + neg)
    return sum(per_row) / len(per_row) if per_row else 0.0


def test_rd_hand_computed():
    # teacher ranks items 0 > 1 > 2 > 3; k = 2, lam = 1: w ∝ [e^-1, e^-2] -> [0.731059, 0.268941]
    # student [0, ln3, 0, -ln3]: -log sigmoid(0) = ln2 = 0.693147, -log sigmoid(ln3) = ln(4/3) = 0.287682
    #   positive = 0.731059 * 0.693147 + 0.268941 * 0.287682 = 0.506731 + 0.077370 = 0.584101
    #   negatives 2, 3: -log(1 - sigmoid(0)) = ln2, -log(1 - sigmoid(-ln3)) = ln(4/3); mean 0.490415
    #   total 1.074516
    s = torch.tensor([[0.0, LN3, 0.0, -LN3]])
    t = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    w1 = 1 / (1 + math.exp(-1))
    expected = w1 * LN2 + (1 - w1) * math.log(4 / 3) + (LN2 + math.log(4 / 3)) / 2
    assert expected == pytest.approx(1.074516, abs=1e-6)
    assert ranking_distill(s, t, 2).item() == pytest.approx(expected, abs=1e-6)


def test_rd_mask_moves_the_top_k_to_unobserved_items():
    # item 0 is the teacher's favourite but a training positive: the pseudo-positives become items 1 and 2,
    # and the only pseudo-negative is item 3
    s = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    t = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    mask = torch.tensor([[True, False, False, False]])
    assert ranking_distill(s, t, 2, mask).item() == pytest.approx(LN2 + LN2, abs=1e-6)  # all unmasked s are 0


def test_rd_matches_brute_force():
    s, t = _random(6, 9)
    mask = torch.rand(6, 9, generator=torch.Generator().manual_seed(5)) < 0.4
    mask[2] = True  # an all-masked row is left out of the mean
    mask[3, 1:] = True  # a row with fewer unmasked items than k
    for k, lam in [(1, 1.0), (3, 1.0), (4, 2.5), (20, 0.5)]:
        got = ranking_distill(s, t, k, mask, lam=lam).item()
        assert got == pytest.approx(_rd_reference(s, t, k, mask, lam), rel=1e-5), (k, lam)
    assert ranking_distill(s, t, 3).item() == pytest.approx(_rd_reference(s, t, 3, None), rel=1e-5)


def test_rd_is_not_lowered_by_shifting_every_logit():
    # the negative term makes a uniform shift of the student's logits cost something (see the docstring)
    s, t = _random()
    base = ranking_distill(s, t, 3).item()
    assert ranking_distill(s + 20.0, t, 3).item() > base


def test_rd_ties_in_the_teacher_are_well_defined():
    # with a fully tied teacher the top-k is some k items; all student logits equal -> 2 ln2 whichever they are
    loss = ranking_distill(torch.zeros(2, 5), torch.ones(2, 5), 2)
    assert loss.item() == pytest.approx(2 * LN2, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Relaxed ranking distillation (DE-RRD)


def _rrd_reference(s: torch.Tensor, t: torch.Tensor, k: int, mask: torch.Tensor | None) -> float:
    """Brute force from the Plackett-Luce formula: explicit sums of exp, one row and one position at a time."""
    per_row = []
    for b in range(s.shape[0]):
        allowed = [c for c in range(s.shape[1]) if mask is None or not mask[b, c]]
        if not allowed:
            continue
        top = sorted(allowed, key=lambda c: -float(t[b, c]))[:k]
        rest = sum(math.exp(float(s[b, c])) for c in allowed if c not in top)
        row = 0.0
        for r, c in enumerate(top):
            below = sum(math.exp(float(s[b, j])) for j in top[r:]) + rest
            row -= float(s[b, c]) - math.log(below)
        per_row.append(row)
    return sum(per_row) / len(per_row) if per_row else 0.0


def test_rrd_hand_computed():
    # teacher order 0 > 1 > 2 > 3, k = 2: interesting (0, 1), uninteresting {2, 3}
    # exp(s) = [2, 1, 1, 3]: position 1: -log(2 / (2 + 1 + 1 + 3)) = ln(7/2); position 2: -log(1 / (1 + 1 + 3)) = ln5
    # L = ln(7/2) + ln5 = ln(17.5) = 2.862201
    s = torch.tensor([[math.log(2.0), 0.0, 0.0, LN3]])
    t = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert math.log(17.5) == pytest.approx(2.862201, abs=1e-6)
    assert relaxed_ranking_distill(s, t, 2).item() == pytest.approx(math.log(17.5), abs=1e-6)
    # item 0 masked: interesting (1, 2), uninteresting {3}: ln((1 + 1 + 3) / 1) + ln((1 + 3) / 1) = ln20 = 2.995732
    mask = torch.tensor([[True, False, False, False]])
    assert relaxed_ranking_distill(s, t, 2, mask).item() == pytest.approx(math.log(20.0), abs=1e-6)


def test_rrd_gradient_hand_computed():
    # k = 1, all student logits 0, C = 3: L = -s_0 + log(e^s_0 + e^s_1 + e^s_2); dL/ds = softmax(s) - [1, 0, 0]
    s = torch.zeros(1, 3, requires_grad=True)
    relaxed_ranking_distill(s, torch.tensor([[3.0, 2.0, 1.0]]), 1).backward()
    assert torch.allclose(s.grad, torch.tensor([[1 / 3 - 1, 1 / 3, 1 / 3]]))


def test_rrd_matches_brute_force():
    s, t = _random(6, 9)
    mask = torch.rand(6, 9, generator=torch.Generator().manual_seed(5)) < 0.4
    mask[2] = True  # an all-masked row is left out of the mean
    mask[3, 1:] = True  # a row with fewer unmasked items than k
    for k in (1, 3, 9, 20):  # k >= C: every unmasked candidate is interesting, the full teacher order
        assert relaxed_ranking_distill(s, t, k, mask).item() == pytest.approx(_rrd_reference(s, t, k, mask),
                                                                             rel=1e-5), k
    assert relaxed_ranking_distill(s, t, 3).item() == pytest.approx(_rrd_reference(s, t, 3, None), rel=1e-5)


def test_rrd_ignores_the_order_of_uninteresting_items():
    s, t = _random(3, 8)
    t_shuffled = t.clone()
    order = t.argsort(dim=-1, descending=True)
    tail = order[:, 3:]
    t_shuffled.scatter_(1, tail, t.gather(1, tail).flip(-1))  # reverse the teacher's order below its top 3
    assert relaxed_ranking_distill(s, t_shuffled, 3).item() == pytest.approx(
        relaxed_ranking_distill(s, t, 3).item(), rel=1e-6)


def test_rrd_samples_uninteresting_items_from_the_generator_only_among_eligible():
    s = torch.tensor([[math.log(2.0), 0.0, 0.0, LN3, 50.0]])  # item 4: masked, with a logit that would dominate
    t = torch.tensor([[4.0, 3.0, 2.0, 1.0, 9.0]])
    mask = torch.tensor([[False, False, False, False, True]])
    # k = 2, one uninteresting item of {2, 3}: {2} -> ln(4/2) + ln(2/1) = ln4; {3} -> ln(6/2) + ln(4/1) = ln12
    seen = set()
    for seed in range(20):
        value = relaxed_ranking_distill(s, t, 2, mask, 1, torch.Generator().manual_seed(seed)).item()
        seen.add(round(value, 5))
        again = relaxed_ranking_distill(s, t, 2, mask, 1, torch.Generator().manual_seed(seed)).item()
        assert again == value  # a pure function of its generator
    assert seen == {round(math.log(4.0), 5), round(math.log(12.0), 5)}
    # as many samples as eligible items (or more) is the exact loss
    exact = relaxed_ranking_distill(s, t, 2, mask).item()
    for n in (2, 10):
        assert relaxed_ranking_distill(s, t, 2, mask, n, torch.Generator().manual_seed(0)).item() == pytest.approx(
            exact, abs=1e-6)
    got = distill_loss("rrd", s, [t], None, temperature=1.0, k=2, mask=mask, n_uninteresting=1,
                       generator=torch.Generator().manual_seed(3))
    assert got.item() == relaxed_ranking_distill(s, t, 2, mask, 1, torch.Generator().manual_seed(3)).item()


# ----------------------------------------------------------------------------------------------------------------
# Listwise distillation over the teacher's top-K


def _listwise_reference(s: torch.Tensor, t: torch.Tensor, k: int, temperature: float,
                        mask: torch.Tensor | None) -> float:
    """Brute force: per row, pick the top-k by sorting, then torch's kl_div on those k entries."""
    per_row = []
    for b in range(s.shape[0]):
        allowed = [c for c in range(s.shape[1]) if mask is None or not mask[b, c]]
        if not allowed:
            continue
        top = sorted(allowed, key=lambda c: -float(t[b, c]))[:k]
        log_q = torch.log_softmax(s[b, top] / temperature, -1)
        log_p = torch.log_softmax(t[b, top] / temperature, -1)
        per_row.append(F.kl_div(log_q, log_p, log_target=True, reduction="sum").item() * temperature**2)
    return sum(per_row) / len(per_row) if per_row else 0.0


def test_listwise_hand_computed_t1_and_t2():
    # teacher [ln3, 0, 5 (masked), -10], k = 2 -> items 0, 1: p = [3/4, 1/4]; student 0 there -> q = [1/2, 1/2]
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812; item 3 (outside the top 2) does not matter whatever the student says
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    mask = torch.tensor([[False, False, True, False]])
    s = torch.tensor([[0.0, 0.0, 7.0, 30.0]])
    assert listwise_distill(s, torch.tensor([[LN3, 0.0, 5.0, -10.0]]), 2, 1.0, mask).item() == pytest.approx(kl,
                                                                                                          abs=1e-6)
    # T = 2: teacher [2 ln3, 0] gives the same p, scaled by T^2 = 4 -> 0.523248
    t2 = torch.tensor([[2 * LN3, 0.0, 5.0, -10.0]])
    assert listwise_distill(s, t2, 2, 2.0, mask).item() == pytest.approx(4 * kl, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_listwise_matches_brute_force(temperature):
    s, t = _random(6, 9)
    mask = torch.rand(6, 9, generator=torch.Generator().manual_seed(7)) < 0.4
    mask[1] = True
    mask[4, 2:] = True  # two unmasked candidates, fewer than k
    for k in (1, 3, 20):
        got = listwise_distill(s, t, k, temperature, mask).item()
        assert got == pytest.approx(_listwise_reference(s, t, k, temperature, mask), rel=1e-5, abs=1e-7), k


def test_listwise_with_k_at_least_c_is_kl_over_the_unmasked_candidates():
    s, t = _random(4, 6)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 0] = True
    for k in (6, 50):
        assert listwise_distill(s, t, k, 2.0, mask).item() == pytest.approx(kl_distill(s, t, 2.0, mask).item(),
                                                                           rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Masks: all-masked rows give 0, never NaN, in the loss and in the gradient


@pytest.mark.parametrize("kind", DISTILL_LOSSES)
def test_all_masked_rows_contribute_nothing(kind):
    s, t = _random(4, 6)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1] = True
    mask[3, :2] = True
    s_req = s.clone().requires_grad_(True)
    loss = distill_loss(kind, s_req, [t], None, temperature=2.0, k=3, mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s_req.grad).all()
    assert torch.equal(s_req.grad[1], torch.zeros(6)) and torch.equal(s_req.grad[3, :2], torch.zeros(2))
    # the all-masked row is left out of the mean: same loss as the batch without it
    keep = torch.tensor([0, 2, 3])
    alone = distill_loss(kind, s[keep], [t[keep]], None, temperature=2.0, k=3, mask=mask[keep])
    if kind in ("kl", "rd", "rrd", "listwise"):  # means over rows
        assert loss.item() == pytest.approx(alone.item(), rel=1e-5)


@pytest.mark.parametrize("kind", DISTILL_LOSSES)
def test_fully_masked_batch_gives_zero_and_zero_gradient(kind):
    s = torch.randn(3, 4, requires_grad=True)
    loss = distill_loss(kind, s, [torch.randn(3, 4)], None, temperature=1.0, k=2, mask=torch.ones(3, 4, dtype=bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros(3, 4))


@pytest.mark.parametrize("kind", DISTILL_LOSSES)
def test_extreme_logits_stay_finite(kind):
    s = torch.tensor([[1e4, -1e4, 0.0, 30.0]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 5.0, -30.0]])
    mask = torch.tensor([[False, False, True, False]])
    loss = distill_loss(kind, s, [t], None, temperature=0.5, k=2, mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# ----------------------------------------------------------------------------------------------------------------
# Ensembles


def test_ensemble_kl_averages_the_softmax_distributions():
    # t1 [ln3, 0] -> [3/4, 1/4]; t2 [0, ln3] -> [1/4, 3/4]
    # weights [3, 1] -> [3/4 * 3/4 + 1/4 * 1/4, 3/4 * 1/4 + 1/4 * 3/4] = [10/16, 6/16] = [5/8, 3/8]
    t1, t2 = torch.tensor([[LN3, 0.0]]), torch.tensor([[0.0, LN3]])
    out = ensemble_teacher_logits([t1, t2], [3.0, 1.0], kind="kl", temperature=1.0)
    assert torch.allclose(torch.softmax(out, -1), torch.tensor([[5 / 8, 3 / 8]]))
    uniform = ensemble_teacher_logits([t1, t2], None)  # default: uniform weights, KL at T = 1
    assert torch.allclose(torch.softmax(uniform, -1), torch.tensor([[0.5, 0.5]]))
    # at T = 2 the averaged distribution is recovered by softmax(out / T)
    a, b = _random(3, 5)
    out = ensemble_teacher_logits([a, b], [1.0, 2.0], kind="kl", temperature=2.0)
    expected = (torch.softmax(a / 2, -1) + 2 * torch.softmax(b / 2, -1)) / 3
    assert torch.allclose(torch.softmax(out / 2, -1), expected, atol=1e-6)


def test_ensemble_kl_with_mask_averages_the_masked_distributions():
    a, b = _random(3, 5)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, 0] = True
    out = ensemble_teacher_logits([a, b], None, kind="kl", temperature=1.0, mask=mask)
    expected = (torch.softmax(a[:, 1:], -1) + torch.softmax(b[:, 1:], -1)) / 2
    assert torch.allclose(torch.softmax(out[:, 1:], -1), expected, atol=1e-6)
    assert torch.isfinite(out).all()


def test_ensemble_soft_bce_and_mse():
    # T = 2: sigmoid(2 ln3 / 2) = 3/4, sigmoid(-2 ln3 / 2) = 1/4; weights [3, 1] -> 3/4 * 3/4 + 1/4 * 1/4 = 5/8
    out = ensemble_teacher_logits([torch.tensor([[2 * LN3]]), torch.tensor([[-2 * LN3]])], [3, 1], kind="soft_bce",
                                  temperature=2.0)
    assert torch.sigmoid(out / 2).item() == pytest.approx(5 / 8, abs=1e-6)
    out = ensemble_teacher_logits([torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0]])], [1, 3], kind="mse")
    assert torch.allclose(out, torch.tensor([[2.5, 5.0]]))  # (1 + 3 * 3) / 4, (2 + 3 * 6) / 4


def test_distill_loss_dispatch_matches_the_functions():
    s, t = _random()
    mask = torch.zeros_like(s, dtype=torch.bool)
    mask[:, :2] = True
    direct = {
        "kl": kl_distill(s, t, 2.0, mask),
        "mse": mse_distill(s, t, mask),
        "rd": ranking_distill(s, t, 3, mask),
        "soft_bce": soft_bce_distill(s, t, 2.0, mask),
        "rrd": relaxed_ranking_distill(s, t, 3, mask),
        "listwise": listwise_distill(s, t, 3, 2.0, mask),
    }
    assert set(direct) == set(DISTILL_LOSSES)
    for kind, value in direct.items():
        got = distill_loss(kind, s, [t], None, temperature=2.0, k=3, mask=mask)
        assert got.item() == pytest.approx(value.item(), rel=1e-6), kind
        # one teacher with an explicit weight is the same teacher
        assert distill_loss(kind, s, [t], [2.0], temperature=2.0, k=3, mask=mask).item() == pytest.approx(
            value.item(), rel=1e-6)


@pytest.mark.parametrize("kind", DISTILL_LOSSES)
def test_identical_teachers_ensemble_to_the_same_teacher(kind):
    s, t = _random()
    one = distill_loss(kind, s, [t], None, temperature=1.5, k=3, mask=None)
    two = distill_loss(kind, s, [t, t.clone()], [0.3, 0.7], temperature=1.5, k=3, mask=None)
    assert two.item() == pytest.approx(one.item(), rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# total_loss and argument checks


def test_total_loss_mixes_and_drops_unused_terms():
    hard, distill = torch.tensor(2.0), torch.tensor(6.0)
    assert total_loss(hard, distill, 0.25).item() == pytest.approx(3.0)  # 0.75 * 2 + 0.25 * 6
    assert total_loss(hard, torch.tensor(math.nan), 0.0).item() == 2.0
    assert total_loss(torch.tensor(math.inf), distill, 1.0).item() == 6.0


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan])
def test_total_loss_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        total_loss(torch.tensor(1.0), torch.tensor(1.0), alpha)


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda s, t: kl_distill(s, t, 0.0), "temperature"),
        (lambda s, t: soft_bce_distill(s, t, -1.0), "temperature"),
        (lambda s, t: ranking_distill(s, t, 0), "k"),
        (lambda s, t: ranking_distill(s, t, 2, lam=0.0), "lam"),
        (lambda s, t: kl_distill(s, t[:, :2], 1.0), "teacher_logits"),
        (lambda s, t: mse_distill(s, t, torch.zeros(2, 2, dtype=torch.bool)), "mask"),
        (lambda s, t: mse_distill(s, t, torch.zeros_like(s)), "mask"),
        (lambda s, t: distill_loss("hinton", s, [t], None, temperature=1.0, k=2, mask=None), "kind"),
        (lambda s, t: distill_loss("kl", s, [], None, temperature=1.0, k=2, mask=None), "teachers"),
        (lambda s, t: distill_loss("rd", s, [t], None, temperature=1.0, k=-3, mask=None), "k"),
        (lambda s, t: relaxed_ranking_distill(s, t, 0), "k"),
        (lambda s, t: relaxed_ranking_distill(s, t, 2, n_uninteresting=0), "n_uninteresting"),
        (lambda s, t: listwise_distill(s, t, 2, 0.0), "temperature"),
        (lambda s, t: listwise_distill(s, t, True, 1.0), "k"),
        (lambda s, t: distill_loss("kl", s, [t, t], [1.0], temperature=1.0, k=2, mask=None), "weights"),
        (lambda s, t: distill_loss("kl", s, [t, t], [1.0, -1.0], temperature=1.0, k=2, mask=None), "weights"),
    ],
)
def test_bad_arguments_name_the_argument(call, argument):
    s, t = _random()
    with pytest.raises(ValueError, match=argument):
        call(s, t)


def test_module_exports():
    assert DISTILL_LOSSES == ("kl", "mse", "rd", "soft_bce", "rrd", "listwise")
    assert all(hasattr(losses, name) for name in losses.__all__)


@pytest.mark.parametrize("kind", losses.TOP_K_ORDER_LOSSES)
def test_top_k_order_losses_give_the_same_value_from_the_top_k_columns_alone(kind):
    # distill.cached_topk keeps only the teacher's top-K unobserved items in its order; top_k_distill_loss reads them
    # as columns and must give the value and gradient of the loss on the teacher's full logits
    from kdray.config import TOP_K_ORDER_LOSSES
    from kdray.distill.common import teacher_top_k

    assert TOP_K_ORDER_LOSSES == losses.TOP_K_ORDER_LOSSES  # the config's copy of the list
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(5, 12, generator=gen), torch.randn(5, 12, generator=gen)
    mask = torch.rand(5, 12, generator=gen) < 0.3
    mask[3, 2:] = True  # fewer unmasked items than k: masked columns fill the row's top-k and count for nothing
    mask[4] = True  # an all-masked row is left out
    top, valid = teacher_top_k(teacher, 5, mask)
    assert not valid[3].all() and valid[:3].all()
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    full = losses.distill_loss(kind, s1, [teacher], None, temperature=1.0, k=5, mask=mask)
    from_top = losses.top_k_distill_loss(kind, s2, top, mask)
    assert from_top.item() == pytest.approx(full.item(), rel=1e-6)
    full.backward()
    from_top.backward()
    assert torch.allclose(s2.grad, s1.grad, atol=1e-7)
    # the top-K's own order is what counts: reversing it changes the loss
    assert losses.top_k_distill_loss(kind, student, top.flip(-1), mask).item() != pytest.approx(full.item())


def test_top_k_distill_loss_names_what_it_cannot_take():
    s = torch.zeros(2, 6)
    top = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="kind must be one of"):
        losses.top_k_distill_loss("kl", s, top, None)
    with pytest.raises(ValueError, match="top must be"):
        losses.top_k_distill_loss("rrd", s, top[:1], None)  # one row of top for two rows of logits
    with pytest.raises(ValueError, match="int64"):
        losses.top_k_distill_loss("rd", s, top.int(), None)
    with pytest.raises(ValueError, match="mask shape"):
        losses.top_k_distill_loss("rd", s, top, torch.zeros(2, 5, dtype=torch.bool))
