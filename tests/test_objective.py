"""The per-batch objective, without Ray: candidates, targets, the teacher's logits, and the combined loss."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from kdray.distill import losses
from kdray.config import Config, replace
from kdray.models import build_model
from kdray.train.objective import (Objective, batch_from_lists, batch_loss, cached_teacher_columns, sampling_log_q,
                                   teacher_logits)
from kdray.train.shard import LocalShard

N_USERS, N_ITEMS = 6, 12


@pytest.fixture
def models():
    torch.manual_seed(0)
    student = build_model("mf", n_users=N_USERS, n_items=N_ITEMS, dim=4)
    teacher = build_model("mf", n_users=N_USERS, n_items=N_ITEMS, dim=16).eval()
    return student, teacher


@pytest.fixture
def batch():
    # users 1, 3, 4 with items {0, 5}, {2}, {7, 8, 11}
    return batch_from_lists(np.array([1, 3, 4]), np.array([0, 2, 3, 6]), np.array([0, 5, 2, 7, 8, 11]))


def test_batch_from_lists_flattens_ragged_items(batch):
    assert batch.users.tolist() == [1, 3, 4]
    assert batch.pos_rows.tolist() == [0, 0, 1, 2, 2, 2]
    assert batch.pos_items.tolist() == [0, 5, 2, 7, 8, 11]


def test_full_catalog_softmax_matches_manual(models, batch):
    student, _ = models
    obj = Objective(n_items=N_ITEMS, hard_loss="softmax", n_negatives=4)
    loss, parts = batch_loss(student, [], batch, obj)
    logp = torch.log_softmax(student.score_all(batch.users), dim=1)
    manual = -logp[batch.pos_rows, batch.pos_items].mean()
    assert torch.allclose(loss, manual, atol=1e-6)
    assert set(parts) == {"hard"}


def test_alpha_zero_ignores_teacher_and_alpha_one_is_pure_distillation(models, batch):
    student, teacher = models
    base = dict(n_items=N_ITEMS, hard_loss="softmax", n_negatives=4, distill="kl", temperature=2.0)
    hard_only, _ = batch_loss(student, [teacher], batch, Objective(**base, alpha=0.0))
    alone, _ = batch_loss(student, [], batch, Objective(n_items=N_ITEMS, hard_loss="softmax", n_negatives=4))
    assert torch.allclose(hard_only, alone)
    pure, parts = batch_loss(student, [teacher], batch, Objective(**base, alpha=1.0, mask_seen=False))
    s, t = student.score_all(batch.users), teacher.score_all(batch.users)
    assert torch.allclose(pure, losses.kl_distill(s, t, 2.0), atol=1e-6)
    assert parts["distill"] == pytest.approx(float(pure), rel=1e-5)


def test_mask_seen_leaves_training_positives_out(models, batch):
    student, teacher = models
    obj = Objective(n_items=N_ITEMS, hard_loss="softmax", n_negatives=4, distill="kl", alpha=1.0, mask_seen=True)
    loss, _ = batch_loss(student, [teacher], batch, obj)
    s, t = student.score_all(batch.users), teacher.score_all(batch.users)
    mask = torch.zeros_like(s, dtype=torch.bool)
    mask[batch.pos_rows, batch.pos_items] = True
    assert torch.allclose(loss, losses.kl_distill(s, t, 1.0, mask=mask), atol=1e-6)


def test_teacher_logits_are_frozen_and_detached(models, batch):
    student, teacher = models
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    obj = Objective(n_items=N_ITEMS, hard_loss="softmax", n_negatives=4, distill="rd", alpha=0.5, topk=3)
    loss, _ = batch_loss(student, [teacher], batch, obj)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    (t,) = teacher_logits([teacher], batch, None)
    assert not t.requires_grad and not t.is_inference()


def test_sampled_candidates_contain_every_positive_and_scores_match(models, batch):
    student, teacher = models
    obj = Objective(n_items=N_ITEMS, hard_loss="sampled_softmax", n_negatives=3, distill="mse", alpha=0.5)
    log_q = sampling_log_q(np.arange(N_ITEMS))
    gen = torch.Generator().manual_seed(0)
    loss, parts = batch_loss(student, [teacher], batch, obj, log_q, gen)
    assert torch.isfinite(loss) and set(parts) == {"hard", "distill"}
    from kdray.train.objective import _candidates

    cand, targets = _candidates(batch, obj, log_q, torch.Generator().manual_seed(0))
    assert set(batch.pos_items.tolist()) <= set(cand.tolist())
    assert targets.sum() == len(batch.pos_items)
    (t,) = teacher_logits([teacher], batch, cand)
    assert torch.allclose(t, teacher.score_all(batch.users)[:, cand], atol=1e-5)


@pytest.mark.parametrize("hard", ["bpr", "bce"])
def test_pairwise_and_pointwise_losses_are_finite_and_train(models, batch, hard):
    student, _ = models
    obj = Objective(n_items=N_ITEMS, hard_loss=hard, n_negatives=4)
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    first = None
    for step in range(30):
        loss, _ = batch_loss(student, [], batch, obj, gen=torch.Generator().manual_seed(step))
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first


def _cached(batch, teacher, k):
    """The batch as distill.cached_topk delivers it: the teacher's top-k unobserved items per user, best first
    (what kdray.distill.teacher.TeacherTopK computes)."""
    with torch.no_grad():
        t = teacher.score_all(batch.users)
        t[batch.pos_rows, batch.pos_items] = -float("inf")
        items = t.topk(k, dim=1).indices
    offsets = np.concatenate([[0], np.cumsum(np.bincount(batch.pos_rows.numpy(), minlength=len(batch.users)))])
    return batch_from_lists(batch.users.numpy(), offsets, batch.pos_items.numpy(), items.numpy())


@pytest.mark.parametrize("kind", losses.TOP_K_ORDER_LOSSES)
def test_a_cached_top_k_gives_the_loss_and_gradient_of_the_live_teacher(models, batch, kind):
    # the cached path hands the loss the top-K columns only (no [B, C] teacher block): same value, same gradient
    student, teacher = models
    obj = Objective(n_items=N_ITEMS, hard_loss="softmax", n_negatives=4, alpha=0.6, distill=kind, topk=3)
    live, live_parts = batch_loss(student, [teacher], batch, obj)
    live.backward()
    live_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    cached, cached_parts = batch_loss(student, [], _cached(batch, teacher, 3), obj)
    cached.backward()
    assert cached.item() == pytest.approx(live.item(), rel=1e-6)
    assert cached_parts["distill"] == pytest.approx(live_parts["distill"], rel=1e-6)
    for got, want in zip([p.grad for p in student.parameters()], live_grads):
        assert torch.allclose(got, want, atol=1e-7)


def test_cached_top_k_columns_follow_the_sampled_candidates(batch):
    batch.teacher_items = torch.tensor([[3, 4], [1, 0], [9, 2]])
    assert torch.equal(cached_teacher_columns(batch, None), batch.teacher_items)
    cand = torch.tensor([0, 1, 2, 3, 4, 9])  # sorted, as torch.unique returns it
    cols = cached_teacher_columns(batch, cand)
    assert torch.equal(cand[cols], batch.teacher_items)  # the same items, in the teacher's order


def test_objective_from_config_roles():
    cfg = replace(Config(), **{"distill.loss": "kl", "distill.alpha": 0.7})
    teacher = Objective.from_config(cfg, "teacher", 10)
    student = Objective.from_config(cfg, "student", 10)
    assert not teacher.distilling and teacher.alpha == 0.0
    assert student.distilling and student.alpha == 0.7 and student.distill == "kl"


def test_local_shard_batches_cover_every_row_once_per_epoch():
    table = pa.table({"user": pa.array([5, 2, 9, 1, 7], pa.int64()),
                      "items": pa.array([[1], [2, 3], [4], [5, 6, 7], [8]], pa.list_(pa.int64()))})
    shard = LocalShard.from_tables([table.slice(0, 2), table.slice(2)])
    assert len(shard) == 5
    batches = shard.batches(2, 3, np.random.default_rng(0))
    users = sorted(u for b in batches for u in b.users.tolist())
    assert users == [1, 2, 5, 7, 9]
    items_of = {int(b.users[r]): [] for b in batches for r in range(len(b.users))}
    for b in batches:
        for r, i in zip(b.pos_rows.tolist(), b.pos_items.tolist()):
            items_of[int(b.users[r])].append(i)
    assert items_of == {5: [1], 2: [2, 3], 9: [4], 1: [5, 6, 7], 7: [8]}
    # more steps than the shard has rows: rows are reused, never invented (DDP needs equal step counts)
    more = shard.batches(2, 4, np.random.default_rng(1))
    assert len(more) == 4 and {u for b in more for u in b.users.tolist()} <= {1, 2, 5, 7, 9}


def test_embedding_l2_adds_the_batch_rows_squared_norm_over_users(models, batch):
    student, _ = models
    plain = Objective(n_items=N_ITEMS, hard_loss="softmax", n_negatives=4)
    reg = Objective(n_items=N_ITEMS, hard_loss="softmax", n_negatives=4, embedding_l2=0.5)
    base, _ = batch_loss(student, [], batch, plain)
    loss, parts = batch_loss(student, [], batch, reg)
    u, v = student.user_emb.weight.detach(), student.item_emb.weight.detach()
    # users 1, 3, 4; positives 0, 5, 2, 7, 8, 11 (each once): by hand, over 3 users
    by_hand = (sum(float(u[i] @ u[i]) for i in (1, 3, 4)) + sum(float(v[i] @ v[i]) for i in (0, 5, 2, 7, 8, 11))) / 3
    assert parts["embedding_l2"] == pytest.approx(by_hand, rel=1e-5)
    assert float(loss) == pytest.approx(float(base) + 0.5 * by_hand, rel=1e-5)
    loss.backward()  # rows the batch does not use get no gradient from the penalty (nor from the softmax: users)
    assert torch.count_nonzero(student.user_emb.weight.grad[[0, 2, 5]]) == 0


def test_embedding_l2_is_validated_and_reaches_the_objective():
    from kdray.config import ConfigError, load_config

    cfg = load_config(None, ["student_train.embedding_l2=0.001"])
    assert Objective.from_config(cfg, "student", N_ITEMS).embedding_l2 == 0.001
    assert Objective.from_config(cfg, "teacher", N_ITEMS).embedding_l2 == 0.0
    with pytest.raises(ConfigError, match="teacher_train.embedding_l2"):
        load_config(None, ["teacher_train.embedding_l2=-1"])


# ----------------------------------------------------------------------------------------------------------------
# The ensemble a student distils from, as one model (kdray.distill.teacher.Ensemble).


def test_an_ensemble_ranks_by_the_mixture_of_its_members_softmax():
    from kdray.distill.teacher import Ensemble

    torch.manual_seed(0)
    a, b = (build_model("mf", n_users=N_USERS, n_items=N_ITEMS, dim=d).eval() for d in (4, 16))
    users = torch.tensor([0, 3, 5])
    with torch.no_grad():
        pa_, pb = a.score_all(users).softmax(1).numpy(), b.score_all(users).softmax(1).numpy()
        got = Ensemble([a, b], [3.0, 1.0]).score_all(users).numpy()
        np.testing.assert_allclose(np.exp(got), 0.75 * pa_ + 0.25 * pb, rtol=1e-5)  # weights normalised
        np.testing.assert_allclose(np.exp(Ensemble([a, b]).score_all(users).numpy()), (pa_ + pb) / 2, rtol=1e-5)
        assert torch.equal(Ensemble([a]).score_all(users), a.score_all(users))  # one member: its own logits
    ensemble = Ensemble([a, b])
    assert sum(p.numel() for p in ensemble.parameters()) == sum(p.numel() for m in (a, b) for p in m.parameters())
    assert (ensemble.n_users, ensemble.n_items) == (N_USERS, N_ITEMS)
    other = build_model("mf", n_users=N_USERS, n_items=N_ITEMS + 1, dim=4)
    with pytest.raises(ValueError, match="differ in"):
        Ensemble([a, other])
    with pytest.raises(ValueError, match="3 weights for 2 members"):
        Ensemble([a, b], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="at least one"):
        Ensemble([])
