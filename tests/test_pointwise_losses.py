"""kdray.distill.pointwise_losses: hand-computed values, independent references (the two-class Hinton KL of
kdray.distill.losses, autograd gradients, F.mse_loss) and edge cases (empty batches, zero weights, bad arguments)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdray.distill.losses import kl_distill
from kdray.distill.pointwise_losses import (
    hard_loss,
    multitask_loss,
    pointwise_objective,
    rating_distill_mse,
    rating_mse,
    soft_label_bce,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_soft_label_bce_hand_computed():
    # T = 2. Row 0: s / T = ln3 -> q = 3/4, t = 0 -> p = 1/2: BCE = -(1/2 ln 3/4 + 1/2 ln 1/4) = 1/2 ln(16/3).
    # Row 1: s = t = 0: BCE = ln 2. Mean times T^2 = 4: 2 * (1/2 ln(16/3) + ln 2) = ln(16/3) + 2 ln 2 = 3.06027
    s = torch.tensor([2 * LN3, 0.0])
    t = torch.tensor([0.0, 0.0])
    expected = math.log(16 / 3) + 2 * LN2
    assert soft_label_bce(s, t, 2.0).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(3.06027, abs=1e-5)


def test_soft_label_bce_is_the_two_class_hinton_kl_plus_the_target_entropy():
    # sigmoid(z / T) is the softmax of the logits [z, 0] / T, so T^2 * BCE = T^2 * (KL(p || q) + H(p))
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, generator=g) * 3, torch.randn(16, generator=g) * 3
    for temperature in (1.0, 2.5, 7.0):
        p = torch.sigmoid(t / temperature)
        entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
        two_class = kl_distill(torch.stack([s, torch.zeros(16)], 1), torch.stack([t, torch.zeros(16)], 1), temperature)
        reference = two_class + temperature**2 * entropy
        assert soft_label_bce(s, t, temperature).item() == pytest.approx(reference.item(), rel=1e-5)


def test_soft_label_bce_gradient_is_t_times_the_probability_gap():
    s = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    t = torch.tensor([0.0, 1.0, 3.0], requires_grad=True)
    temperature = 4.0
    soft_label_bce(s, t, temperature).backward()
    expected = temperature * (torch.sigmoid(s.detach() / temperature) - torch.sigmoid(t.detach() / temperature)) / 3
    assert torch.allclose(s.grad, expected, atol=1e-6)
    assert t.grad is None  # the teacher is a constant


def test_soft_label_bce_minimum_at_the_teacher():
    t = torch.tensor([1.5, -0.5])
    at_teacher = soft_label_bce(t.clone(), t, 3.0)
    assert soft_label_bce(t + 0.3, t, 3.0) > at_teacher
    assert soft_label_bce(t - 0.3, t, 3.0) > at_teacher


def test_rating_losses_hand_computed_and_match_mse_loss():
    pred, target = torch.tensor([3.0, 5.0]), torch.tensor([4.0, 2.0])
    assert rating_mse(pred, target).item() == pytest.approx((1 + 9) / 2)
    assert rating_distill_mse(pred, target).item() == pytest.approx(5.0)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(10, generator=g), torch.randn(10, generator=g)
    assert rating_mse(a, b).item() == pytest.approx(F.mse_loss(a, b).item())


def test_empty_batches_give_zero_with_zero_gradient():
    s = torch.zeros(0, requires_grad=True)
    for loss in (soft_label_bce(s, torch.zeros(0), 2.0), rating_mse(s, torch.zeros(0)),
                 rating_distill_mse(s, torch.zeros(0))):
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(s.grad, torch.zeros(0))


def test_hard_loss_per_head():
    batch = {"like": torch.tensor([1.0, 0.0]), "rating": torch.tensor([4.0, 2.0])}
    assert hard_loss("like", torch.tensor([0.0, 0.0]), batch).item() == pytest.approx(LN2)
    assert hard_loss("rating", torch.tensor([4.0, 4.0]), batch).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="'click'"):
        hard_loss("click", torch.zeros(2), batch)
    with pytest.raises(ValueError, match="no 'rating' labels"):
        hard_loss("rating", torch.zeros(2), {"like": batch["like"]})


def test_multitask_loss_weights_and_edge_cases():
    losses = {"like": torch.tensor(2.0), "rating": torch.tensor(3.0)}
    assert multitask_loss(losses, {"like": 1.0, "rating": 0.5}).item() == pytest.approx(3.5)
    assert multitask_loss({"like": torch.tensor(2.0)}, {"like": 1.0, "rating": 0.5}).item() == pytest.approx(2.0)
    # a task of weight 0 is dropped, so a non-finite loss there cannot leak
    assert multitask_loss({"like": torch.tensor(2.0), "rating": torch.tensor(math.inf)},
                          {"like": 1.0, "rating": 0.0}).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no task weight for 'rating'"):
        multitask_loss(losses, {"like": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        multitask_loss(losses, {"like": 1.0, "rating": -1.0})
    with pytest.raises(ValueError, match="empty"):
        multitask_loss({}, {})


def test_pointwise_objective_hand_computed():
    # like: hard = BCE(0, 1) = ln2, distill = T^2 BCE(sigmoid(0), sigmoid(0)) = ln2 -> L = ln2
    # rating: hard = (3 - 4)^2 = 1, distill = (3 - 3.5)^2 = 0.25 -> L = 0.5 * 1 + 0.5 * 0.25 = 0.625
    # total = 1 * ln2 + 2 * 0.625
    student = {"like": torch.tensor([0.0], requires_grad=True), "rating": torch.tensor([3.0], requires_grad=True)}
    teacher = {"like": torch.tensor([0.0]), "rating": torch.tensor([3.5])}
    batch = {"like": torch.tensor([1.0]), "rating": torch.tensor([4.0])}
    loss, parts = pointwise_objective(student, batch, teacher, alpha=0.5, temperature=1.0,
                                      task_weights={"like": 1.0, "rating": 2.0})
    assert loss.item() == pytest.approx(LN2 + 1.25, abs=1e-6)
    assert parts["like/hard"].item() == pytest.approx(LN2)
    assert parts["rating/distill"].item() == pytest.approx(0.25)
    loss.backward()
    assert student["rating"].grad.item() == pytest.approx(2.0 * (0.5 * 2 * (3 - 4) + 0.5 * 2 * (3 - 3.5)))


def test_pointwise_objective_without_teacher_or_alpha_is_the_hard_loss():
    student = {"like": torch.tensor([2.0, -1.0])}
    batch = {"like": torch.tensor([1.0, 0.0]), "rating": torch.tensor([5.0, 1.0])}
    hard = F.binary_cross_entropy_with_logits(student["like"], batch["like"])
    alone, parts = pointwise_objective(student, batch)
    assert alone.item() == pytest.approx(hard.item())
    assert set(parts) == {"like/hard"}
    off, _ = pointwise_objective(student, batch, {"like": torch.tensor([9.0, 9.0])}, alpha=0.0)
    assert off.item() == pytest.approx(hard.item())
    full, _ = pointwise_objective(student, batch, {"like": student["like"].clone()}, alpha=1.0, temperature=3.0)
    assert full.item() == pytest.approx(soft_label_bce(student["like"], student["like"], 3.0).item())


def test_pointwise_objective_errors():
    student = {"like": torch.zeros(2), "rating": torch.zeros(2)}
    batch = {"like": torch.zeros(2), "rating": torch.zeros(2)}
    with pytest.raises(ValueError, match="no 'rating' head"):
        pointwise_objective(student, batch, {"like": torch.zeros(2)}, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        pointwise_objective(student, batch, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        pointwise_objective(student, batch, dict(student), alpha=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="one shape"):
        soft_label_bce(torch.zeros(2), torch.zeros(3), 1.0)
