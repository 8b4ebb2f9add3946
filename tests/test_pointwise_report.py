"""kdray.metrics' labelled pointwise metrics: hand-computed values, scikit-learn as the independent reference, and
edge cases (ties, one class, nothing predicted positive, bad input)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from kdray.metrics import auc, best_threshold, classification_metrics, logloss, mae, pointwise_report, rmse


def _random(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.4).float()
    logits = torch.randn(n, generator=g) + 1.2 * labels  # informative, not perfect
    return logits, labels


def test_classification_hand_computed():
    # predictions at 0.5 (>=): [1, 1, 0, 0, 1]; labels [1, 0, 1, 0, 1] -> TP 2, FP 1, FN 1, TN 1
    probs = torch.tensor([0.9, 0.5, 0.4, 0.1, 0.7])
    labels = torch.tensor([1, 0, 1, 0, 1])
    m = classification_metrics(probs, labels, 0.5)
    assert m == pytest.approx({"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5, 0.8, 0.99])
def test_classification_matches_sklearn(threshold):
    logits, labels = _random()
    probs = torch.sigmoid(logits)
    predicted = (probs >= threshold).int().numpy()
    y = labels.int().numpy()
    m = classification_metrics(probs, labels, threshold)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, predicted))
    assert m["precision"] == pytest.approx(skm.precision_score(y, predicted, zero_division=0))
    assert m["recall"] == pytest.approx(skm.recall_score(y, predicted, zero_division=0))
    assert m["f1"] == pytest.approx(skm.f1_score(y, predicted, zero_division=0))


def test_nothing_predicted_positive_gives_zero_precision_and_f1():
    m = classification_metrics(torch.tensor([0.1, 0.2]), torch.tensor([1, 0]), 0.5)
    assert m == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    no_pos = classification_metrics(torch.tensor([0.9, 0.2]), torch.tensor([0, 0]), 0.5)
    assert no_pos["recall"] == 0.0 and no_pos["f1"] == 0.0 and no_pos["accuracy"] == 0.5


def test_best_threshold_hand_computed():
    # sorted probs 0.9(1) 0.8(0) 0.6(1) 0.3(1) 0.2(0); P = 3. F1 = 2 TP / (k + P) for the top k:
    # k=1: 2/4  k=2: 2/5  k=3: 4/6  k=4: 6/7  k=5: 6/8 -> best at k = 4, threshold 0.3
    probs = torch.tensor([0.2, 0.9, 0.3, 0.6, 0.8])
    labels = torch.tensor([0, 1, 1, 1, 0])
    assert best_threshold(probs, labels) == pytest.approx(0.3)
    assert classification_metrics(probs, labels, 0.3)["f1"] == pytest.approx(6 / 7)


def test_best_threshold_keeps_ties_together_and_prefers_the_highest():
    # 0.5 is tied across a positive and a negative: a threshold takes both or neither.
    # top 1 (0.9): F1 = 2 / (1 + 2) = 2/3; top 3 (>= 0.5): F1 = 4 / (3 + 2) = 4/5 -> 0.5
    assert best_threshold(torch.tensor([0.5, 0.5, 0.9]), torch.tensor([1, 0, 1])) == pytest.approx(0.5)
    # F1 = 2 TP / (k + P) with P = 2: top 1: 2/3, top 2: 2/4, top 3: 2/5, top 4: 4/6 = 2/3 -> a tie, the highest wins
    probs, labels = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 0, 1])
    assert best_threshold(probs, labels) == pytest.approx(0.9)


def test_best_threshold_maximises_f1_like_sklearn_pr_curve():
    logits, labels = _random(500, seed=3)
    probs = torch.sigmoid(logits)
    precision, recall, _ = skm.precision_recall_curve(labels.numpy(), probs.numpy())
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = best_threshold(probs, labels)
    assert classification_metrics(probs, labels, best)["f1"] == pytest.approx(f1.max())


def test_auc_and_logloss_match_sklearn():
    logits, labels = _random(300, seed=5)
    assert auc(logits, labels) == pytest.approx(skm.roc_auc_score(labels.numpy(), logits.numpy()))
    assert auc(torch.sigmoid(logits), labels) == pytest.approx(auc(logits, labels))  # order only
    assert logloss(logits, labels) == pytest.approx(
        skm.log_loss(labels.numpy(), torch.sigmoid(logits.double()).numpy()), rel=1e-9)


def test_auc_hand_computed_with_ties():
    # positives [0.8, 0.5], negatives [0.5, 0.2]: pairs (0.8>0.5) (0.8>0.2) (0.5=0.5: 1/2) (0.5>0.2) -> 3.5 / 4
    scores = torch.tensor([0.8, 0.5, 0.5, 0.2])
    labels = torch.tensor([1, 1, 0, 0])
    assert auc(scores, labels) == pytest.approx(0.875)
    assert skm.roc_auc_score(labels.numpy(), scores.numpy()) == pytest.approx(0.875)


def test_auc_of_one_class_is_nan():
    assert math.isnan(auc(torch.tensor([0.1, 0.9]), torch.tensor([1, 1])))


def test_logloss_hand_computed_and_exact_for_extreme_logits():
    # logit 0 -> -ln(1/2) = ln 2 for either label
    assert logloss(torch.tensor([0.0, 0.0]), torch.tensor([1, 0])) == pytest.approx(math.log(2))
    # a probability would round to 1 here; from the logit the loss is exact: softplus(60) = 60
    assert logloss(torch.tensor([60.0]), torch.tensor([0])) == pytest.approx(60.0)


def test_rmse_mae_hand_computed_and_match_sklearn():
    pred, target = torch.tensor([3.0, 4.0, 1.0]), torch.tensor([4.0, 4.0, 3.0])
    assert rmse(pred, target) == pytest.approx(math.sqrt(5 / 3))
    assert mae(pred, target) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    assert rmse(a, b) == pytest.approx(math.sqrt(skm.mean_squared_error(b.numpy(), a.numpy())), rel=1e-6)
    assert mae(a, b) == pytest.approx(skm.mean_absolute_error(b.numpy(), a.numpy()), rel=1e-6)


def test_pointwise_report_keys_and_values():
    logits, labels = _random(100, seed=9)
    rating = torch.arange(100.0) % 5 + 1
    report = pointwise_report(logits, labels, rating + 0.5, rating, threshold=0.3)
    assert report["f1@best"] == pytest.approx(classification_metrics(torch.sigmoid(logits), labels, 0.3)["f1"])
    assert report["accuracy@0.5"] == pytest.approx(classification_metrics(torch.sigmoid(logits), labels)["accuracy"])
    assert report["threshold"] == 0.3 and report["rmse"] == pytest.approx(0.5) and report["mae"] == pytest.approx(0.5)
    assert set(pointwise_report(logits, labels)) == {"accuracy@0.5", "precision@0.5", "recall@0.5", "f1@0.5", "auc",
                                                     "logloss"}
    assert set(pointwise_report(rating_pred=rating, rating=rating)) == {"rmse", "mae"}


@pytest.mark.parametrize("call", [
    lambda: classification_metrics(torch.zeros(0), torch.zeros(0)),
    lambda: classification_metrics(torch.zeros(2), torch.zeros(3)),
    lambda: classification_metrics(torch.tensor([0.5, math.nan]), torch.tensor([1, 0])),
    lambda: auc(torch.tensor([0.5, 0.4]), torch.tensor([2, 0])),
    lambda: best_threshold(torch.tensor([0.5, 0.4]), torch.tensor([0, 0])),
    lambda: rmse(torch.zeros(2), torch.tensor([1.0, math.inf])),
    lambda: mae(torch.zeros(0), torch.zeros(0)),
])
def test_bad_input_raises(call):
    with pytest.raises(ValueError):
        call()
