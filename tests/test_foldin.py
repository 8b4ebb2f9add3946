"""Fold-in at request time: the pure solver (kdray.serve.foldin), the predictor's history path, the HTTP schema."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdray.checkpoint import Vocab, load_checkpoint, save_checkpoint
from kdray.models import build_model
from kdray.serve.foldin import ItemSide, fold_in, fold_in_loss, item_side, stored_user_vectors
from kdray.serve.predictor import Query, Recommender, RequestError
from kdray.sparse import Csr
from test_fuzz import _asgi_call, api  # noqa: F401  (the in-process Serve app fixture)
from test_serve import make_checkpoint

# ----------------------------------------------------------------------------------------------------------------
# The solver


def _side(vectors, bias=None) -> ItemSide:
    q = torch.tensor(vectors, dtype=torch.float64)
    b = torch.zeros(q.shape[0], dtype=torch.float64) if bias is None else torch.tensor(bias, dtype=torch.float64)
    return ItemSide(q, b)


def test_one_dimension_matches_the_hand_solved_stationary_point():
    # Two items q = (1, -1), no bias, history {item 0}, prior 0: L(p) = logsumexp(p, -p) - p + l2/2 p^2,
    # so L'(p) = tanh(p) - 1 + l2 p = 0. Solved here by bisection (L' is increasing).
    side, l2 = _side([[1.0], [-1.0]]), 0.5
    lo, hi = 0.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.tanh(mid) - 1 + l2 * mid < 0 else (lo, mid)
    p = fold_in(side, torch.tensor([0]), l2=l2, tol=1e-12)
    assert p.shape == (1,) and float(p[0]) == pytest.approx(lo, abs=1e-9)


def test_matches_an_independent_lbfgs_minimum_of_the_same_loss():
    gen = torch.Generator().manual_seed(0)
    side = ItemSide(torch.randn(50, 6, generator=gen, dtype=torch.float64),
                    torch.randn(50, generator=gen, dtype=torch.float64))
    history, prior = torch.tensor([3, 7, 7, 21, 40]), torch.randn(6, generator=gen, dtype=torch.float64)
    p = fold_in(side, history, prior, l2=0.7, tol=1e-12)
    ref = prior.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([ref], max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = fold_in_loss(side, torch.unique(history), ref, prior, 0.7)
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(p, ref.detach(), atol=1e-7, rtol=0)
    grad = torch.func.grad(lambda x: fold_in_loss(side, torch.unique(history), x, prior, 0.7))(p)
    assert float(grad.norm()) < 1e-6


def test_float32_item_table_solves_to_the_float64_answer_within_float32_precision():
    torch.manual_seed(3)
    model = build_model("mf", n_users=4, n_items=300, dim=8)
    side32 = item_side(model)
    side64 = ItemSide(side32.vectors.double(), side32.bias.double())
    history = torch.tensor([5, 17, 123, 250])
    assert side32.vectors.dtype == torch.float32
    p32, p64 = fold_in(side32, history), fold_in(side64, history, tol=1e-12)
    assert p32.dtype == torch.float64  # the solve is float64 whatever the table
    torch.testing.assert_close(p32, p64, atol=1e-4, rtol=0)


def test_edge_cases_empty_history_duplicates_order_and_bad_l2():
    side = _side([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0.1, -0.2, 0.0])
    prior = torch.tensor([0.3, -0.4], dtype=torch.float64)
    assert torch.equal(fold_in(side, torch.tensor([], dtype=torch.int64), prior), prior)
    assert torch.equal(fold_in(side, torch.tensor([], dtype=torch.int64)), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(fold_in(side, torch.tensor([2, 0, 2])), fold_in(side, torch.tensor([0, 2])))
    with pytest.raises(ValueError, match="l2"):
        fold_in(side, torch.tensor([0]), l2=0.0)


def test_item_side_of_each_model_family(tmp_path):
    torch.manual_seed(0)
    mf = build_model("mf", n_users=3, n_items=5, dim=4)
    side = item_side(mf)
    users = torch.tensor([0, 2])
    torch.testing.assert_close(side.scores(stored_user_vectors(mf, users)), mf.score_all(users).detach())
    tower = build_model("two_tower", n_users=3, n_items=5, dim=4, hidden=(6, 3)).eval()
    side = item_side(tower)
    assert side.dim == 3
    torch.testing.assert_close(side.scores(stored_user_vectors(tower, users)), tower.score_all(users).detach())
    assert item_side(build_model("neumf", n_users=3, n_items=5, dim=4, hidden=(8,))) is None


# ----------------------------------------------------------------------------------------------------------------
# The predictor's history path, on a catalog with two clusters of items

USERS = np.array(["a0", "a1", "a2", "b0"])
ITEMS = np.array([f"i{n}" for n in range(10)])
SEEN = {0: [0, 1, 2], 1: [0, 1, 3], 2: [0, 2, 4], 3: [5]}  # cluster A (items 0-4) is the popular one


def _clustered_checkpoint(directory: Path) -> Path:
    model = build_model("mf", n_users=len(USERS), n_items=len(ITEMS), dim=2)
    with torch.no_grad():
        model.item_emb.weight.copy_(torch.tensor([[3.0, 0.0]] * 5 + [[0.0, 3.0]] * 5))
        model.item_emb.weight.add_(torch.linspace(0, 0.1, 10)[:, None])  # no exact ties
        model.user_emb.weight.copy_(torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]]))
    rows = [u for u, items in SEEN.items() for _ in items]
    seen = Csr.from_pairs(np.array(rows), np.concatenate(list(SEEN.values())), len(USERS), len(ITEMS))
    return save_checkpoint(directory, model, role="student", config={"name": "clusters"},
                           vocab=Vocab(user_ids=USERS, item_ids=ITEMS, seen=seen))


@pytest.fixture(scope="module")
def clustered(tmp_path_factory) -> Path:
    return _clustered_checkpoint(tmp_path_factory.mktemp("foldin") / "ckpt")


def test_new_user_with_a_history_gets_items_near_it_not_the_popular_list(clustered):
    rec = Recommender.from_checkpoint(clustered)
    cold, folded = rec.recommend_queries([Query("new", 3), Query("new", 3, history=["i6", "i7"])])
    assert cold.cold_start and set(cold.item_ids) <= {f"i{n}" for n in range(5)}  # the popular cluster
    assert not folded.cold_start and folded.unknown_items == []
    assert set(folded.item_ids) <= {"i5", "i8", "i9"}  # cluster B, the history itself excluded
    assert len(folded.item_ids) == 3 and folded.scores == sorted(folded.scores, reverse=True)


def test_predictor_equals_the_offline_fold_in_exactly(clustered):
    rec = Recommender.from_checkpoint(clustered)
    model = load_checkpoint(clustered).model
    side = item_side(model)
    for user, history, prior in [("new", ["i6", "i9", "i6"], None),
                                 ("a1", ["i7"], stored_user_vectors(model, torch.tensor([1]))[0])]:
        vector, dense, unknown = rec.fold_in_user(user, history)
        offline = fold_in(side, torch.tensor([int(h[1:]) for h in history]), prior)
        assert torch.equal(vector, offline) and unknown == []
        (got,) = rec.recommend_queries([Query(user, 4, exclude_seen=False, history=history)])
        top = torch.topk(side.scores(offline[None])[0], 4)
        assert got.item_ids == ITEMS[top.indices.numpy()].tolist() and got.scores == top.values.tolist()


def test_known_user_recent_clicks_move_the_list_and_seen_items_stay_excluded(clustered):
    rec = Recommender.from_checkpoint(clustered)
    (stored,) = rec.recommend(["a0"], k=3)
    (moved,) = rec.recommend_queries([Query("a0", 3, history=["i5", "i6", "i7", "i8"])])
    assert set(stored.item_ids) <= {"i3", "i4", *(f"i{n}" for n in range(5, 10))} and "i3" in stored.item_ids
    assert moved.item_ids[0] == "i9"  # the one unseen item of the history's cluster now leads
    assert not {"i0", "i1", "i2", "i5", "i6", "i7", "i8"} & set(moved.item_ids)  # training and history items
    (same,) = rec.recommend_queries([Query("a0", 3, history=[])])
    assert same.item_ids == stored.item_ids  # an empty history is no history


def test_unknown_history_items_are_reported_not_fatal(clustered):
    rec = Recommender.from_checkpoint(clustered)
    mixed, all_unknown, known_user = rec.recommend_queries([
        Query("new", 2, history=["i6", "nope", 12345]), Query("new", 2, history=["x", "y"]),
        Query("b0", 2, history=["zz"])])
    assert not mixed.cold_start and mixed.unknown_items == ["nope", "12345"]
    assert all_unknown.cold_start and all_unknown.unknown_items == ["x", "y"]  # nothing to fold in: popular list
    assert not known_user.cold_start and known_user.unknown_items == ["zz"]
    assert known_user.item_ids == rec.recommend(["b0"], k=2)[0].item_ids


def test_a_million_item_history_is_refused_at_once_with_the_limit(clustered):
    rec = Recommender.from_checkpoint(clustered, max_history=50)
    huge = list(range(10 ** 6))
    t0 = time.perf_counter()
    with pytest.raises(RequestError, match="1000000 items is more than the limit of 50") as e:
        rec.recommend_queries([Query("new", 2, history=huge)])
    assert e.value.field == "history" and time.perf_counter() - t0 < 0.05  # no per-item work before the check


def test_a_model_without_item_vectors_refuses_a_history(tmp_path):
    rec = Recommender.from_checkpoint(make_checkpoint(tmp_path / "neumf", name="neumf", hidden=(8,)))
    with pytest.raises(RequestError, match="neumf") as e:
        rec.recommend_queries([Query("u0", 2, history=["item-a"])])
    assert e.value.field == "history"
    assert rec.recommend_queries([Query("u0", 2, history=[])])[0].item_ids  # no history: served as before


# ----------------------------------------------------------------------------------------------------------------
# Through the HTTP app, in-process (the Serve ingress, no cluster)


def test_http_history_unknown_items_and_the_history_limit(api):  # noqa: F811
    # Answered requests go through the batch route: a single /recommend answered in-process leaves @serve.batch state
    # on the deployment class that later tests could not pickle (tests/test_update.py sends them to a live one).
    status, body = _asgi_call(api.app, "POST", "/recommend/batch", json.dumps(
        {"user_ids": ["new", "u0"], "k": 2, "histories": [["item-e", 99], None]}).encode())
    results = json.loads(body)["results"]
    assert status == 200 and [r["cold_start"] for r in results] == [False, False], results
    assert results[0]["unknown_items"] == ["99"] and results[1]["unknown_items"] == []
    assert "item-e" not in {i["item_id"] for i in results[0]["items"]}
    status, body = _asgi_call(api.app, "POST", "/recommend/batch", json.dumps(
        {"user_ids": ["new", "u0"], "k": 2, "histories": [["item-e"]]}).encode())
    assert status == 422 and json.loads(body)["detail"][0]["loc"] == ["body", "histories"]

    t0 = time.perf_counter()
    status, body = _asgi_call(api.app, "POST", "/recommend", json.dumps(
        {"user_id": "new", "k": 2, "history": list(range(10 ** 6))}).encode())
    seconds = time.perf_counter() - t0
    (detail,) = json.loads(body)["detail"]
    assert status == 422 and detail["loc"] == ["body", "history"] and "limit of 200" in detail["msg"], detail
    assert seconds < 10, seconds  # parsing and validating the 6.9 MB body, no fold-in work
