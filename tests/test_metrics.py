"""kdray.metrics: hand-computed rankings, torchmetrics' retrieval metrics and a brute-force loop as independent
references, and edge cases (excluded items, k larger than the catalog, users without truth items, ties)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.functional.retrieval import (
    retrieval_hit_rate,
    retrieval_normalized_dcg,
    retrieval_precision,
    retrieval_recall,
    retrieval_reciprocal_rank,
)

from kdray.metrics import RANKING_METRICS, full_ranking_evaluate, pointwise_metrics, topk_metrics
from kdray.sparse import Csr

INV_LOG2_3 = 1 / math.log2(3)  # 0.630930: the discount of rank 2
INV_LOG2_5 = 1 / math.log2(5)  # 0.430677: the discount of rank 4


def _truth(n: int, *items: int) -> torch.Tensor:
    row = torch.zeros(n, dtype=torch.bool)
    row[list(items)] = True
    return row


# ----------------------------------------------------------------------------------------------------------------
# topk_metrics


def test_topk_hand_computed():
    # user 0 ranks items 0 > 1 > 2 > 3 > 4; truth {1, 3}
    #   @2: top [0, 1] -> hits [0, 1]: recall 1/2, precision 1/2, hr 1, mrr 1/2,
    #       ndcg = (1/log2 3) / (1 + 1/log2 3) = 0.630930 / 1.630930 = 0.386853
    #   @4: hits [0, 1, 0, 1]: recall 1, precision 2/4, mrr 1/2,
    #       ndcg = (1/log2 3 + 1/log2 5) / (1 + 1/log2 3) = 1.061606 / 1.630930 = 0.650920
    # user 1: item 0 excluded (-inf), ranks 4 > 3 > 2 > 1; truth {4}: everything 1 at both k, precision@2 = 1/2
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5], [-math.inf, 0.1, 0.2, 0.3, 0.4]])
    truth = torch.stack([_truth(5, 1, 3), _truth(5, 4)])
    m = topk_metrics(scores, truth, [2, 4])
    assert set(m) == {f"{name}@{k}" for name in RANKING_METRICS for k in (2, 4)}
    expected = {
        "recall@2": [0.5, 1.0], "precision@2": [0.5, 0.5], "hr@2": [1.0, 1.0], "mrr@2": [0.5, 1.0],
        "ndcg@2": [INV_LOG2_3 / (1 + INV_LOG2_3), 1.0],
        "recall@4": [1.0, 1.0], "precision@4": [0.5, 0.25], "hr@4": [1.0, 1.0], "mrr@4": [0.5, 1.0],
        "ndcg@4": [(INV_LOG2_3 + INV_LOG2_5) / (1 + INV_LOG2_3), 1.0],
    }
    assert expected["ndcg@2"][0] == pytest.approx(0.386853, abs=1e-6)
    assert expected["ndcg@4"][0] == pytest.approx(0.650920, abs=1e-6)
    for name, values in expected.items():
        assert m[name].tolist() == pytest.approx(values, abs=1e-6), name
    given = topk_metrics(scores, truth, [2, 4], n_truth=torch.tensor([2, 1]))  # counts known from a CSR
    assert all(torch.equal(given[name], m[name]) for name in m)


def test_ndcg_ideal_dcg_uses_min_of_truth_size_and_k():
    # 3 truth items, k = 2, top-2 both hits: DCG = IDCG over min(3, 2) = 2 positions -> 1.0 (RecBole / LightGCN).
    # A normalisation over all 3 truth items would give (1 + 0.630930) / (1 + 0.630930 + 0.5) = 0.765361 instead.
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    m = topk_metrics(scores, _truth(5, 0, 1, 2).unsqueeze(0), [2])
    assert m["ndcg@2"].item() == pytest.approx(1.0)
    assert m["recall@2"].item() == pytest.approx(2 / 3)


def test_no_hit_gives_zero_for_every_metric():
    m = topk_metrics(torch.tensor([[3.0, 2.0, 1.0]]), _truth(3, 2).unsqueeze(0), [1, 2])
    assert all(v.item() == 0.0 for v in m.values())


def test_k_larger_than_catalog():
    # 5 items, k = 10: every item is ranked; precision divides by k itself (2 / 10), as RecBole does
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    m = topk_metrics(scores, _truth(5, 1, 3).unsqueeze(0), [10])
    assert m["recall@10"].item() == pytest.approx(1.0)
    assert m["precision@10"].item() == pytest.approx(0.2)
    assert m["ndcg@10"].item() == pytest.approx((INV_LOG2_3 + INV_LOG2_5) / (1 + INV_LOG2_3))
    assert m["mrr@10"].item() == pytest.approx(0.5)


def test_excluded_items_never_count_as_hits():
    # k exceeds the 2 rankable items, so the top-3 reaches the -inf item 0, which is (wrongly) also a truth item
    scores = torch.tensor([[-math.inf, 2.0, 1.0]])
    m = topk_metrics(scores, _truth(3, 0).unsqueeze(0), [3])
    assert m["hr@3"].item() == 0.0 and m["recall@3"].item() == 0.0 and m["ndcg@3"].item() == 0.0


def test_rows_without_truth_give_nan_recall_and_ndcg():
    m = topk_metrics(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2, dtype=torch.bool), [1])
    assert math.isnan(m["recall@1"].item()) and math.isnan(m["ndcg@1"].item())
    assert m["hr@1"].item() == 0.0 and m["precision@1"].item() == 0.0 and m["mrr@1"].item() == 0.0


def test_ties_follow_topk_order_and_stay_in_range():
    # all scores tied: which item is ranked first is topk's choice; each metric is one of its two possible values
    m = topk_metrics(torch.zeros(1, 2), _truth(2, 1).unsqueeze(0), [1])
    assert m["hr@1"].item() in (0.0, 1.0)
    assert m["ndcg@1"].item() == m["hr@1"].item() == m["recall@1"].item() == m["mrr@1"].item()


def test_topk_matches_torchmetrics_retrieval():
    # torchmetrics' definitions for binary relevance and untied scores agree with RecBole's: recall = hits / |T|,
    # precision = hits / k, hit rate, reciprocal rank within k, and NDCG whose ideal DCG sorts the targets, i.e.
    # sums the discounts of min(|T|, k) positions. One difference: torchmetrics (1.9) recall, precision and
    # reciprocal rank treat an item scored <= 0 as not retrieved even inside the top k (they read preds as
    # probabilities), whereas a full-catalog ranking retrieves the top k whatever the sign of the logits. Positive
    # scores (sigmoid probabilities) make the two definitions coincide.
    g = torch.Generator().manual_seed(0)
    scores = torch.sigmoid(torch.randn(12, 30, generator=g))
    truth = torch.rand(12, 30, generator=g) < 0.2
    truth[0] = False
    truth[0, 29] = True  # a single truth item
    truth[1] = True  # every item is a truth item
    truth[2, :] = torch.arange(30) < 15
    ks = [1, 5, 10, 30]
    m = topk_metrics(scores, truth, ks)
    references = {
        "ndcg": retrieval_normalized_dcg, "recall": retrieval_recall, "precision": retrieval_precision,
        "hr": retrieval_hit_rate, "mrr": retrieval_reciprocal_rank,
    }
    for b in range(12):
        if not truth[b].any():
            continue
        for k in ks:
            for name, ref in references.items():
                expected = ref(scores[b], truth[b], top_k=k).item()
                assert m[f"{name}@{k}"][b].item() == pytest.approx(expected, abs=1e-5), (b, k, name)


@pytest.mark.parametrize("ks", [[], [0], [3, -1]])
def test_bad_ks(ks):
    with pytest.raises(ValueError, match="ks"):
        topk_metrics(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool), ks)


# ----------------------------------------------------------------------------------------------------------------
# full_ranking_evaluate against a brute-force loop


def _brute_force(scores: np.ndarray, truth: list[set[int]], exclude: list[set[int]], k: int) -> dict[str, float]:
    """Per-user Python loops over a fully sorted ranking: an implementation independent of topk_metrics."""
    sums = {name: 0.0 for name in RANKING_METRICS}
    n = 0
    for u, items in enumerate(truth):
        if not items:
            continue
        n += 1
        ranking = [i for i in sorted(range(scores.shape[1]), key=lambda i: -scores[u, i]) if i not in exclude[u]][:k]
        hits = [1 if i in items else 0 for i in ranking]
        sums["recall"] += sum(hits) / len(items)
        sums["precision"] += sum(hits) / k
        sums["hr"] += float(any(hits))
        sums["mrr"] += next((1 / (r + 1) for r, h in enumerate(hits) if h), 0.0)
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        sums["ndcg"] += dcg / sum(1 / math.log2(r + 2) for r in range(min(len(items), k)))
    return {f"{name}@{k}": v / n for name, v in sums.items()}


def _pairs_to_csr(sets: list[set[int]], n_cols: int) -> Csr:
    rows = [u for u, s in enumerate(sets) for _ in s]
    cols = [i for s in sets for i in sorted(s)]
    return Csr.from_pairs(np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64), len(sets), n_cols)


@pytest.fixture(scope="module")
def split():
    """11 users x 25 items: random scores, disjoint train / valid / test sets, users 3 and 7 with no test item."""
    rng = np.random.default_rng(0)
    n_users, n_items = 11, 25
    scores = rng.normal(size=(n_users, n_items)).astype(np.float32)
    train, valid, test = [], [], []
    for u in range(n_users):
        perm = rng.permutation(n_items)
        train.append(set(perm[:6].tolist()))
        valid.append(set(perm[6:8].tolist()))
        test.append(set() if u in (3, 7) else set(perm[8 : 8 + 1 + u % 4].tolist()))
    # make the excluded items the model's favourites, so a missing mask would change every metric
    for u in range(n_users):
        for i in train[u] | valid[u]:
            scores[u, i] += 10.0
    csr = {name: _pairs_to_csr(sets, n_items) for name, sets in (("train", train), ("valid", valid), ("test", test))}
    return scores, train, valid, test, csr


@pytest.mark.parametrize("batch_size", [1, 4, 1024])
def test_full_ranking_matches_brute_force(split, batch_size):
    scores, train, valid, test, csr = split
    table = torch.from_numpy(scores)
    seen_batches = []

    def score_all(users: torch.Tensor) -> torch.Tensor:
        seen_batches.append(len(users))
        return table[users]  # indexing copies: a fresh tensor, as from a model

    res = full_ranking_evaluate(score_all, csr["test"], [csr["train"], csr["valid"]], [3, 10],
                                batch_size=batch_size)
    assert res["n_users_evaluated"] == 9 and res["n_users_skipped"] == 2
    assert max(seen_batches) <= batch_size and sum(seen_batches) == 9
    excluded = [a | b for a, b in zip(train, valid)]
    for k in (3, 10):
        for name, value in _brute_force(scores, test, excluded, k).items():
            assert res[name] == pytest.approx(value, abs=1e-6), name
    assert torch.equal(table, torch.from_numpy(scores))  # the caller's scores were not modified


def test_full_ranking_validation_masks_train_only(split):
    scores, train, valid, _, csr = split
    res = full_ranking_evaluate(lambda u: torch.from_numpy(scores)[u], csr["valid"], csr["train"], [5])
    expected = _brute_force(scores, valid, train, 5)
    assert res["recall@5"] == pytest.approx(expected["recall@5"], abs=1e-6)
    assert res["ndcg@5"] == pytest.approx(expected["ndcg@5"], abs=1e-6)
    assert res["n_users_evaluated"] == 11 and res["n_users_skipped"] == 0


def test_full_ranking_with_a_model_and_no_exclusion():
    from kdray.models import build_model

    torch.manual_seed(0)
    model = build_model("mf", n_users=6, n_items=9, dim=4).eval()
    truth = _pairs_to_csr([{0}, {1, 2}, set(), {8}, {3, 4, 5}, {7}], 9)
    res = full_ranking_evaluate(model.score_all, truth, None, [2, 20], batch_size=4)
    with torch.no_grad():
        dense = model.score_all(torch.arange(6)).numpy()
    expected = _brute_force(dense, [{0}, {1, 2}, set(), {8}, {3, 4, 5}, {7}], [set()] * 6, 2)
    assert res["ndcg@2"] == pytest.approx(expected["ndcg@2"], abs=1e-6)
    assert res["recall@20"] == pytest.approx(1.0)  # k beyond the catalog ranks everything
    assert res["n_users_evaluated"] == 5 and res["n_users_skipped"] == 1


def test_full_ranking_with_no_truth_at_all():
    empty = Csr.from_pairs(np.zeros(0), np.zeros(0), 3, 4)
    res = full_ranking_evaluate(lambda u: torch.zeros(len(u), 4), empty, [], [5])
    assert res["n_users_evaluated"] == 0 and res["n_users_skipped"] == 3
    assert math.isnan(res["recall@5"])


def test_full_ranking_rejects_mismatched_shapes(split):
    _, _, _, _, csr = split
    with pytest.raises(ValueError, match="score_all returned shape"):
        full_ranking_evaluate(lambda u: torch.zeros(len(u), 3), csr["test"], [], [5])
    other = Csr.from_pairs(np.zeros(0), np.zeros(0), 11, 30)
    with pytest.raises(ValueError, match="exclude"):
        full_ranking_evaluate(lambda u: torch.zeros(len(u), 25), csr["test"], [other], [5])


# ----------------------------------------------------------------------------------------------------------------
# pointwise_metrics


def test_pointwise_hand_computed():
    # threshold 0, "> 0" is positive. pos [2, 0.5, -1]: TP 2, FN 1. neg [-2, 0.5, 1, -3]: FP 2, TN 2.
    #   accuracy (2 + 2) / 7 = 0.571429; precision 2 / 4 = 0.5; recall 2 / 3; f1 = 2 * (1/2 * 2/3) / (7/6) = 4/7
    # AUC over 12 pairs: pos 2 beats all 4 -> 4; pos 0.5 beats -2 and -3, ties 0.5 -> 2.5; pos -1 beats -2, -3 -> 2
    #   (4 + 2.5 + 2) / 12 = 0.708333
    m = pointwise_metrics(torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.5, 1.0, -3.0]))
    assert m == pytest.approx({"accuracy": 4 / 7, "precision": 0.5, "recall": 2 / 3, "f1": 4 / 7,
                               "auc": 8.5 / 12})


def test_pointwise_auc_matches_brute_force_and_torchmetrics():
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 6, (40,), generator=g).float()  # few distinct values: many ties
    neg = torch.randint(-2, 4, (55,), generator=g).float()
    pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos.tolist() for n in neg.tolist())
    m = pointwise_metrics(pos, neg, threshold=2.5)
    assert m["auc"] == pytest.approx(pairs / (40 * 55), abs=1e-12)
    reference = binary_auroc(torch.cat([pos, neg]), torch.cat([torch.ones(40), torch.zeros(55)]).long())
    assert m["auc"] == pytest.approx(reference.item(), abs=1e-6)
    assert m["recall"] == pytest.approx(float((pos > 2.5).float().mean()))


def test_pointwise_edge_cases():
    tied = pointwise_metrics(torch.tensor([1.0, 1.0]), torch.tensor([1.0]))
    assert tied["auc"] == 0.5
    nothing_predicted = pointwise_metrics(torch.tensor([-1.0]), torch.tensor([-2.0]))
    assert nothing_predicted["precision"] == 0.0 and nothing_predicted["f1"] == 0.0
    assert nothing_predicted["auc"] == 1.0 and nothing_predicted["accuracy"] == 0.5
    with pytest.raises(ValueError, match="non-empty"):
        pointwise_metrics(torch.zeros(0), torch.zeros(3))
