"""kdray.models: the shared interface of every registered model (shapes, score == gathered score_all, gradients,
determinism, rebuild from model_args), hand-computed MF scores, NeuMF against its plain concatenation formula and
with chunking, two-tower side features, parameter counts and argument errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from kdray.distill import losses
from kdray.errors import ConfigError, DataError
from kdray.models import MODELS, MF, NeuMF, TwoTower, build_model, count_parameters, embedding_tables, model_args

N_USERS, N_ITEMS, DIM = 13, 29, 8


def _features(rows: int, cols: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)


def _graph() -> tuple[np.ndarray, np.ndarray]:
    """(user, item) training pairs for lightgcn: every user and every item has at least one."""
    users = np.arange(max(N_USERS, N_ITEMS)) % N_USERS
    return users, np.arange(users.size) % N_ITEMS


def _build(name: str, seed: int = 0, **overrides) -> nn.Module:
    """A small model of each kind: two hidden layers and dropout where allowed, side features for two_tower, a
    training graph for lightgcn."""
    kwargs: dict = dict(n_users=N_USERS, n_items=N_ITEMS, dim=DIM)
    if name in ("neumf", "two_tower"):
        kwargs.update(hidden=(16, 8), dropout=0.2)
    if name == "two_tower":
        kwargs.update(user_features=_features(N_USERS, 3, 1), item_features=_features(N_ITEMS, 5, 2))
    if name == "lightgcn":
        kwargs.update(graph=_graph())
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return build_model(name, **kwargs)


USERS = torch.tensor([0, 5, 12, 5])  # [B = 4], a repeated user included
ITEMS = torch.tensor([[0, 1, 28, 3, 3], [7, 8, 9, 10, 11], [28, 27, 0, 14, 2], [4, 4, 4, 4, 4]])  # [B, C = 5]


def test_registry():
    assert set(MODELS) == {"mf", "neumf", "two_tower", "lightgcn"}
    assert all(cls.name == name for name, cls in MODELS.items())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shapes_and_forward(name):
    model = _build(name).eval()
    assert (model.n_users, model.n_items) == (N_USERS, N_ITEMS)
    assert model.score(USERS, ITEMS).shape == (4, 5)
    assert model.score_all(USERS).shape == (4, N_ITEMS)
    assert model(USERS).shape == (4, N_ITEMS)  # forward without items is score_all (what DDP calls)
    assert torch.equal(model(USERS, ITEMS), model.score(USERS, ITEMS))
    assert model.score_all(USERS[:0]).shape == (0, N_ITEMS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_score_equals_gathered_score_all(name):
    model = _build(name).eval()
    with torch.no_grad():
        gathered = model.score_all(USERS).gather(1, ITEMS)
        assert torch.allclose(model.score(USERS, ITEMS), gathered, atol=1e-5)
        everything = torch.arange(N_ITEMS).repeat(4, 1)  # C = the whole catalog, per user
        assert torch.allclose(model.score(USERS, everything), model.score_all(USERS), atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shared_candidates_take_the_batched_path_with_the_same_result(name):
    # sampled softmax passes one candidate set to every user as an expanded (stride-0) view
    model = _build(name).eval()
    shared = torch.tensor([3, 0, 28, 7, 7]).unsqueeze(0).expand(4, -1)  # [B, C], stride 0 along B
    assert shared.stride(0) == 0
    with torch.no_grad():
        batched = model.score(USERS, shared)
        assert torch.allclose(batched, model.score(USERS, shared.contiguous()), atol=1e-5)  # per-pair path
        assert torch.allclose(batched, model.score_all(USERS)[:, [3, 0, 28, 7, 7]], atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_reach_every_parameter(name):
    model = _build(name, dropout=0.0) if name in ("neumf", "two_tower") else _build(name)
    targets = torch.zeros(4, N_ITEMS)
    targets[torch.arange(4), ITEMS[:, 0]] = 1.0
    loss = losses.softmax_ce(model.score_all(USERS), targets) + losses.softmax_ce(model.score(USERS, ITEMS),
                                                                                torch.eye(4, 5))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    for bname, buf in model.named_buffers():
        assert not buf.requires_grad, bname


@pytest.mark.parametrize("name", sorted(MODELS))
def test_initialisation_is_deterministic_under_the_seed(name):
    a, b, c = _build(name, seed=3), _build(name, seed=3), _build(name, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rebuild_from_model_args_and_state_dict(name):
    model = _build(name, seed=1).eval()
    args = json.loads(json.dumps(model_args(model)))  # what a checkpoint's model.json holds
    assert args["name"] == name
    torch.manual_seed(99)  # a different init: everything must come back through load_state_dict
    rebuilt = build_model(**args)
    assert model_args(rebuilt) == args
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    assert torch.equal(rebuilt.score_all(USERS), model.score_all(USERS))


def test_two_tower_feature_buffers_round_trip():
    model = _build("two_tower")
    state = model.state_dict()
    assert torch.equal(state["user_features"], torch.from_numpy(_features(N_USERS, 3, 1)))
    assert state["item_features"].shape == (N_ITEMS, 5)
    assert "user_features" not in dict(model.named_parameters())
    args = model_args(model)
    assert (args["user_feature_dim"], args["item_feature_dim"]) == (3, 5)
    # rebuilt without the arrays: zero buffers of the recorded widths, filled by load_state_dict
    rebuilt = build_model(**args, user_features=None, item_features=None)
    assert torch.equal(rebuilt.user_features, torch.zeros(N_USERS, 3))
    rebuilt.load_state_dict(state)
    assert torch.equal(rebuilt.item_features, model.item_features)


def test_two_tower_uses_its_side_features():
    model = _build("two_tower", dropout=0.0).eval()
    before = model.score_all(USERS).detach()
    model.item_features[3] += 1.0
    after = model.score_all(USERS).detach()
    changed = (before != after).any(dim=0)
    assert changed[3] and not changed[torch.arange(N_ITEMS) != 3].any()  # only item 3's scores move


def test_two_tower_without_features_and_without_hidden_layers():
    torch.manual_seed(0)
    model = build_model("two_tower", n_users=N_USERS, n_items=N_ITEMS, dim=DIM)
    assert model.user_features is None and "user_features" not in model.state_dict()
    assert model_args(model)["user_feature_dim"] == 0
    assert model.score_all(USERS).shape == (4, N_ITEMS)  # one linear projection per tower


def test_mf_and_neumf_ignore_side_features():
    for name in ("mf", "neumf"):
        model = _build(name, user_features=_features(N_USERS, 3, 1), item_features=_features(N_ITEMS, 2, 2))
        assert not any("feature" in k for k in model.state_dict()), name
        assert model_args(model)["user_feature_dim"] == 0


def test_mf_hand_computed():
    # p_0 = [1, 2]; q = [[1, 0], [0, 1], [1, 1]]; b = [0.5, 0, -1]
    # s(0, i) = <p_0, q_i> + b_i = [1 + 0.5, 2 + 0, 3 - 1] = [1.5, 2, 2]
    model = build_model("mf", n_users=1, n_items=3, dim=2)
    with torch.no_grad():
        model.user_emb.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.item_emb.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model.item_bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
    assert model.score_all(torch.tensor([0])).tolist() == [[1.5, 2.0, 2.0]]
    assert model.score(torch.tensor([0]), torch.tensor([[2, 0]])).tolist() == [[2.0, 1.5]]
    assert count_parameters(model) == (1 + 3) * 2 + 3


def test_neumf_matches_the_concatenation_formula():
    # He et al.: y = h^T [p_g ⊙ q_g ; relu(W2 relu(W1 [p_m ; q_m] + b1) + b2)] + b, computed literally here
    model = _build("neumf", dropout=0.0).eval()
    u, i = USERS.repeat_interleave(5), ITEMS.reshape(-1)  # one (user, item) pair per row
    gmf = model.gmf_user(u) * model.gmf_item(i)
    h = torch.cat([model.mlp_user(u), model.mlp_item(i)], dim=1)
    for layer in model.mlp:
        h = torch.relu(layer(h))
    expected = model.out(torch.cat([gmf, h], dim=1)).reshape(4, 5)
    assert torch.allclose(model.score(USERS, ITEMS), expected, atol=1e-5)


def test_neumf_chunked_score_all_equals_one_chunk():
    model = _build("neumf").eval()
    whole = model.score_all(USERS)
    model.max_block_elements = 1  # one item per chunk
    assert torch.allclose(model.score_all(USERS), whole, atol=1e-6)
    model.max_block_elements = 4 * 16 * 7  # 7 items per chunk: the last chunk is partial (29 = 4 * 7 + 1)
    assert torch.allclose(model.score_all(USERS), whole, atol=1e-6)


def test_neumf_default_tower_is_recorded():
    torch.manual_seed(0)
    model = build_model("neumf", n_users=3, n_items=4, dim=16)
    assert model.hidden == (16, 8) and model_args(model)["hidden"] == [16, 8]


def test_dropout_is_active_in_training_only():
    model = _build("neumf", dropout=0.5)
    model.train()
    torch.manual_seed(0)
    a = model.score_all(USERS)
    b = model.score_all(USERS)
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model.score_all(USERS), model.score_all(USERS))


def test_student_is_under_a_tenth_of_the_teachers():
    # ml-100k size. MF-d has (U + I) d + I parameters: MF-16 = 2625 * 16 + 1682 = 43682,
    # MF-256 = 2625 * 256 + 1682 = 673682 (6.5 %); the two-tower teacher adds two 256 -> 512 -> 256 MLPs
    # (2 * (256 * 512 + 512 + 512 * 256 + 256) = 525824) to its 256-d id embeddings: 1197824 (3.6 %)
    size = dict(n_users=943, n_items=1682)
    student = count_parameters(build_model("mf", dim=16, **size))
    mf_teacher = count_parameters(build_model("mf", dim=256, **size))
    tt_teacher = count_parameters(build_model("two_tower", dim=256, hidden=(512, 256), **size))
    assert (student, mf_teacher, tt_teacher) == (43682, 673682, 1197824)
    assert student < 0.1 * mf_teacher and student < 0.1 * tt_teacher


def test_count_parameters_excludes_buffers_and_ignores_freezing():
    model = _build("two_tower")
    n = count_parameters(model)
    buffers = model.user_features.numel() + model.item_features.numel()
    assert buffers > 0 and n == sum(v.numel() for v in model.state_dict().values()) - buffers
    model.requires_grad_(False)  # a frozen teacher
    assert count_parameters(model) == n


def test_embedding_tables():
    for name, cls in (("mf", MF), ("neumf", NeuMF), ("two_tower", TwoTower)):
        model = _build(name)
        assert isinstance(model, cls)
        users, items = embedding_tables(model)
        assert users.weight.shape == (N_USERS, DIM) and items.weight.shape == (N_ITEMS, DIM)


def test_wrapped_model_is_unwrapped():
    class Wrapper(nn.Module):  # the shape of DistributedDataParallel: the model under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = _build("mf")
    assert model_args(Wrapper(model)) == model_args(model)
    assert embedding_tables(Wrapper(model))[0] is model.user_emb
    with pytest.raises(TypeError):
        model_args(nn.Linear(2, 2))


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(name="gcmc"), ConfigError, "gcmc"),
        (dict(name="mf", dim=0), ConfigError, "dim"),
        (dict(name="mf", n_items=-1), ConfigError, "n_items"),
        (dict(name="mf", hidden=(4,)), ConfigError, "hidden"),
        (dict(name="mf", dropout=0.1), ConfigError, "dropout"),
        (dict(name="neumf", dropout=1.0), ConfigError, "dropout"),
        (dict(name="neumf", hidden=(8, 0)), ConfigError, "hidden"),
        (dict(name="two_tower", dropout=0.1), ConfigError, "dropout"),
        (dict(name="two_tower", user_features=np.zeros((N_USERS + 1, 2))), DataError, "user_features"),
        (dict(name="two_tower", item_features=np.zeros(N_ITEMS)), DataError, "item_features"),
        (dict(name="two_tower", item_features=np.zeros((N_ITEMS, 2)), item_feature_dim=3), DataError,
         "item_feature_dim"),
        (dict(name="two_tower", user_features=np.full((N_USERS, 2), np.nan)), DataError, "row 0"),
    ],
)
def test_bad_arguments(kwargs, error, words):
    full = dict(n_users=N_USERS, n_items=N_ITEMS, dim=DIM) | kwargs
    with pytest.raises(error, match=words):
        build_model(**full)
